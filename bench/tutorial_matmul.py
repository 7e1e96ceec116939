"""A minimal GEMM kernel with the tiling and loop structure of Triton's one-tile-per-program
tutorial matmuls, written here for one purpose: calibrating the K-loop MMA efficiency of
`bench/perf_model_losses.py` against those kernels' *published* H100 figures
(`bench/gemm_calibration.py`). It is never used by the ops and never run on a GPU by the tests.
Two tutorial kernels are rebuilt (configs in `CONFIGS`, one key per published kernel):

- the naive `matmul_kernel` of 09-persistent-matmul.py, fixed-config version of late 2024 /
  early 2025 (keys 'fp16' and 'fp8');
- the `matmul_kernel` of the experimental Hopper tutorial 10 of 2023
  (10-experimental-tma-store-matrix-multiplication.py, earlier spelled "tmastg"; key
  'fp16-128x128x64-w4-s7'). Its single autotune config is 128 x 128 x 64, GROUP_M 8, 7 stages,
  4 warps (the same in the two stored versions of that file, commits 31b0aad and 29847e9 of
  triton-lang/triton); it loads through block pointers without any K mask (K % BLOCK_K == 0 is
  asserted) and writes a float32 C. On the 2023 compiler these block-pointer loads ran as
  ordinary async copies: "It only uses GMMA right now" (ThomasRaoux, triton issue #2339,
  2023-09-25, answering whether it used TMA), so our pointer loads without a K mask
  (`MASK_K=False`) are the same load path. Today's compiler is not the 2023 one: the SASS read
  here is what the installed triton makes of that structure.

Structure (our own code; same tiling and loop structure as the tutorial kernel):

- one program per BLOCK_M x BLOCK_N output tile, program ids grouped GROUP_M tile-rows at a time
  (the L2-friendly order of the matmul tutorials);
- a K loop of `cdiv(K, BLOCK_K)` steps: A and B tiles loaded through pointers (masked on K
  unless `MASK_K` is False),
  `acc += A @ B` in float32, both pointers advanced by BLOCK_K; the compiler pipelines the loads
  over `num_stages` buffers (cp.async) and issues the dot as wgmma on sm_90;
- epilogue: the accumulator cast to the output dtype (`out` in the config: the input dtype for
  tutorial 09, float32 for tutorial 10) and stored with a mask.

Tutorial 09's fixed launch configs (a copy of the tutorial of that period read for this; the
figures' own threads do not print them): fp16 128 x 256 x 64, GROUP_M 8, 3 stages, 8 warps;
fp8 (e4m3) 128 x 256 x 128, GROUP_M 8, 4 stages, 8 warps. Both tutorials' benchmarks pass B as
the transpose of a contiguous (N, K) tensor (B's K stride is 1), as `tutorial_launches` does.

`compile_tutorial_matmul()` compiles each config for sm_90 with the installed triton through the
compile suite's path (launch recorded on CPU tensors, specialized by Triton's binder, compiled),
then reads the SASS with the same analysis as the losses model (`analyze_kernel_sass`).
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

import torch
import triton
import triton.language as tl

from bench import compile_check as cc

# key -> launch config; "dtype" is the input dtype, "out" C's dtype, MASK_K whether the K loop's
# loads are masked (tutorial 09: yes; tutorial 10 of 2023: no, K % BLOCK_K == 0 is asserted)
CONFIGS: dict[str, dict[str, Any]] = {
    "fp16": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_stages": 3,
             "num_warps": 8, "dtype": "fp16", "out": "fp16", "MASK_K": True},
    "fp8": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_stages": 4,
            "num_warps": 8, "dtype": "fp8", "out": "fp8", "MASK_K": True},
    "fp16-128x128x64-w4-s7": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                              "num_stages": 7, "num_warps": 4, "dtype": "fp16", "out": "fp32",
                              "MASK_K": False},
}  # fmt: skip
DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}
_LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_stages", "num_warps", "MASK_K")


@triton.jit
def _tut_matmul(
    A, B, C, M, N, K,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MASK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_here = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % rows_here)
    tile_n = (pid % per_group) // rows_here

    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows/columns read row/column 0 (never stored): no mask on M/N in the loop
    rm = tl.max_contiguous(tl.multiple_of(tl.where(rm < M, rm, 0), BLOCK_M), BLOCK_M)
    rn = tl.max_contiguous(tl.multiple_of(tl.where(rn < N, rn, 0), BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    pa = A + rm[:, None] * s_am + rk[None, :] * s_ak
    pb = B + rk[:, None] * s_bk + rn[None, :] * s_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        if MASK_K:
            left = K - step * BLOCK_K
            a = tl.load(pa, mask=rk[None, :] < left, other=0.0)
            b = tl.load(pb, mask=rk[:, None] < left, other=0.0)
        else:  # the caller guarantees K % BLOCK_K == 0
            a = tl.load(pa)
            b = tl.load(pb)
        acc = tl.dot(a, b, acc)
        pa += BLOCK_K * s_ak
        pb += BLOCK_K * s_bk

    out = acc.to(C.dtype.element_ty)
    cm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(C + cm[:, None] * s_cm + cn[None, :] * s_cn, out,
             mask=(cm[:, None] < M) & (cn[None, :] < N))  # fmt: skip


def tutorial_launches(key: str, m: int = 512, n: int = 512, k: int = 512) -> list[cc.Launch]:
    """The tutorial-equivalent launch for config `key` (a key of `CONFIGS`) on CPU tensors,
    recorded (not run); sizes are multiples of 16 (and of BLOCK_K) and B is K-contiguous, as in
    the tutorials' benchmarks, so the specialization (divisibility, unit strides) is that of the
    published runs."""
    cfg = CONFIGS[key]
    t = DTYPES[cfg["dtype"]]
    a = torch.empty(m, k, dtype=t)
    b = torch.empty(n, k, dtype=t).T  # (K, N) view of a contiguous (N, K) tensor
    c = torch.empty(m, n, dtype=DTYPES[cfg["out"]])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    case = cc.Case("mntp_loss", "fp16", f"tutorial-matmul-{key}")
    with cc.recording(cc.TARGETS["sm90"][3]) as calls:
        _tut_matmul[grid](
            a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), **{x: cfg[x] for x in _LAUNCH_KEYS},
        )  # fmt: skip
    return [cc.Launch(case, fn, args, kw, g, ph) for fn, args, kw, g, ph in calls]


def _ops_dict(ops: Any) -> dict[str, int]:
    return {f: int(getattr(ops, f)) for f in ("total", "fp32", "imad", "alu", "xu")}


def compile_tutorial_matmul(key: str) -> dict[str, Any]:
    """Compile facts of the tutorial-equivalent GEMM for sm_90 with the installed triton, as the
    losses model charges a K loop: the K loop's instructions per iteration by pipe (`k_loop`),
    the longest path outside the loops through it (`through`), HGMMA per iteration, registers,
    spills, shared memory, warps."""
    from triton.compiler import ASTSource

    from bench.perf_model_losses import analyze_kernel_sass

    (launch,) = tutorial_launches(key)
    spec = cc.specialize(launch, "sm90")
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    compiled = triton.compile(src, target=cc.gpu_target("sm90"), options=spec.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = cc._run([cc.nvidia_tool("cuobjdump"), "-sass", f.name])
        usage = cc._run([cc.nvidia_tool("cuobjdump"), "-res-usage", f.name])
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    meta = compiled.metadata
    # sm_90 spells the fp8 wgmma QGMMA; the losses model's analysis counts HGMMA (both cost their
    # issue slot only there), so the fp8 listing is read with that one opcode renamed
    sass = re.sub(r"\bQGMMA\b", "HGMMA", sass)
    k = analyze_kernel_sass(
        spec.kernel, sass, regs, stack, int(getattr(meta, "shared", 0)), 32 * meta.num_warps
    )
    loops = k.k_loops()
    if len(loops) != 1:
        raise ValueError(f"{spec.kernel} ({key}): expected one K loop, found {loops}")
    (kl,) = loops
    cfg = CONFIGS[key]
    return {
        "kernel": spec.kernel,
        "dtype": cfg["dtype"],
        "out": cfg["out"],
        "config": {x: cfg[x] for x in _LAUNCH_KEYS if x != "MASK_K"},
        "mask_k": cfg["MASK_K"],
        "registers": regs,
        "spills": stack,
        "shared": int(getattr(meta, "shared", 0)),
        "num_warps": int(meta.num_warps),
        "resident_per_sm": k.resident_per_sm,
        "loops": len(k.loops),
        "k_loop_hgmma": k.loops[kl].hgmma,
        "k_loop": _ops_dict(k.loops[kl].own),
        "through": _ops_dict(k.through(kl)),
        "triton": triton.__version__,
    }
