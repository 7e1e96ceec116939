"""Static performance model: FLOPs, bytes and a predicted time per kernel call on H100/H200.

    from bench.perf_model import predict_attention, predict_mntp, predict_infonce
    p = predict_attention(pairs=4 * 4096**2, tokens=4 * 4096, heads=16, kv_heads=16,
                          head_dim=128, dtype="bf16", pass_="fwd", gpu="h100")
    p.ms, p.tflops, p.bound, p.parts

The model (leads, not measurements; a GPU run of the benches prints it beside each measured
bidirlm row, so the run tests the model):

- **Work**: FLOPs from the op's formula (attention `4 * pairs * H * D` forward, 2.5x backward;
  MNTP `2 * rows * d * V` forward, 6x for the recomputing backward; InfoNCE `2 * B * M * d`
  forward, 3x backward), special-function ops (exp2, and 2 more per score with a tanh softcap),
  FP32 ALU ops per score (scale, max, subtract, sum, convert, masks), and the fewest bytes of
  device memory (every input read once, every output written once, plus materialized
  intermediates such as InfoNCE's `E` chunks).
- **Rates** (`GPUS`): dense bf16 989 TFLOP/s, tf32 494, FP32 FMA 67, special functions 3.9 Tops
  (16/clk/SM x 132 SMs), HBM 3.35 TB/s (H100 SXM) or 4.8 TB/s (H200); sustained fractions
  `MMA_EFFICIENCY` of the matrix peak by instruction: wgmma 0.70, mma.sync 0.70 x 2/3 (Hopper
  runs mma.sync at about 2/3 of the wgmma rate), FMA 0.70 of the FP32 peak.
- **Compiled facts** from the compile suite's sm_90 rows (`bench/results/compile-<triton>.jsonl`):
  the MMA kind of the op's kernels (a kernel with mma.sync, or an fp32 IEEE dot on FMA, gets that
  rate), spills (compute time x (1 + 0.25 + 0.25 per KiB of spill stores)), GPU-scope fences
  inside loops (each ~1,000 cycles per tile step: a `MEMBAR.GPU` drains the thread's outstanding
  memory operations, about one DRAM round trip) and occupancy (registers x threads and shared
  memory per program) for the fence term. Without a row, 16-bit dots are assumed wgmma with no
  spills and no fences.
- **Time** = max(compute, memory) + fences + 4 us per launch, where compute = MMA time + special
  function time + ALU time (summed: Triton's software pipeline overlaps some of it, warp
  specialization would overlap more, so this is pessimistic for a warp-specialized kernel).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_ghz: float
    bf16_tflops: float  # dense tensor-core peak (fp16 the same)
    tf32_tflops: float
    fp32_tflops: float  # FFMA, 2 FLOPs per instruction
    sfu_tops: float  # MUFU ops/s (ex2, rcp, ...)
    hbm_tbs: float
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_warps_per_sm: int = 64
    launch_us: float = 4.0


GPUS = {
    "h100": GPU("h100", 132, 1.83, 989.0, 494.0, 67.0, 3.9, 3.35),
    "h200": GPU("h200", 132, 1.83, 989.0, 494.0, 67.0, 3.9, 4.8),
}
MMA_EFFICIENCY = {"wgmma": 0.70, "mma.sync": 0.70 * 2 / 3, "fma": 0.70}
FENCE_CYCLES = 1000
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ALU_OPS_PER_SCORE = {"fwd": 6, "bwd": 12}  # FP32 non-MMA instructions per score element


@dataclass
class Prediction:
    op: str
    pass_: str
    gpu: str
    flops: float
    bytes: float
    ms: float
    bound: str  # "compute" | "memory" | "fences"
    parts: dict[str, float] = field(default_factory=dict)  # ms of each term
    facts: dict[str, Any] = field(default_factory=dict)  # compiled facts used

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12 if self.ms > 0 else 0.0


# --- compiled facts -------------------------------------------------------------------------------


def _results_dir() -> Path:
    return Path(os.environ.get("BIDIRLM_BENCH_RESULTS") or Path(__file__).parent / "results")


@functools.lru_cache(maxsize=4)
def compile_rows(path: str | None = None) -> tuple[dict[str, Any], ...]:
    """sm_90 compile rows (their `extra`) of the latest run in `path`, else of the newest
    `compile-<triton>.jsonl` under bench/results (the installed triton's first)."""
    if path is None:
        try:
            import importlib.metadata

            mine = _results_dir() / f"compile-{importlib.metadata.version('triton')}.jsonl"
        except Exception:  # noqa: BLE001 - no triton: any committed file
            mine = None
        files = sorted(_results_dir().glob("compile-*.jsonl"))
        chosen = mine if mine is not None and mine.exists() else (files[-1] if files else None)
        if chosen is None:
            return ()
        path = str(chosen)
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("suite") == "compile" and row.get("pass") != "host":
                rows.append(row)
    if not rows:
        return ()
    last = rows[-1]["run_id"]
    return tuple(
        r["extra"] for r in rows if r["run_id"] == last and r["extra"].get("target") == "sm90"
    )


def kernel_facts(case_label: str, pass_: str, rows: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """Facts of the kernels one op pass launches (`case_label` as the compile suite names cases:
    'attention bf16 hd128 dense', 'mntp_loss bf16 plain', 'infonce bf16 cosine'), merged:
    the slowest MMA kind, the largest spill, the fences of every kernel and the occupancy of the
    kernel with the most dots. Empty when the compile rows do not have the case."""
    passes = ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)
    mine = [
        r
        for r in rows
        if r.get("compiled") and r.get("pass") in passes and case_label in r["cases"]
    ]
    if not mine:
        return {}
    kinds = {r.get("mma") for r in mine if r.get("dots")}
    if any("mma.sync" in (k or "") for k in kinds):
        mma = "mma.sync"
    elif any(k == "none" for k in kinds):
        mma = "fma"
    else:
        mma = "wgmma"
    main = max(mine, key=lambda r: (r.get("dots") or 0, r.get("registers") or 0))
    cfg = main.get("config") or {}
    threads = 32 * int(cfg.get("num_warps", 4))
    fenced = max(mine, key=lambda r: r.get("fences_main_loop") or 0)
    return {
        "mma": mma,
        "spill_bytes": max(r.get("spill_bytes") or 0 for r in mine),
        "fences": sum(r.get("fences_main_loop") or 0 for r in mine),
        "fence_block": (fenced.get("config") or {}).get("BLOCK_M", 64)
        * (fenced.get("config") or {}).get("BLOCK_N", 64),
        "registers": main.get("registers") or 255,
        "threads": threads,
        "shared_bytes": main.get("shared_bytes") or 0,
        "kernels": sorted({r["kernel"] for r in mine}),
    }


def occupancy(gpu: GPU, registers: int, threads: int, shared_bytes: int) -> int:
    """Programs resident per SM, limited by registers, shared memory and warps."""
    by_regs = gpu.regs_per_sm // max(1, registers * threads)
    by_smem = gpu.smem_per_sm // shared_bytes if shared_bytes else 32
    by_warps = gpu.max_warps_per_sm // max(1, threads // 32)
    return max(1, min(by_regs, by_smem, by_warps))


# --- the model ------------------------------------------------------------------------------------


def _predict(
    op: str,
    pass_: str,
    gpu_name: str,
    *,
    flops: float,
    bytes_: float,
    sfu_ops: float,
    alu_ops: float,
    dtype: str,
    facts: dict[str, Any],
    tile_steps: float,
    launches: int,
    precision: str = "default",
) -> Prediction:
    gpu = GPUS[gpu_name]
    default_kind = "wgmma" if dtype in ("bf16", "fp16") else "fma"
    kind = facts.get("mma", default_kind)
    if dtype == "fp32" and kind == "wgmma":
        peak = gpu.tf32_tflops  # a tf32 dot on the tensor cores
    elif kind == "fma" or (dtype == "fp32" and precision == "ieee"):
        peak, kind = gpu.fp32_tflops, "fma"
    else:
        peak = gpu.bf16_tflops
    mma_ms = flops / (peak * 1e12 * MMA_EFFICIENCY[kind]) * 1e3
    sfu_ms = sfu_ops / (gpu.sfu_tops * 1e12) * 1e3
    alu_ms = alu_ops / (gpu.fp32_tflops / 2 * 1e12) * 1e3
    spill = facts.get("spill_bytes", 0)
    spill_factor = 1.0 + (0.25 + 0.25 * spill / 1024 if spill else 0.0)
    compute_ms = (mma_ms + sfu_ms + alu_ms) * spill_factor
    memory_ms = bytes_ / (gpu.hbm_tbs * 1e12) * 1e3
    fence_ms = 0.0
    if facts.get("fences"):
        occ = occupancy(gpu, facts["registers"], facts["threads"], facts["shared_bytes"])
        steps_per_slot = tile_steps / (gpu.sms * occ)
        fence_ms = steps_per_slot * facts["fences"] * FENCE_CYCLES / (gpu.clock_ghz * 1e9) * 1e3
    launch_ms = launches * gpu.launch_us * 1e-3
    ms = max(compute_ms, memory_ms) + fence_ms + launch_ms
    terms = {"compute": compute_ms, "memory": memory_ms, "fences": fence_ms}
    bound = max(terms, key=lambda k: terms[k])
    parts = {
        "mma_ms": mma_ms,
        "sfu_ms": sfu_ms,
        "alu_ms": alu_ms,
        "spill_factor": spill_factor,
        "memory_ms": memory_ms,
        "fence_ms": fence_ms,
        "launch_ms": launch_ms,
    }
    return Prediction(op, pass_, gpu_name, flops, bytes_, ms, bound, parts, {**facts, "mma": kind})


def _passes(pass_: str) -> tuple[str, ...]:
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be fwd, bwd or fwd+bwd, got {pass_!r}")
    return ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)


def _combine(preds: list[Prediction]) -> Prediction:
    if len(preds) == 1:
        return preds[0]
    first = preds[0]
    parts: dict[str, float] = {}
    for p in preds:
        for k, v in p.parts.items():
            if k != "spill_factor":
                parts[k] = parts.get(k, 0.0) + v
    bound = max(preds, key=lambda p: p.ms).bound
    return Prediction(first.op, "fwd+bwd", first.gpu, sum(p.flops for p in preds),
                      sum(p.bytes for p in preds), sum(p.ms for p in preds), bound, parts,
                      preds[-1].facts)  # fmt: skip


def predict_attention(
    *,
    pairs: float,
    tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str = "bf16",
    pass_: str = "fwd",
    gpu: str = "h100",
    softcap: bool = False,
    variant: str = "dense",
    rows: tuple[dict[str, Any], ...] | None = None,
) -> Prediction:
    """Attention over `pairs` visible (query, key) pairs per head, `tokens` query/key rows."""
    rows = compile_rows() if rows is None else rows
    elt = BYTES[dtype]
    label = f"attention {dtype} hd{head_dim} {variant}"
    preds = []
    for p in _passes(pass_):
        facts = kernel_facts(label, p, rows) or kernel_facts(
            f"attention {dtype} hd{head_dim} dense", p, rows
        )
        scores = pairs * heads
        q_o = tokens * heads * head_dim * elt
        kv = 2 * tokens * kv_heads * head_dim * elt
        lse = tokens * heads * 4
        if p == "fwd":
            flops = 4.0 * scores * head_dim
            bytes_ = 2 * q_o + kv + lse  # read q, k, v; write o, lse
            sfu = scores * (3 if softcap else 1)
            launches = 1
        else:
            flops = 10.0 * scores * head_dim
            # read q, k, v, o, do, lse; write dq, dk, dv (+ fp32 dq accumulator when atomic)
            bytes_ = 4 * q_o + 2 * kv + 2 * lse + tokens * heads * head_dim * 4
            sfu = scores * (3 if softcap else 1)
            launches = 2 + (1 if "deterministic" in variant else 0)
        alu = scores * ALU_OPS_PER_SCORE[p]
        steps = scores / max(1, facts.get("fence_block", 64 * 64))
        preds.append(
            _predict("attention", p, gpu, flops=flops, bytes_=bytes_, sfu_ops=sfu, alu_ops=alu,
                     dtype=dtype, facts=facts, tile_steps=steps, launches=launches)
        )  # fmt: skip
    return _combine(preds)


def predict_mntp(
    *,
    rows_labelled: int,
    tokens: int,
    d: int,
    vocab: int,
    dtype: str = "bf16",
    pass_: str = "fwd",
    gpu: str = "h100",
    bias: bool = False,
    softcap: bool = False,
    rows: tuple[dict[str, Any], ...] | None = None,
) -> Prediction:
    """MNTP loss on `rows_labelled` of `tokens` rows: lm_head `[V, d]` + cross-entropy."""
    rows = compile_rows() if rows is None else rows
    elt = BYTES[dtype]
    variant = "-".join(name for name, on in (("bias", bias), ("softcap", softcap)) if on) or "plain"
    preds = []
    for p in _passes(pass_):
        facts = kernel_facts(f"mntp_loss {dtype} {variant}", p, rows)
        logits = rows_labelled * vocab
        weight = vocab * d * elt
        hidden = rows_labelled * d * elt
        if p == "fwd":
            flops = 2.0 * logits * d
            bytes_ = weight + hidden + tokens * 8  # labels + loss
            alu, sfu, launches = logits * 4, logits * (3 if softcap else 1), 2
        else:  # recompute logits, dH = dZ W, dW = dZ^T H (fp32 dW written once)
            flops = 6.0 * logits * d
            bytes_ = 2 * weight + 2 * hidden + vocab * d * 4 + tokens * 8
            alu, sfu, launches = logits * 8, logits * (3 if softcap else 1), 3
        preds.append(
            _predict("mntp_loss", p, gpu, flops=flops, bytes_=bytes_, sfu_ops=sfu, alu_ops=alu,
                     dtype=dtype, facts=facts, tile_steps=logits / (128 * 128), launches=launches)
        )  # fmt: skip
    return _combine(preds)


def predict_infonce(
    *,
    queries: int,
    docs: int,
    d: int,
    dtype: str = "bf16",
    pass_: str = "fwd",
    gpu: str = "h100",
    normalize: bool = True,
    symmetric: bool = False,
    rows: tuple[dict[str, Any], ...] | None = None,
) -> Prediction:
    """In-batch InfoNCE: `queries [B, d]` against `docs [M, d]` (+ the reverse direction over the
    first B documents when symmetric)."""
    rows = compile_rows() if rows is None else rows
    elt = BYTES[dtype]
    label = f"infonce {dtype} {'cosine' if normalize else 'dot'}"
    logits = queries * docs + (queries * queries if symmetric else 0)
    preds = []
    for p in _passes(pass_):
        facts = kernel_facts(label, p, rows)
        inputs = (queries + docs) * d * elt
        if p == "fwd":
            flops, bytes_ = 2.0 * logits * d, inputs
            alu, sfu, launches = logits * 4, logits, 1 + int(symmetric)
        else:  # E chunks (written once, read by two GEMMs) + fp32 accumulators
            flops = 6.0 * logits * d
            bytes_ = 3 * inputs + 3 * logits * elt + (queries + docs) * d * 4 * 2
            alu, sfu = logits * 6, logits
            launches = 3 * max(1, math.ceil(queries / 2048) * math.ceil(docs / 2048))
        preds.append(
            _predict("infonce", p, gpu, flops=flops, bytes_=bytes_, sfu_ops=sfu, alu_ops=alu,
                     dtype=dtype, facts=facts, tile_steps=logits / (128 * 128), launches=launches)
        )  # fmt: skip
    return _combine(preds)


def gpu_of(device_name: str) -> str | None:
    """'h100' / 'h200' from a torch device name (None when the model has no such GPU)."""
    name = device_name.lower()
    for key in ("h200", "h100"):
        if key in name:
            return key
    return None


__all__ = [
    "GPUS",
    "Prediction",
    "compile_rows",
    "kernel_facts",
    "occupancy",
    "predict_attention",
    "predict_mntp",
    "predict_infonce",
    "gpu_of",
    "attention_extra",
    "mntp_extra",
    "infonce_extra",
]


# --- row helpers for the benches ------------------------------------------------------------------


def _row_extra(pred: Any) -> dict[str, Any]:
    """`predicted_ms` (+ for which GPU and what bounds it) for a bench row; a model failure is
    reported in the row, never raised into a GPU run."""
    try:
        p = pred()
    except Exception as exc:  # noqa: BLE001 - recorded, not hidden
        return {"predicted_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"predicted_ms": round(p.ms, 4), "predicted_for": p.gpu, "predicted_bound": p.bound}


def _target_gpu(device_label: str) -> str:
    return gpu_of(device_label) or "h100"  # other devices: what an H100 would take


def _dtype_name(dtype: Any) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[str(dtype).split(".")[-1]]


def attention_extra(
    device_label: str, impl: str, case: str, q: Any, flops_fwd: float, pass_: str
) -> dict[str, Any]:
    """Prediction fields of one bidirlm attention bench row (q `[B, S, H, D]` or `[T, H, D]`)."""
    heads, head_dim = q.shape[-2], q.shape[-1]
    variant = "packed" if "packed" in impl else "kpm" if "padded" in impl else "dense"
    if "-win" in case:
        variant = "window"
    return _row_extra(
        lambda: predict_attention(
            pairs=flops_fwd / (4.0 * heads * head_dim), tokens=q.numel() // (heads * head_dim),
            heads=heads, kv_heads=heads, head_dim=head_dim, dtype=_dtype_name(q.dtype),
            pass_=pass_, gpu=_target_gpu(device_label), variant=variant,
        )
    )  # fmt: skip


def mntp_extra(
    device_label: str, rows: int, tokens: int, d: int, vocab: int, dtype: Any, pass_: str
) -> dict[str, Any]:
    return _row_extra(
        lambda: predict_mntp(rows_labelled=rows, tokens=tokens, d=d, vocab=vocab,
                             dtype=_dtype_name(dtype), pass_=pass_, gpu=_target_gpu(device_label))
    )  # fmt: skip


def infonce_extra(
    device_label: str, queries: int, docs: int, d: int, dtype: Any, pass_: str
) -> dict[str, Any]:
    return _row_extra(
        lambda: predict_infonce(queries=queries, docs=docs, d=d, dtype=_dtype_name(dtype),
                                pass_=pass_, gpu=_target_gpu(device_label))
    )  # fmt: skip
