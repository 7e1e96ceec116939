"""Calibration of the K-loop MMA efficiency of the losses model (`bench/perf_model_losses.py`) on
the published H100 figures of a Triton GEMM we did not write.

    python -m bench.gemm_calibration            # the fit and the validation rows
    from bench.gemm_calibration import gemm_calibration, calibration_line

The kernel: the naive `matmul_kernel` of Triton's persistent-matmul tutorial
(09-persistent-matmul.py) with its fixed configs of late 2024 / early 2025, rebuilt with the same
tiling and loop structure in `bench/tutorial_matmul.py` and compiled for sm_90 with the installed
triton. Its time is PREDICTED with the per-SM accounting the losses model uses for a K loop
(`perf_model_losses.mntp_launches`):

- a K step (one BLOCK_M x BLOCK_N x BLOCK_K wgmma) takes max(its MMA clocks at efficiency e of
  the dense peak, the K loop body's instruction clocks per SM sub-partition);
- the code outside the loop (the longest path through it: prologue and epilogue) does not
  overlap the MMA: tile clocks = that path's clocks + K steps x step clocks;
- one program per SM (both configs: `resident_per_sm` 1 in the facts), programs list-scheduled
  in order on 132 SMs at 1.83 GHz (the H100 SXM's dense peak / (132 x 4096 FLOPs per clock));
- kernel time = max(makespan, HBM bytes / 3.35 TB/s), with no launch gap: the figures are
  proton's (CUPTI) kernel durations.

fp8 (e4m3) runs the wgmma at twice the fp16/bf16 rate per clock (8192 FLOPs per SM per clock);
e is the sustained fraction of whichever nominal rate applies. e is fitted by bisection on the
row marked `fit`, then every row is predicted at the fitted e, at 0.64 (the attention model's
eta, `bench/perf_model.py`) and at 0.70 (the losses model's prior `MMA_EFFICIENCY_PRIOR`).

Compile facts are cached in bench/results/gemm-calibration-<triton>.json (the tests read them, no
GPU and no compile needed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/gemm_calibration.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.perf_model_losses import (  # noqa: E402
    DEVICES,
    SM90_MMA_FLOPS_PER_CLK,
    SP_PER_SM,
    Ops,
    _makespan_us,
)

ATTENTION_ETA = 0.64  # bench/perf_model.py's eta (fitted on the tutorial attention forward)
PRIOR_ETA = 0.70  # bench/perf_model_losses.py's MMA_EFFICIENCY_PRIOR (not calibrated)
MMA_FLOPS_PER_CLK = {"fp16": SM90_MMA_FLOPS_PER_CLK, "fp8": 2 * SM90_MMA_FLOPS_PER_CLK}
ELEMENT_BYTES = {"fp16": 2, "fp8": 1}

# Published H100 figures of the tutorial's naive `matmul_kernel` (published numbers, not ours).
# Both threads print proton's tree (TFLOP/s, then time) of `python 09-persistent-matmul.py`;
# neither names the H100 variant (taken as SXM: 132 SMs) nor the config, which was then fixed in
# the tutorial (see bench/tutorial_matmul.py). M = N = 8192 in the tutorial's benchmark.
PUBLISHED: list[dict[str, Any]] = [
    {
        "name": "fp8 8192x8192x4096",
        "role": "fit",
        "dtype": "fp8",
        "shape": {"M": 8192, "N": 8192, "K": 4096},
        "tflops": 1208.855,
        "cublas_tflops": 1278.215,
        "source": "triton-lang/triton PR #5461 (peterbell10, 2024-12-19), "
        "https://github.com/triton-lang/triton/pull/5461",
    },
    {
        "name": "fp16 8192x8192x512",
        "role": "validation",
        "dtype": "fp16",
        "shape": {"M": 8192, "N": 8192, "K": 512},
        "tflops": 217.548,
        "cublas_tflops": 285.369,
        "source": "triton-lang/triton PR #5726 (Mogball, 2025-01), "
        "https://github.com/triton-lang/triton/pull/5726",
    },
]


def _facts_file() -> Path:
    version = importlib.metadata.version("triton")
    return Path(__file__).parent / "results" / f"gemm-calibration-{version}.json"


def gemm_facts(recompile: bool = False) -> dict[str, dict[str, Any]]:
    """Compile facts of the tutorial-equivalent GEMM per dtype (`tutorial_matmul`), cached in
    bench/results/gemm-calibration-<triton>.json; compiled only when missing."""
    path = _facts_file()
    facts = {} if recompile or not path.exists() else json.loads(path.read_text(encoding="utf-8"))
    missing = [d for d in MMA_FLOPS_PER_CLK if d not in facts]
    if not missing:
        return facts
    from bench import tutorial_matmul as tut  # triton compile: only when not cached

    for d in missing:
        facts[d] = tut.compile_tutorial_matmul(d)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return facts


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def predict(row: dict[str, Any], facts: dict[str, Any], eta: float, gpu: str = "h100") -> dict:
    """Predicted time and TFLOP/s of the tutorial-equivalent GEMM at `row`'s shape, with the
    losses model's K-loop accounting at MMA efficiency `eta` (see the module docstring)."""
    dev = DEVICES[gpu]
    cfg = facts["config"]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    m, n, k = row["shape"]["M"], row["shape"]["N"], row["shape"]["K"]
    w = facts["num_warps"] / SP_PER_SM
    mma_clk = 2.0 * bm * bn * bk / MMA_FLOPS_PER_CLK[row["dtype"]] / eta
    loop_clk = Ops(**facts["k_loop"]).clocks(w)
    steps = _cdiv(k, bk)
    outside_clk = Ops(**facts["through"]).clocks(w)
    tile_clk = outside_clk + steps * max(mma_clk, loop_clk)
    us_per_clk = 1.0 / (dev.clock_ghz * 1e3)
    programs = _cdiv(m, bm) * _cdiv(n, bn)
    span = _makespan_us([tile_clk * us_per_clk] * programs, dev.sms)
    nbytes = ELEMENT_BYTES[row["dtype"]] * (m * k + n * k + m * n)
    memory = nbytes / (dev.hbm_tbs * 1e12) * 1e6
    us = max(span, memory)
    return {
        "us": us,
        "tflops": 2.0 * m * n * k / (us * 1e-6) / 1e12,
        "waves": programs / dev.sms,
        "k_steps": steps,
        "step_binding": "mma" if mma_clk >= loop_clk else "loop instructions",
        "mma_clk_per_step": mma_clk,
        "loop_clk_per_step": loop_clk,
        "outside_clk": outside_clk,
        "mma_share": steps * mma_clk / tile_clk if mma_clk >= loop_clk else 0.0,
    }


def fit_eta(row: dict[str, Any], facts: dict[str, Any], gpu: str = "h100") -> float:
    """Bisection on e in (0.05, 1] so that `predict` lands on the row's published TFLOP/s
    (predicted TFLOP/s never falls as e grows)."""
    lo, hi = 0.05, 1.0
    if predict(row, facts, hi, gpu)["tflops"] < row["tflops"]:
        raise ValueError(f"{row['name']}: not reachable with e <= 1 (the loop or memory binds)")
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict(row, facts, mid, gpu)["tflops"] < row["tflops"]:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _err(pred: float, pub: float) -> float:
    return round(100.0 * (pred - pub) / pub, 1)


def gemm_calibration(gpu: str = "h100", facts: dict | None = None) -> dict[str, Any]:
    """{'eta': fitted e, 'source': the fitted figure, 'rows': per published figure its published
    and predicted TFLOP/s at the fitted e, at 0.64 and at 0.70, with errors in %}."""
    facts = facts or gemm_facts()
    fit = next(r for r in PUBLISHED if r["role"] == "fit")
    eta = fit_eta(fit, facts[fit["dtype"]], gpu)
    rows = []
    for r in PUBLISHED:
        f = facts[r["dtype"]]
        at = {e: predict(r, f, e, gpu) for e in (eta, ATTENTION_ETA, PRIOR_ETA)}
        p = at[eta]
        rows.append({
            "name": r["name"], "role": r["role"], "dtype": r["dtype"], "shape": r["shape"],
            "config": f["config"], "published_tflops": r["tflops"], "source": r["source"],
            "predicted_tflops": round(p["tflops"], 1), "error_pct": _err(p["tflops"], r["tflops"]),
            "predicted_at_0.64": round(at[ATTENTION_ETA]["tflops"], 1),
            "error_at_0.64_pct": _err(at[ATTENTION_ETA]["tflops"], r["tflops"]),
            "predicted_at_0.70": round(at[PRIOR_ETA]["tflops"], 1),
            "error_at_0.70_pct": _err(at[PRIOR_ETA]["tflops"], r["tflops"]),
            "k_steps": p["k_steps"], "waves": round(p["waves"], 2),
            "step_binding": p["step_binding"], "mma_share": round(p["mma_share"], 3),
            "clk": {"mma_per_step": round(p["mma_clk_per_step"]),
                    "loop_per_step": round(p["loop_clk_per_step"]),
                    "outside": round(p["outside_clk"])},
            "registers": f["registers"], "spills": f["spills"], "triton": f["triton"],
        })  # fmt: skip
    return {
        "eta": round(eta, 4),
        "source": f"tutorial 09 naive matmul_kernel {fit['name']} {fit['tflops']} TFLOP/s "
        f"({fit['source']})",
        "gpu": gpu,
        "rows": rows,
    }


def calibration_line(cal: dict[str, Any] | None = None) -> str:
    """One line for reports: the fitted K-loop efficiency and each published row's error."""
    c = cal or gemm_calibration()
    parts = [
        f"{r['name']} [{r['role']}] published {r['published_tflops']:.0f}, predicted "
        f"{r['predicted_tflops']:.0f} ({r['error_pct']:+.1f}%), at 0.64 "
        f"{r['predicted_at_0.64']:.0f} ({r['error_at_0.64_pct']:+.1f}%), at 0.70 "
        f"{r['predicted_at_0.70']:.0f} ({r['error_at_0.70_pct']:+.1f}%)"
        for r in c["rows"]
    ]
    return (
        f"GEMM K-loop calibration (H100, tutorial-equivalent GEMM, losses-model accounting): "
        f"e={c['eta']:.3f} fitted on the {c['source']}; TFLOP/s: " + "; ".join(parts)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recompile", action="store_true", help="recompile the cached facts")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = ap.parse_args(argv)
    cal = gemm_calibration(facts=gemm_facts(args.recompile))
    print(json.dumps(cal, indent=1) if args.json else calibration_line(cal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
