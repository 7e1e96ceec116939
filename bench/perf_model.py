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
    """sm_90 compile rows (their `extra`) in `path`, else in the newest `compile-<triton>.jsonl`
    under bench/results (the installed triton's first): for each case label, the rows of the
    latest run that compiled it."""
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
    # per case label, the newest run that compiled it (a run of one op's suite does not hide the
    # other ops' rows of an earlier run)
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["extra"].get("target") == "sm90":
            runs.setdefault(r["run_id"], []).append(r["extra"])
    covered: set[str] = set()
    picked: list[dict[str, Any]] = []
    for run_id in reversed(list(runs)):
        labels = {c for e in runs[run_id] for c in e.get("cases", [])}
        new = labels - covered
        picked += [e for e in runs[run_id] if new & set(e.get("cases", []))]
        covered |= labels
    return tuple(picked)


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


# --- SASS-level kernel model (attention; reusable by any wgmma kernel) -------------------------
#
# Per program and per trip of the kernel's main loop (the compile suite's `main_loop` facts: the
# innermost loop with the most matrix instructions, as one warp executes it), in SM cycles:
#   peak  = warpgroups * sum over HGMMA of (M/64) * N * (K/16) / 2
#           (an SM's tensor cores do 2048 bf16 MACs per cycle: m64nNk16 takes N/2 cycles)
#   smem  = (warpgroups * sum of the HGMMA operand bytes read from shared memory (A when it is not
#           in registers, always B) + warps * (LDS/LDSM/STS bytes + 128 B per LDL/STL)) / 128
#           (128 B per cycle per SM)
#   mma   = max(peak, smem) / eta   (FEED_LIMITS_WGMMA: a wgmma whose operands need more than
#           128 B/clk runs at the feed rate, and the sustained fraction eta applies to that rate:
#           m64n32k16 with both operands in shared memory needs 192 B/clk at the nominal rate)
#   issue = warps * instructions / 4          (4 schedulers, one instruction per cycle each)
#   mufu  = warps * 32 * MUFU / 16            (16 special-function results per cycle per SM)
#   load  = LOAD_LATENCY if num_stages == 1   (the next tiles are not prefetched: one exposed
#           global-load round trip per trip)
#   serial = mma + max(issue, mufu) + load
# Without warp specialization the softmax/scaling work of a program does not overlap its own
# MMAs (`serial`). CO_RESIDENT_OVERLAP = False: the o programs resident on one SM do not hide one
# another's softmax either (cycles per trip for the o programs of an SM = o * serial); with True,
# they fill each other's gaps perfectly up to each unit's limit (max(o * max(mma, smem, issue,
# mufu), serial)), the model of 2026-12-07, which predicted the one published H100 figure of the
# tutorial's backward (a causal hd64 run at two programs per SM) 67% too fast. `calibration()`
# prints every combination's error on that figure, so the choice stays visible.
# Kernel time = waves * trips * that / clock (+ the launch), waves = ceil(programs / (SMs * o)).
# eta (the sustained fraction of the nominal wgmma rate) is the one fitted constant: fitted so
# the tutorial-equivalent forward (bench/tutorial_attention.py, compiled the same way) lands on
# its published H100 figure (one program per SM, tensor-bound: neither switch changes the fit);
# LOAD_LATENCY is assumed, not fitted.

TENSOR_MACS_PER_CYCLE = 2048  # bf16/fp16 dense, per SM (989 TFLOP/s = 132 SMs * 4096 * 1.83 GHz)
SMEM_BYTES_PER_CYCLE = 128
MUFU_PER_CYCLE = 16
LOAD_LATENCY = 800  # cycles of one global (mostly L2-hit) load round trip, assumed
ETA_PRIOR = 0.70  # the a-priori sustained wgmma fraction (the formula model's MMA_EFFICIENCY)
FEED_LIMITS_WGMMA = True  # eta applies to max(tensor rate, shared-memory feed rate)
CO_RESIDENT_OVERLAP = False  # programs on one SM do not hide each other's non-MMA work


@dataclass(frozen=True)
class Calibration:
    """The fitted constant of the SASS-level model and the tutorial row it came from."""

    eta: float  # sustained fraction of the nominal wgmma rate
    load_latency: float
    fitted_on: str  # what eta was fitted to (published figure + source)
    tutorial: dict[str, Any] = field(default_factory=dict)  # per pass: predicted/published


def loop_cycles(
    loop: dict[str, Any],
    num_warps: int,
    num_stages: int,
    eta: float,
    load_latency: float = LOAD_LATENCY,
    feed_limited: bool | None = None,
) -> dict[str, float]:
    """The terms above for one program's main-loop trip (`loop`: a `main_loop` facts dict)."""
    feed_limited = FEED_LIMITS_WGMMA if feed_limited is None else feed_limited
    wg = max(1, num_warps // 4)
    macs = sum((m / 64) * n * (k / 16) for m, n, k, _a in loop.get("hgmma", []))
    peak = wg * macs * 1024 / TENSOR_MACS_PER_CYCLE
    # mma.sync (HMMA.16816: 2048 MACs per warp instruction) at 2/3 of the wgmma rate
    peak += num_warps * loop.get("hmma", 0) * 2048 / (TENSOR_MACS_PER_CYCLE * 2 / 3)
    operand = sum(
        (0 if a_regs else m * k * 2) + n * k * 2 for m, n, k, a_regs in loop.get("hgmma", [])
    )
    local = 128 * loop.get("local", 0)
    smem = wg * operand + num_warps * (loop.get("lds_bytes", 0) + loop.get("sts_bytes", 0) + local)
    smem /= SMEM_BYTES_PER_CYCLE
    mma = (max(peak, smem) if feed_limited else peak) / eta
    issue = num_warps * loop.get("instructions", 0) / 4
    mufu = num_warps * 32 * loop.get("mufu", 0) / MUFU_PER_CYCLE
    load = load_latency if num_stages <= 1 else 0.0
    serial = max(mma, smem) + max(issue, mufu) + load
    return {
        "mma": mma,
        "smem": smem,
        "issue": issue,
        "mufu": mufu,
        "load": load,
        "serial": serial,
        "macs": wg * macs * 1024,
    }


def row_occupancy(gpu: GPU, row: dict[str, Any]) -> int:
    """Programs per SM of a compiled kernel: registers (allocated per warp in 256s), shared
    memory (+1 KiB reserved per program) and warps."""
    warps = int((row.get("config") or {}).get("num_warps", 4))
    regs = int(row.get("registers") or 255)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // max(1, per_warp * warps)
    shared = int(row.get("shared_bytes") or 0)
    by_smem = gpu.smem_per_sm // (shared + 1024) if shared else 32
    return max(1, min(by_regs, by_smem, gpu.max_warps_per_sm // warps, 32))


@dataclass
class KernelPrediction:
    kernel: str
    ms: float
    executed_flops: float  # the MMAs the kernel actually issues (recompute included)
    programs: int
    trips: float  # main-loop trips per program
    occupancy: int
    waves: int
    bound: str  # the term that sets the per-trip time
    cycles: dict[str, float] = field(default_factory=dict)


def predict_kernel(
    row: dict[str, Any],
    programs: int,
    trips: float,
    gpu: str = "h100",
    calib: Calibration | None = None,
    feed_limited: bool | None = None,
    overlap: bool | None = None,
) -> KernelPrediction:
    """Time of one launch of a compiled kernel (`row`: a compile-suite row with `main_loop`)
    running `programs` programs of `trips` main-loop trips each (`feed_limited`, `overlap`:
    FEED_LIMITS_WGMMA and CO_RESIDENT_OVERLAP unless given)."""
    g = GPUS[gpu]
    calib = calib or calibration()
    overlap = CO_RESIDENT_OVERLAP if overlap is None else overlap
    cfg = row.get("config") or {}
    warps, stages = int(cfg.get("num_warps", 4)), int(cfg.get("num_stages", 1))
    c = loop_cycles(
        row.get("main_loop") or {}, warps, stages, calib.eta, calib.load_latency, feed_limited
    )
    occ = row_occupancy(g, row)
    occ = min(occ, max(1, math.ceil(programs / g.sms)))  # fewer programs than slots
    units = max(c["mma"], c["smem"], c["issue"], c["mufu"])
    per_trip = max(occ * units, c["serial"]) if overlap else occ * c["serial"]
    if overlap:
        terms = {
            "mma": occ * c["mma"],
            "smem": occ * c["smem"],
            "issue": occ * c["issue"],
            "mufu": occ * c["mufu"],
            "latency": c["serial"],
        }
    else:  # the largest link of the serial chain (mma includes a shared-memory-fed wgmma)
        terms = {
            "mma": c["mma"],
            "issue": c["issue"],
            "mufu": c["mufu"],
            "latency": c["load"],
        }
    bound = max(terms, key=lambda k: terms[k])
    waves = math.ceil(programs / (g.sms * occ))
    ms = waves * trips * per_trip / (g.clock_ghz * 1e9) * 1e3 + g.launch_us * 1e-3
    flops = 2.0 * c["macs"] * trips * programs
    return KernelPrediction(
        row.get("kernel", "?"),
        ms,
        flops,
        programs,
        trips,
        occ,
        waves,
        bound,
        {**c, "per_trip": per_trip},
    )


def fixed_max_forward(
    row: dict[str, Any],
    programs: int,
    trips: float,
    gpu: str = "h100",
    calib: Calibration | None = None,
) -> KernelPrediction:
    """`predict_kernel` for an attention forward. A FIXED_MAX forward runs one key block per
    program with the online softmax (the first interior block, which sets the row maxima) before
    its main loop: that trip is charged at the row's `longest_loop` (the longest body among the
    loops with the most matrix instructions: at least as long as that block's), the others at
    `main_loop`. Rows without FIXED_MAX, or compiled before `longest_loop` was recorded: every
    trip at `main_loop`."""
    main = predict_kernel(row, programs, trips, gpu, calib)
    slow = row.get("longest_loop")
    if not (row.get("config") or {}).get("FIXED_MAX") or not slow or trips < 2:
        return main
    first = predict_kernel({**row, "main_loop": slow}, programs, 1, gpu, calib)
    rest = predict_kernel(row, programs, trips - 1, gpu, calib)
    launch_ms = GPUS[gpu].launch_us * 1e-3
    return KernelPrediction(
        main.kernel,
        first.ms + rest.ms - launch_ms,
        first.executed_flops + rest.executed_flops,
        programs,
        trips,
        main.occupancy,
        main.waves,
        main.bound,
        {**main.cycles, "first_trip": first.cycles["per_trip"]},
    )


def _memory_ms(gpu: str, nbytes: float) -> float:
    g = GPUS[gpu]
    return nbytes / (g.hbm_tbs * 1e12) * 1e3 + g.launch_us * 1e-3


# --- calibration on the tutorial kernel -----------------------------------------------------------


def _calibration_file() -> Path:
    import importlib.metadata

    version = importlib.metadata.version("triton")
    return Path(__file__).parent / "results" / f"perf-calibration-{version}.json"


def tutorial_facts(recompile: bool = False) -> dict[str, dict[str, Any]]:
    """Compile facts of the tutorial-equivalent kernels (bench/tutorial_attention.py) for sm_90
    with the installed triton: 'fwd' and 'bwd' at head dim 128, 'bwd_hd64' (the backward at the
    shape of its published figure); cached in bench/results/perf-calibration-<triton>.json."""
    path = _calibration_file()
    facts = {} if recompile or not path.exists() else json.loads(path.read_text(encoding="utf-8"))
    if all(k in facts for k in ("fwd", "bwd", "bwd_hd64")):
        return facts
    from bench import tutorial_attention as tut  # triton compile: only when not cached

    if "fwd" not in facts or "bwd" not in facts:
        facts.update(tut.compile_tutorial())
    if "bwd_hd64" not in facts:
        facts["bwd_hd64"] = tut.compile_tutorial(PUBLISHED_TUTORIAL_BWD["head_dim"])["bwd"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)
    return facts


def _tutorial_kernels(
    facts: dict[str, dict[str, Any]], gpu: str, calib: Calibration
) -> dict[str, KernelPrediction]:
    from bench import tutorial_attention as tut

    shp = tut.TUTORIAL_SHAPE
    bh, n = shp["batch"] * shp["heads"], shp["seqlen"]
    fwd = facts["fwd"]
    bm, bn = fwd["config"]["BLOCK_M"], fwd["config"]["BLOCK_N"]
    out = {"fwd": predict_kernel(fwd, math.ceil(n / bm) * bh, n / bn, gpu, calib)}
    bwd = facts["bwd"]
    cfg = bwd["config"]
    # one launch, two loops per program: dK/dV over n / BLOCK_M1 query blocks, then dQ over
    # n / BLOCK_N2 key blocks; the main-loop facts are the dK/dV loop's (the one with more
    # MMAs); the dQ loop is charged as its share of the MMAs (3 of 7 GEMMs) at the same rate.
    programs = math.ceil(n / cfg["BLOCK_N1"]) * bh
    dkdv = predict_kernel(bwd, programs, n / cfg["BLOCK_M1"], gpu, calib)
    dkdv.ms = (dkdv.ms - GPUS[gpu].launch_us * 1e-3) * 7 / 4 + GPUS[gpu].launch_us * 1e-3
    dkdv.executed_flops *= 7 / 4
    out["bwd"] = dkdv
    return out


def _useful_flops(batch: int, heads: int, seqlen: int, head_dim: int, pass_: str) -> float:
    f = 4.0 * batch * heads * seqlen * seqlen * head_dim
    return f if pass_ == "fwd" else 2.5 * f


# The one published H100 figure of the tutorial's backward found (a published number, not ours).
# The tutorial's backward kernel computes causal attention only (its benchmark skips non-causal
# backward; tritonbench forces --causal for it), so the figure is causal, counted in the tutorial's
# convention (half of 2.5 x 4*B*H*N^2*D). Kernel of that run: tritonbench's copy of the tutorial
# at commit e7c7d99 (blocks 32/128/128/32, 4 warps, 5 stages, diagonal in 16-row steps), the same
# loops as bench/tutorial_attention.py's `_tut_bwd` plus the masked diagonal blocks.
PUBLISHED_TUTORIAL_BWD = {
    "tflops": 264.718,
    "batch": 4,
    "heads": 32,
    "seqlen": 16384,
    "head_dim": 64,
    "source": "meta-pytorch/tritonbench PR #83 (2024-12-05), triton_tutorial_flash_v2 --bwd "
    "--causal, fp16; H100, variant not stated",
}


def _tutorial_bwd_causal_tflops(
    row: dict[str, Any], gpu: str, calib: Calibration, predict: Any = None
) -> float:
    """Predicted TFLOP/s of the tutorial backward on causal attention at PUBLISHED_TUTORIAL_BWD's
    shape. Program p of n/BLOCK_N1 runs dK/dV over the n - BLOCK_N1*(p+1) query rows past its
    diagonal block and dQ over the BLOCK_M2*p keys before it, plus the diagonal block in both
    loops (charged at its MMA share, the same rate: optimistic for its 16-row steps); the mean is
    (n + BLOCK_N1) / 2 rows per loop, with the dQ loop charged as _tutorial_kernels does."""
    shp = PUBLISHED_TUTORIAL_BWD
    cfg = row["config"]
    n, bh = shp["seqlen"], shp["batch"] * shp["heads"]
    programs = math.ceil(n / cfg["BLOCK_N1"]) * bh
    predict = predict or predict_kernel
    k = predict(row, programs, (n + cfg["BLOCK_N1"]) / 2 / cfg["BLOCK_M1"], gpu, calib)
    launch = GPUS[gpu].launch_us * 1e-3
    ms = (k.ms - launch) * 7 / 4 + launch
    useful = 0.5 * _useful_flops(shp["batch"], shp["heads"], n, shp["head_dim"], "bwd")
    return useful / (ms * 1e-3) / 1e12


@functools.lru_cache(maxsize=4)
def calibration(gpu: str = "h100") -> Calibration:
    """Fit eta so the tutorial-equivalent forward hits its published H100 TFLOP/s (bisection);
    also predict the tutorial backward with that eta and the forward with the prior eta."""
    from bench import tutorial_attention as tut

    facts = tutorial_facts()
    shp = tut.TUTORIAL_SHAPE
    useful = {
        p: _useful_flops(shp["batch"], shp["heads"], shp["seqlen"], shp["head_dim"], p)
        for p in ("fwd", "bwd")
    }
    target = tut.PUBLISHED_TUTORIAL_H100["fwd"]

    def tflops(eta: float, pass_: str) -> float:
        k = _tutorial_kernels(facts, gpu, Calibration(eta, LOAD_LATENCY, ""))[pass_]
        return useful[pass_] / (k.ms * 1e-3) / 1e12

    lo, hi = 0.05, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tflops(mid, "fwd") < target else (lo, mid)
    eta = (lo + hi) / 2
    rows = {}
    for p in ("fwd", "bwd"):
        published = tut.PUBLISHED_TUTORIAL_H100.get(p)
        predicted = tflops(eta, p)
        prior = tflops(ETA_PRIOR, p)
        rows[p] = {
            "predicted_tflops": round(predicted, 1),
            "prior_tflops": round(prior, 1),  # with the a-priori eta, before the fit
            "published_tflops": published,
            "error": None if published is None else round(predicted / published - 1, 4),
            "prior_error": None if published is None else round(prior / published - 1, 4),
            "source": tut.PUBLISHED_SOURCE.get(p, "no published H100 figure found"),
            "registers": facts[p].get("registers"),
            "spill_bytes": facts[p].get("spill_bytes"),
        }
    # the backward again, at the shape (and causal mask) of its one published H100 figure
    pub = PUBLISHED_TUTORIAL_BWD["tflops"]
    row64 = facts["bwd_hd64"]
    predicted = _tutorial_bwd_causal_tflops(row64, gpu, Calibration(eta, LOAD_LATENCY, ""))
    prior = _tutorial_bwd_causal_tflops(row64, gpu, Calibration(ETA_PRIOR, LOAD_LATENCY, ""))
    # the model's two contested switches, each combination on the same published figure (the
    # forward fit does not move: its kernel runs one program per SM, tensor-bound)
    variants = {}
    for feed in (True, False):
        for overlap in (False, True):

            def pk(*a: Any, _f: bool = feed, _o: bool = overlap, **k: Any) -> KernelPrediction:
                return predict_kernel(*a, **k, feed_limited=_f, overlap=_o)

            v = _tutorial_bwd_causal_tflops(row64, gpu, Calibration(eta, LOAD_LATENCY, ""), pk)
            name = f"feed-limited wgmma {'on' if feed else 'off'}, co-resident overlap " + (
                "on" if overlap else "off"
            )
            variants[name] = round(v / pub - 1, 4)
    rows["bwd_published"] = {
        "variants": variants,
        "predicted_tflops": round(predicted, 1),
        "prior_tflops": round(prior, 1),
        "published_tflops": pub,
        "error": round(predicted / pub - 1, 4),
        "prior_error": round(prior / pub - 1, 4),
        "source": PUBLISHED_TUTORIAL_BWD["source"],
        "registers": row64.get("registers"),
        "spill_bytes": row64.get("spill_bytes"),
    }
    fitted = f"tutorial forward {target} TFLOP/s ({tut.PUBLISHED_SOURCE['fwd']})"
    return Calibration(eta, LOAD_LATENCY, fitted, rows)


def calibration_line(calib: Calibration | None = None) -> str:
    """The calibration rows every report prints (two lines): the tutorial-equivalent kernels at
    the forward's published shape, then the backward at the shape of its published figure."""
    c = calib or calibration()
    parts = []
    for p, r in c.tutorial.items():
        if p == "bwd_published":
            continue
        pub = (
            "none at this shape"
            if r["published_tflops"] is None
            else f"{r['published_tflops']:.0f}"
        )
        err = "" if r["error"] is None else f" ({100 * r['error']:+.1f}%)"
        prior = (
            ""
            if r["prior_error"] is None
            else (
                f", {r['prior_tflops']:.0f} with the prior eta {ETA_PRIOR} "
                f"({100 * r['prior_error']:+.1f}%)"
            )
        )
        parts.append(f"{p} predicted {r['predicted_tflops']:.0f} vs published {pub}{err}{prior}")
    line = (
        f"calibration (H100, tutorial-equivalent kernel, fp16 B4 H32 D128 N4096): eta="
        f"{c.eta:.3f} fitted on the {c.fitted_on}; " + "; ".join(parts)
    )
    b = c.tutorial.get("bwd_published")
    if b is None:
        return line
    shp = PUBLISHED_TUTORIAL_BWD
    verdict = "within 15%" if abs(b["error"]) <= 0.15 else "NOT within 15%"
    return line + (
        f"\ncalibration bwd (H100, tutorial-equivalent backward, fp16 causal B{shp['batch']} "
        f"H{shp['heads']} D{shp['head_dim']} N{shp['seqlen']}): predicted "
        f"{b['predicted_tflops']:.0f} vs published {b['published_tflops']:.1f} ({b['source']}) "
        f"({100 * b['error']:+.1f}%, {verdict}), {b['prior_tflops']:.0f} with the prior eta "
        f"{ETA_PRIOR} ({100 * b['prior_error']:+.1f}%); the model's variants on it: "
        + ", ".join(f"{k} {100 * e:+.1f}%" for k, e in b.get("variants", {}).items())
    )


# FA2 / FA3 reference figures: published numbers (not ours, not predicted), H100 80GB SXM5, bf16/
# fp16, non-causal, seqlen 4k at 16k tokens per batch, from the FlashAttention-3 paper (Shah et
# al. 2024, arXiv:2407.08608), Figures 5 and 6 (bar labels). None: not in the published charts.
PUBLISHED_REFERENCE = {
    ("fwd", 64): {"FA2": 321, "FA3": 476},
    ("fwd", 128): {"FA2": 368, "FA3": 638},
    ("fwd", 256): {"FA2": 293, "FA3": 612},
    ("bwd", 64): {"FA2": None, "FA3": None},
    ("bwd", 128): {"FA2": 310, "FA3": 542},
    ("bwd", 256): {"FA2": None, "FA3": None},
}
TARGETS_TFLOPS = {("bwd", 128): 330, ("fwd", 128): 460, ("fwd", 64): 400, ("bwd", 256): 250}


def _attention_kernel_rows(rows: tuple[dict[str, Any], ...], label: str) -> dict[str, list[dict]]:
    """Compile rows of one case by kernel name (several for a kernel launched more than once per
    pass, e.g. the dV and dK launches of a split dK/dV), one per distinct config."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("compiled") and label in r.get("cases", []) and r.get("main_loop") is not None:
            same = out.setdefault(r["kernel"], [])
            if all(o.get("config") != r.get("config") for o in same):
                same.append(r)
    return out


def attention_kernels(
    batch: int,
    seqlen: int,
    heads: int,
    head_dim: int,
    pass_: str,
    rows: tuple[dict[str, Any], ...] | None = None,
    kv_heads: int | None = None,
    dtype: str = "bf16",
    gpu: str = "h100",
    deterministic: bool = False,
    calib: Calibration | None = None,
    variant: str = "dense",
) -> list[KernelPrediction] | None:
    """SASS-level predictions of every launch of a non-causal attention pass (the kernels the
    compile suite recorded for `variant`, e.g. 'dense', 'packed', 'gqa'; all keys visible), or
    None when the compile rows lack a kernel (or its main-loop facts)."""
    rows = compile_rows() if rows is None else rows
    kv_heads = kv_heads or heads
    if deterministic and variant == "dense":
        variant = "deterministic"
    label = f"attention {dtype} hd{head_dim} {variant}"
    ks = _attention_kernel_rows(rows, label)
    elt = BYTES[dtype]
    tokens = batch * seqlen
    group = heads // kv_heads
    if pass_ == "fwd":
        if "_attn_fwd_kernel" not in ks:
            return None
        r = ks["_attn_fwd_kernel"][0]
        bm, bn = r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]
        programs, trips = math.ceil(seqlen / bm) * heads * batch, math.ceil(seqlen / bn)
        return [fixed_max_forward(r, programs, trips, gpu, calib)]
    if "_attn_bwd_dkdv_kernel" not in ks:
        return None
    out = []
    pre = KernelPrediction(
        "_attn_bwd_preprocess_kernel",
        _memory_ms(gpu, 2 * tokens * heads * head_dim * elt + tokens * heads * 4),
        0.0,
        0,
        0,
        1,
        1,
        "memory",
    )
    out.append(pre)
    for r in ks["_attn_bwd_dkdv_kernel"]:
        bm, bn = r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]
        programs = math.ceil(seqlen / bn) * kv_heads * batch
        out.append(predict_kernel(r, programs, group * math.ceil(seqlen / bm), gpu, calib))
    if "_attn_bwd_dq_kernel" in ks:
        r = ks["_attn_bwd_dq_kernel"][0]
        bm, bn = r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]
        out.append(
            predict_kernel(
                r, math.ceil(seqlen / bm) * heads * batch, math.ceil(seqlen / bn), gpu, calib
            )
        )
    else:  # atomic dQ: zero the fp32 buffer, then convert it (read 4 B, write elt B)
        n = tokens * heads * head_dim
        out.append(
            KernelPrediction(
                "dq zero+convert",
                _memory_ms(gpu, n * (8 + elt)) + GPUS[gpu].launch_us * 1e-3,
                0.0,
                0,
                0,
                1,
                1,
                "memory",
            )
        )
    return out


def attention_report(
    rows: tuple[dict[str, Any], ...] | None = None,
    gpu: str = "h100",
    head_dims: tuple[int, ...] = (64, 128, 256),
    batch: int = 4,
    seqlen: int = 4096,
) -> str:
    """Predicted TFLOP/s per pass and kernel for dense non-causal bf16 attention at the issue's
    shape (heads = 2048 / D, as the FlashAttention papers), beside published FA2/FA3 figures and
    the targets, after the calibration row. PREDICTIONS from compiled SASS, not measurements."""
    rows = compile_rows() if rows is None else rows
    lines = [calibration_line(), ""]
    lines.append(
        f"| pass | hd | predicted TFLOP/s ({gpu}, B{batch} S{seqlen}) | target | "
        "FA2 published | FA3 published | kernels (ms, bound, occupancy, executed TFLOP/s) |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for d in head_dims:
        heads = max(1, 2048 // d)
        for p in ("fwd", "bwd"):
            ks = attention_kernels(batch, seqlen, heads, d, p, rows, gpu=gpu)
            ref = PUBLISHED_REFERENCE.get((p, d), {})
            target = TARGETS_TFLOPS.get((p, d))
            fa2 = ref.get("FA2") or "-"
            fa3 = ref.get("FA3") or "-"
            if ks is None:
                lines.append(
                    f"| {p} | {d} | (no compile rows) | {target or '-'} | {fa2} | {fa3} | |"
                )
                continue
            ms = sum(k.ms for k in ks)
            tf = _useful_flops(batch, heads, seqlen, d, p) / (ms * 1e-3) / 1e12
            detail = ", ".join(
                f"{k.kernel.replace('_attn_', '').replace('_kernel', '')} "
                f"{k.ms:.3f} {k.bound} o{k.occupancy}"
                + (f" {k.executed_flops / (k.ms * 1e-3) / 1e12:.0f}" if k.executed_flops else "")
                for k in ks
            )
            mark = "" if target is None else (" (meets)" if tf >= target else " (below)")
            lines.append(
                f"| {p} | {d} | {tf:.0f} | {target or '-'}{mark} | {fa2} | {fa3} | {detail} |"
            )
    lines += ["", "Variants (same shape; GQA-4: a quarter of the heads as kv heads; packed: the "
              "varlen kernels on equal lengths):", "", "| pass | hd | dense | packed | GQA-4 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for d in head_dims:
        heads = max(1, 2048 // d)
        for p in ("fwd", "bwd"):
            cells = []
            for variant, kv in (("dense", heads), ("packed", heads), ("gqa", max(1, heads // 4))):
                ks = attention_kernels(batch, seqlen, heads, d, p, rows, kv_heads=kv, gpu=gpu,
                                       variant=variant)  # fmt: skip
                if ks is None:
                    cells.append("-")
                    continue
                tf = _useful_flops(batch, heads, seqlen, d, p) / (sum(k.ms for k in ks) * 1e-3)
                cells.append(f"{tf / 1e12:.0f}")
            lines.append(f"| {p} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        sass = _sass_prediction(pairs, tokens, heads, kv_heads, head_dim, dtype, p, gpu, variant,
                                rows)  # fmt: skip
        if sass is not None:  # the SASS-level model of the compiled kernels
            preds.append(sass)
            continue
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


def _sass_prediction(pairs: float, tokens: int, heads: int, kv_heads: int, head_dim: int,
                     dtype: str, pass_: str, gpu: str, variant: str,
                     rows: tuple[dict[str, Any], ...]) -> Prediction | None:  # fmt: skip
    """`attention_kernels` for an op call given as visible pairs and tokens (sequence length
    pairs / tokens, batch tokens / length); None without main-loop facts for its kernels."""
    if not rows or variant not in ("dense", "deterministic", "packed", "kpm", "window"):
        return None
    seqlen = max(1, round(pairs / max(1, tokens)))
    batch = max(1, round(tokens / seqlen))
    det = variant == "deterministic"
    ks = attention_kernels(batch, seqlen, heads, head_dim, pass_, rows, kv_heads=kv_heads,
                           dtype=dtype, gpu=gpu, deterministic=det,
                           variant="dense" if det else variant)  # fmt: skip
    if ks is None and variant != "dense":  # a variant the suite did not compile: dense tiles
        ks = attention_kernels(batch, seqlen, heads, head_dim, pass_, rows, kv_heads=kv_heads,
                               dtype=dtype, gpu=gpu)  # fmt: skip
    if ks is None:
        return None
    ms = sum(k.ms for k in ks)
    scores = pairs * heads
    flops = 4.0 * scores * head_dim * (1.0 if pass_ == "fwd" else 2.5)
    slowest = max(ks, key=lambda k: k.ms)
    parts = {f"{k.kernel}_ms": k.ms for k in ks}
    parts["executed_flops"] = sum(k.executed_flops for k in ks)
    facts = {
        "model": "sass",
        "kernels": [k.kernel for k in ks],
        "calibration": calibration(gpu).eta,
    }
    return Prediction("attention", pass_, gpu, flops, 0.0, ms, slowest.bound, parts, facts)


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
    "Calibration",
    "KernelPrediction",
    "loop_cycles",
    "row_occupancy",
    "predict_kernel",
    "calibration",
    "calibration_line",
    "tutorial_facts",
    "attention_kernels",
    "attention_report",
    "PUBLISHED_REFERENCE",
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
