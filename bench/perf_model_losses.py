"""Static model of the loss kernels (MNTP, InfoNCE): predicted GPU time, host issue time, waves.

    python -m bench.perf_model_losses            # the target rows (H100 and H200, bf16)
    from bench.perf_model_losses import predict_mntp, predict_infonce, host_cost

Everything here is a PREDICTION for a GPU we do not have, from the launchers' own plans (the same
functions the launchers call: `_fwd_plan_of`, `_bwd_plan_of`, the launch configs), so the launch
counts, grids, chunk sizes and working memory are exact; the times rest on these assumptions:

- **Per-program time** = MMA FLOPs / (the SM's share of the dense bf16 peak x `MMA_EFFICIENCY`
  0.70, as `bench/perf_model.py`) + special-function ops (exp, tanh) / the SM's 16 per clock +
  FP32 ALU ops per logit (6 forward, 12 backward: scale, max, subtract, sum, masks, convert)
  / the SM's FP32 rate / 2, summed (no overlap: pessimistic for the exp/ALU terms).
- **One program per SM** resident: the compiled bf16 kernels take 162-254 registers x 256
  threads on sm_90 (8 warps; compile rows of the loss kernels), so a second program does not
  fit (the InfoNCE backward launches one program per SM by design). The programs of
  a launch are list-scheduled in program-id order on the SMs (a free SM takes the next program):
  the makespan includes the last wave's idle SMs, and `waves` = programs / SMs.
- **Kernel time** = max(makespan, HBM bytes / bandwidth) + `launch_gap_us` (4 us, the GPU-side
  gap between dependent launches, as `bench/perf_model.py`). Operands re-read by programs
  running together are counted once (L2 hits); materialized intermediates (dlogits, E) and
  float32 partials are counted at every read and write.
- **Host issue time** = Triton launches x the host cost of one launch: the Python of our
  launchers per launch, measured on this machine (`host_cost`: the op's forward + backward with
  the launches recorded instead of run, divided by their number), plus Triton's binding and the
  driver call, 4.5 us (measured on a GPU host for issue #27: not measurable here). The GPU
  stays busy when host issue time < GPU time (the host runs ahead).

Rows carry `predicted: True`; a GPU run of `bench/mntp_loss.py` / `bench/infonce.py` measures
them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

if __package__ in (None, ""):  # run as a script: python bench/perf_model_losses.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # FFMA peak (2 FLOPs per instruction)
    sfu_tops: float  # special-function results per second (16 per clock per SM)
    hbm_tbs: float
    launch_gap_us: float = 4.0


DEVICES = {
    "h100": Device("h100", 132, 989.0, 67.0, 3.9, 3.35),
    "h200": Device("h200", 132, 989.0, 67.0, 3.9, 4.8),
}
MMA_EFFICIENCY = 0.70
BINDING_US = 4.5  # Triton's argument binding + driver launch per call (GPU host, issue #27)
ALU_PER_LOGIT = {"fwd": 6, "bwd": 12}
TILE = 128  # the bf16 H100 tiles of both ops (fwd/dz/E tiles and GEMM tiles are 128 x 128)


@dataclass
class Launch:
    """One kernel launch: `programs` programs of `program_us` each (list-scheduled), `bytes`."""

    kernel: str
    programs: int
    program_us: float
    bytes: float
    ms: float = 0.0
    waves: float = 0.0


@dataclass
class OpPrediction:
    op: str
    shape: dict[str, Any]
    gpu: str
    launches: int
    fwd_launches: int
    bwd_launches: int
    gpu_ms: float
    fwd_ms: float
    bwd_ms: float
    host_us_per_launch: float
    host_ms: float
    executed_flops: float
    working_mb: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def host_below_gpu(self) -> bool:
        return self.host_ms < self.gpu_ms


def _program_us(dev: Device, mma_flops: float, sfu: float, alu: float) -> float:
    mma = mma_flops / (dev.bf16_tflops * 1e12 * MMA_EFFICIENCY / dev.sms)
    special = sfu / (dev.sfu_tops * 1e12 / dev.sms)
    fp32 = alu / (dev.fp32_tflops * 1e12 / 2 / dev.sms)
    return (mma + special + fp32) * 1e6


def _makespan_us(per_program: list[float], slots: int) -> float:
    """Greedy list scheduling in program order on `slots` SMs (how the hardware hands out CTAs)."""
    free = [0.0] * min(slots, max(1, len(per_program)))
    heapq.heapify(free)
    end = 0.0
    for t in per_program:
        start = heapq.heappop(free)
        end = max(end, start + t)
        heapq.heappush(free, start + t)
    return end


def _finish(dev: Device, launch: Launch, per_program: list[float]) -> Launch:
    span = _makespan_us(per_program, dev.sms)
    memory = launch.bytes / (dev.hbm_tbs * 1e12) * 1e6
    launch.ms = (max(span, memory) + dev.launch_gap_us) / 1e3
    launch.waves = len(per_program) / dev.sms
    return launch


# --- MNTP -----------------------------------------------------------------------------------------


def mntp_launches(
    tokens: int, labelled: int, vocab: int, d: int, *, gpu: str = "h100", softcap: bool = False
) -> tuple[list[Launch], list[Launch], dict[str, Any]]:
    """(forward launches, backward launches, plan facts) of one bf16 `mntp_loss` call with
    `num_labelled=labelled`, as the launchers plan it on an H100/H200."""
    from bidirlm.kernels import mntp_loss_triton as mt

    dev = DEVICES[gpu]
    fam = mt._CONFIGS["hopper"]
    nl = labelled
    fp = mt._fwd_plan_of(fam, nl, vocab, dev.sms, False)
    bp = mt._bwd_plan_of(fam, tokens, nl, vocab, d, 2, 2, True, True, dev.sms)
    if bp.two_pass:
        raise ValueError("the model covers the one-row-chunk plan (pass num_labelled)")
    sfu_per_logit = 1 + (2 if softcap else 0)  # exp (+ tanh's exp and divide)
    blocks = triton.cdiv(nl, TILE)
    # forward: units (split s, row block b), unit u on program u % P, in order
    per_split = triton.cdiv(triton.cdiv(vocab, TILE), fp.splits) * TILE
    unit_cols = [min(per_split, vocab - s * per_split) for s in range(fp.splits)]
    prog = [0.0] * fp.programs
    for u in range(fp.units):
        cols = max(0, unit_cols[u // blocks])
        logits = TILE * cols
        prog[u % fp.programs] += _program_us(
            dev, 2.0 * logits * d, logits * sfu_per_logit, logits * ALU_PER_LOGIT["fwd"]
        )
    fwd_bytes = vocab * d * 2 + tokens * d * 2 * 0.3 + fp.splits * tokens * 4 * 2
    fwd = [_finish(dev, Launch("_mntp_fwd_kernel", fp.programs, max(prog), fwd_bytes), prog)]
    merge_bytes = fp.splits * nl * 4 + nl * 16
    fwd.append(_finish(dev, Launch("_mntp_merge_kernel", triton.cdiv(nl, 64), 0.5, merge_bytes),
                       [0.5] * triton.cdiv(nl, 64)))  # fmt: skip
    bwd: list[Launch] = []
    d_tiles = triton.cdiv(d, TILE)
    for c0 in range(0, vocab, bp.vocab):
        cols = min(bp.vocab, vocab - c0)
        logits = TILE * TILE
        dz_us = _program_us(
            dev, 2.0 * logits * d, logits * sfu_per_logit, logits * ALU_PER_LOGIT["bwd"]
        )
        dz_programs = blocks * triton.cdiv(cols, TILE)
        dz_bytes = nl * cols * 2 + cols * d * 2 + nl * d * 2
        bwd.append(_finish(dev, Launch("_mntp_dz_kernel", dz_programs, dz_us, dz_bytes),
                           [dz_us] * dz_programs))  # fmt: skip
        k_rows = triton.cdiv(nl, 64) * 64
        dw_us = _program_us(dev, 2.0 * TILE * TILE * k_rows, 0, 0)
        dh_us = _program_us(dev, 2.0 * TILE * TILE * cols, 0, TILE * TILE * 3)
        n_dw, n_dh = triton.cdiv(cols, TILE) * d_tiles, blocks * d_tiles
        # dz read by each GEMM, W chunk and labelled H once, dH's float32 partial read + written
        g_bytes = 2 * nl * cols * 2 + cols * d * 2 + nl * d * 2 + nl * d * 8 + cols * d * 2
        per = [dw_us] * n_dw + [dh_us] * n_dh
        bwd.append(_finish(dev, Launch("_mntp_grads_kernel", len(per), max(per), g_bytes), per))
    facts = {
        "splits": fp.splits, "fwd_programs": fp.programs, "fwd_units": fp.units,
        "fwd_waves": round(fp.waves, 2), "chunk_rows": bp.rows, "chunk_vocab": bp.vocab,
        "chunks": triton.cdiv(vocab, bp.vocab), "dh_partial": ("buffer", "dH", "dH ignored rows")[
            bp.acc_mode],
        "dz_waves": round(bwd[0].waves, 2), "grads_waves": round(bwd[1].waves, 2),
    }  # fmt: skip
    return fwd, bwd, facts


def predict_mntp(
    tokens: int = 32768, fraction: float = 0.3, vocab: int = 151936, d: int = 1024, *,
    gpu: str = "h100", host_us: float | None = None, softcap: bool = False,
) -> OpPrediction:  # fmt: skip
    from bidirlm.kernels import mntp_loss_triton as mt

    nl = int(tokens * fraction)
    fwd, bwd, facts = mntp_launches(tokens, nl, vocab, d, gpu=gpu, softcap=softcap)
    host = host_us if host_us is not None else host_cost()["mntp_us_per_launch"] + BINDING_US
    n = len(fwd) + len(bwd)
    mem = mt.working_memory(tokens, vocab, d, 2, num_labelled=nl)
    fwd_ms, bwd_ms = sum(x.ms for x in fwd), sum(x.ms for x in bwd)
    return OpPrediction(
        "mntp_loss", {"tokens": tokens, "labelled": nl, "vocab": vocab, "d": d}, gpu, n,
        len(fwd), len(bwd), fwd_ms + bwd_ms, fwd_ms, bwd_ms, host, n * host / 1e3,
        8.0 * nl * vocab * d, max(mem["fwd"], mem["bwd"]) / 2**20, facts,
    )  # fmt: skip


# --- InfoNCE --------------------------------------------------------------------------------------


def predict_infonce(
    batch: int = 16384, docs: int = 65536, d: int = 2048, *, gpu: str = "h100",
    host_us: float | None = None,
) -> OpPrediction:  # fmt: skip
    """One direction (query -> documents), cosine, bf16, as `infonce_triton` plans it: the
    forward's (row block, column split) grid, and the backward's two persistent launches, each
    program owning blocks of 64 rows (dx) or columns (dy) and looping over the other side in
    E slices of `chunk` entries. The E slices (64 KB per program) stay in L2; the float32
    partial (64 x d per program, 69 MB at d = 2048) is counted in HBM at every read and write."""
    from bidirlm.kernels import infonce_triton as it

    dev = DEVICES[gpu]
    cfg = it.CONFIGS["hopper"]
    g = cfg.grad
    logits = TILE * TILE
    tile_us = _program_us(dev, 2.0 * logits * d, logits, logits * ALU_PER_LOGIT["fwd"])
    norm = [_finish(dev, Launch("_inv_norm_kernel", triton.cdiv(r, 16), 0.2, r * d * 2),
                    [0.2] * triton.cdiv(r, 16)) for r in (batch, docs)]  # fmt: skip
    row_blocks = triton.cdiv(batch, cfg.block_m)
    col_tiles = triton.cdiv(docs, cfg.block_n)
    splits = max(1, min(triton.cdiv(cfg.programs_per_sm * dev.sms, row_blocks), col_tiles))
    per = [tile_us * triton.cdiv(col_tiles, splits)] * (row_blocks * splits)
    fwd = norm + [_finish(dev, Launch("_infonce_fwd_kernel", len(per), per[0],
                                      (batch + docs) * d * 2), per)]  # fmt: skip
    bwd = list(norm)
    for n_own, n_oth in ((batch, docs), (docs, batch)):
        entries = g.block_o * n_oth  # E entries of one owned block
        block_us = _program_us(
            dev, 2.0 * entries * d * 2, entries, entries * ALU_PER_LOGIT["bwd"]
        )  # E recompute + the GEMM, exp and ALU per E entry
        blocks = triton.cdiv(n_own, g.block_o)
        programs = it._grad_programs(n_own, cfg, dev.sms)
        rounds = [0.0] * programs
        for b in range(blocks):
            rounds[b % programs] += block_us
        chunks = triton.cdiv(n_oth, g.chunk)
        partial = n_own * chunks * d * 8.0
        bytes_ = partial + n_own * d * 2 + n_oth * d * 2 * blocks / programs
        bwd.append(_finish(dev, Launch("_infonce_grad_kernel", programs, max(rounds), bytes_),
                           rounds))  # fmt: skip
    host = host_us if host_us is not None else host_cost()["infonce_us_per_launch"] + BINDING_US
    n = len(fwd) + len(bwd)
    work = it.working_memory(batch, docs, d, 2)
    eager = 8 * batch * docs
    fwd_ms, bwd_ms = sum(x.ms for x in fwd), sum(x.ms for x in bwd)
    return OpPrediction(
        "infonce", {"batch": batch, "docs": docs, "d": d}, gpu, n, len(fwd), len(bwd),
        fwd_ms + bwd_ms, fwd_ms, bwd_ms, host, n * host / 1e3, 10.0 * batch * docs * d,
        work / 2**20,
        {"fwd_splits": splits, "grad_programs": [x.programs for x in bwd[-2:]],
         "grad_waves": [round(x.waves, 2) for x in bwd[-2:]],
         "eager_mb_lower_bound": round(eager / 2**20, 1),
         "fraction_of_eager": round(work / eager, 5)},
    )  # fmt: skip


# --- host cost, measured here ---------------------------------------------------------------------

_HOST: dict[str, float] = {}


def host_cost(repeats: int = 5) -> dict[str, float]:
    """Microseconds of our launchers' Python per Triton launch on this machine: the op's forward
    + backward on small CPU tensors with the launches recorded instead of run, timed between
    consecutive launches of the backward's chunk loop (pure Python: argument tuples, grids,
    `kernel[grid]` up to Triton's `run`; the aten ops before the loop are excluded, they are
    asynchronous GPU work on a GPU). The median gap, best of `repeats`. Cached per process."""
    if _HOST:
        return _HOST
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from bench.compile_check import recording
    from bidirlm.kernels import infonce_loss, mntp_loss
    from bidirlm.kernels import mntp_loss_triton as mt

    g = torch.Generator().manual_seed(0)
    h = torch.randn(512, 64, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(8192, 64, generator=g, dtype=torch.bfloat16).requires_grad_()
    y = torch.randint(0, 8192, (512,), generator=g)
    y[torch.rand(512, generator=g) > 0.3] = -100
    q = torch.randn(512, 64, generator=g, dtype=torch.bfloat16).requires_grad_()
    dd = torch.randn(2048, 64, generator=g, dtype=torch.bfloat16).requires_grad_()
    nl = int((y != -100).sum())

    def run(fn, kernels: tuple[str, ...]) -> float:  # noqa: ANN001
        best = float("inf")
        for _ in range(repeats):
            stamps: list[tuple[str, float]] = []
            saved = InterpretedFunction.run  # under TRITON_INTERPRET=1 the kernels are these

            def timed(self, *a, _stamps=stamps, **k):  # noqa: ANN001, ANN202
                _stamps.append((self.fn.__name__, time.perf_counter()))  # recorded, not run

            with recording("nvidia-sm90"):
                JITFunction.run = timed
                InterpretedFunction.run = timed
                try:
                    fn()
                finally:
                    InterpretedFunction.run = saved
            gaps = sorted(
                (t1 - t0) * 1e6
                for (k0, t0), (k1, t1) in zip(stamps, stamps[1:])
                if k0 in kernels and k1 in kernels
            )
            if gaps:
                best = min(best, gaps[len(gaps) // 2])
        return best

    saved = mt._SCRATCH_BYTES
    mt._SCRATCH_BYTES = 512 * 256 * 2  # many vocabulary chunks
    try:
        _HOST["mntp_us_per_launch"] = run(
            lambda: mntp_loss(h, w, y, num_labelled=nl).backward(),
            ("_mntp_dz_kernel", "_mntp_grads_kernel"),
        )
    finally:
        mt._SCRATCH_BYTES = saved
    _HOST["infonce_us_per_launch"] = run(
        lambda: infonce_loss(q, dd).backward(),
        ("_inv_norm_kernel", "_infonce_fwd_kernel", "_infonce_grad_kernel"),
    )
    _HOST["binding_us_assumed"] = BINDING_US
    return _HOST


# --- rows -----------------------------------------------------------------------------------------

TARGETS = {
    "mntp d=1024": {"launches": 200, "gpu_ms": 20.0, "working_mb": 64.0},
    "mntp d=2048": {"launches": 200, "gpu_ms": 38.0, "working_mb": 64.0},
    "infonce 16k x 64k d=2048": {"launches_per_direction": 20, "fraction_of_eager": 0.01},
}


def row_extra(pred: OpPrediction) -> dict[str, Any]:
    """The predicted fields a bench row carries (labelled as predictions)."""
    return {
        "predicted": True, "basis": "bench/perf_model_losses.py (static model, no GPU)",
        "gpu": pred.gpu, "launches": pred.launches, "fwd_launches": pred.fwd_launches,
        "bwd_launches": pred.bwd_launches, "predicted_gpu_ms": round(pred.gpu_ms, 2),
        "predicted_fwd_ms": round(pred.fwd_ms, 2), "predicted_bwd_ms": round(pred.bwd_ms, 2),
        "host_us_per_launch": round(pred.host_us_per_launch, 2),
        "predicted_host_issue_ms": round(pred.host_ms, 2),
        "host_below_gpu": pred.host_below_gpu, "executed_flops": pred.executed_flops,
        "working_mb": round(pred.working_mb, 2), **pred.notes,
    }  # fmt: skip


def target_rows(gpu: str = "h100") -> list[dict[str, Any]]:
    rows = []
    for d in (1024, 2048):
        p = predict_mntp(d=d, gpu=gpu)
        t = TARGETS[f"mntp d={d}"]
        ok = p.launches <= t["launches"] and p.gpu_ms <= t["gpu_ms"]
        ok = ok and p.host_below_gpu and p.working_mb < t["working_mb"]
        rows.append({"case": f"mntp 32k tokens 30% V=151936 d={d}", "meets_targets": ok,
                     "targets": t, **row_extra(p)})  # fmt: skip
    p = predict_infonce(gpu=gpu)
    t = TARGETS["infonce 16k x 64k d=2048"]
    ok = p.fwd_launches <= t["launches_per_direction"]
    ok = ok and p.bwd_launches <= t["launches_per_direction"]
    ok = ok and p.notes["fraction_of_eager"] < t["fraction_of_eager"]
    rows.append({"case": "infonce one direction B=16384 M=65536 d=2048", "meets_targets": ok,
                 "targets": t, **row_extra(p)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=sorted(DEVICES), default="h100")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    print(f"host cost measured here: {json.dumps(host_cost())}")
    for row in target_rows(args.gpu):
        if args.json:
            print(json.dumps(row))
            continue
        print(f"[predicted {row['gpu']}] {row['case']}: {row['launches']} launches "
              f"({row['fwd_launches']} fwd + {row['bwd_launches']} bwd), GPU "
              f"{row['predicted_gpu_ms']} ms (fwd {row['predicted_fwd_ms']}), host issue "
              f"{row['predicted_host_issue_ms']} ms, working {row['working_mb']} MB; "
              f"meets targets: {row['meets_targets']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DEVICES", "OpPrediction", "asdict", "host_cost", "predict_infonce", "predict_mntp",
           "row_extra", "target_rows"]  # fmt: skip
