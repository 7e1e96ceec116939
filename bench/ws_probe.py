"""Does Triton's Hopper warp specialization (`tl.range(..., warp_specialize=True)`) take an
attention-forward loop? A compile-only probe for issue #26 (no GPU needed).

It compiles one forward loop of our own (the tutorial's online-softmax structure: `S = Q K^T`,
row max, exp2, row sum, rescale, `acc += P V`) for sm_90 with the installed triton, in three
operand forms (pointer loads; K/V from host-side tensor descriptors; Q, K and V all from host-side
descriptors) x num_warps 4 / 8 x warp_specialize off / on, and reports whether it compiled,
the warps Triton launched (a specialized kernel gains a producer warpgroup), `setmaxnreg`
count, and for the loop that holds the MMAs: instructions, HGMMA, MUFU per warp, and local
(spill) instructions.

    python -m bench.ws_probe [--head-dim 128] [--block-n 128]

Findings on 2026-12-08 are in docs/perf-log.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench import compile_check as cc
from bench.tutorial_attention import online_softmax_step

BLOCK_M = 128


@triton.jit
def _probe_fwd(Q, K, V, O, M, qk_scale, n_ctx, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, Q_DESC: tl.constexpr, KV_DESC: tl.constexpr,
               WS: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh.to(tl.int64) * n_ctx * HEAD_DIM
    if Q_DESC:
        q = Q.load([bh * n_ctx + start_m * BLOCK_M, 0])
    else:
        q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in tl.range(0, n_ctx, BLOCK_N, warp_specialize=WS):
        if KV_DESC:
            k = K.load([bh * n_ctx + start_n, 0])
        else:
            cols = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        p, m_i, l_i, acc = online_softmax_step(tl.dot(q, k.T), m_i, l_i, acc, qk_scale)
        if KV_DESC:
            v = V.load([bh * n_ctx + start_n, 0])
        else:
            cols = start_n + tl.arange(0, BLOCK_N)
            v = tl.load(V + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
    tl.store(M + bh * n_ctx + rows, m_i + tl.math.log2(l_i))
    out = acc / l_i[:, None]
    tl.store(O + base + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty))


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Send file descriptor 2 (where MLIR writes its reproducers) to `path` for the block."""
    saved = os.dup(2)
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _reason(log: str, exc: BaseException) -> str:
    """The compiler's own first error line (LLVM error, failed op or assertion)."""
    for line in log.splitlines():
        if (
            "LLVM ERROR" in line
            or "Assertion" in line
            or (" error: " in line and "pipeline" not in line)
        ):
            return line.split(" error: ")[-1].strip()[:200]
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


FORMS = {
    "pointers": (False, False),
    "kv-descriptors": (False, True),
    "qkv-descriptors": (True, True),
}


def probe(form: str, num_warps: int, ws: bool, head_dim: int = 128, block_n: int = 128) -> dict:
    """Compile one variant for sm_90; facts of the loop that holds the MMAs (the consumer's loop
    when specialized), or `error` when Triton rejects it."""
    q_desc, kv_desc = FORMS[form]
    desc = f"tensordesc<bf16[{block_n}, {head_dim}]>"
    sig: dict[str, str] = {
        "Q": f"tensordesc<bf16[{BLOCK_M}, {head_dim}]>" if q_desc else "*bf16",
        "K": desc if kv_desc else "*bf16", "V": desc if kv_desc else "*bf16",
        "O": "*bf16", "M": "*fp32", "qk_scale": "fp32", "n_ctx": "i32",
    }  # fmt: skip
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "Q_DESC": q_desc,
              "KV_DESC": kv_desc, "WS": ws}  # fmt: skip
    sig.update(dict.fromkeys(consts, "constexpr"))
    row: dict[str, Any] = {"form": form, "num_warps": num_warps, "warp_specialize": ws}
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        try:
            with _stderr_to(log.name):
                compiled = triton.compile(
                    ASTSource(fn=_probe_fwd, signature=sig, constexprs=consts),
                    target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": num_warps, "num_stages": 2},
                )
        except Exception as exc:  # noqa: BLE001 - a compile error is the result
            return row | {"compiled": False, "error": _reason(log.read(), exc)}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [str(cc.nvidia_tool("cuobjdump")), "-sass", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    loop = cc.analyze_sass(sass)["main_loop"]
    return row | {
        "compiled": True,
        "warps": compiled.metadata.num_warps,
        "setmaxnreg": compiled.asm["ptx"].count("setmaxnreg"),
        "loop_instructions": loop["instructions"],
        "hgmma": len(loop["hgmma"]),
        "mufu": loop["mufu"],
        "local": loop["local"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=128)
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, bf16, BLOCK_M {BLOCK_M}, BLOCK_N {args.block_n}, "
          f"head dim {args.head_dim}, 2 stages")  # fmt: skip
    for form in FORMS:
        for nw in (4, 8):
            for ws in (False, True):
                r = probe(form, nw, ws, args.head_dim, args.block_n)
                head = f"{form:16s} warps {nw} ws {str(ws):5s}"
                if not r["compiled"]:
                    print(f"{head} -> compile error: {r['error']}")
                    continue
                print(f"{head} -> {r['warps']:2d} warps launched, setmaxnreg {r['setmaxnreg']}, "
                      f"MMA loop {r['loop_instructions']} instructions, {r['hgmma']} HGMMA, "
                      f"{r['mufu']} MUFU, {r['local']} local (spill)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
