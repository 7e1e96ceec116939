"""Shared benchmark runner: timing, peak memory, TFLOP/s and JSON Lines result rows.

On a GPU, times with `triton.testing.do_bench` (median over repetitions after warm-up); on a CPU,
a wall-clock median fallback. Rows are appended to `bench/results/<device>.jsonl` with the fields
`suite, case, impl, pass, ms, tflops, peak_mem_mb, device, torch, triton, commit, run_id, time`
(plus free-form `extra`). All rows written by one `Runner` share a `run_id`, so ratios between
implementations are always taken from the same run.

Usage:
    runner = Runner("attention")
    runner.measure(case="hd128-s4096", impl="bidirlm", pass_="fwd", fn=lambda: f(q, k, v),
                   flops=4 * B * S * S * H * D)
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# BIDIRLM_BENCH_RESULTS redirects rows (e.g. smoke runs that must not land in the committed files).
RESULTS_DIR = Path(
    os.environ.get("BIDIRLM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
FIELDS = (
    "suite",
    "case",
    "impl",
    "pass",
    "ms",
    "tflops",
    "peak_mem_mb",
    "device",
    "torch",
    "triton",
    "commit",
    "run_id",
    "time",
)


def device_name(device: torch.device | None = None) -> str:
    """A file-name-safe device label: 'nvidia-h100-80gb-hbm3', 'cpu-x86_64', ..."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = f"cpu-{platform.machine() or 'unknown'}"
    return re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def time_cpu(fn: Callable[[], Any], warmup: int = 1, rep: int = 5) -> float:
    """Median wall-clock milliseconds of `fn()` on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(rep, 1)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_gpu(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds with triton.testing.do_bench (needs a GPU)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


class Runner:
    """Measures callables and appends result rows that share one run_id."""

    def __init__(
        self,
        suite: str,
        *,
        device: torch.device | str | None = None,
        results_dir: Path | str | None = None,
        cpu_rep: int = 5,
        filename: str | None = None,
    ) -> None:
        self.suite = suite
        self.filename = filename  # default: <device>.jsonl
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.results_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
        self.cpu_rep = cpu_rep
        self.run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self.stamp = {
            "device": device_name(self.device),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "commit": git_commit(),
            "run_id": self.run_id,
        }
        self.rows: list[dict[str, Any]] = []

    @property
    def path(self) -> Path:
        return self.results_dir / (self.filename or f"{self.stamp['device']}.jsonl")

    def _peak_reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_mb(self, fn: Callable[[], Any]) -> float | None:
        """Peak memory of one call above what was allocated before it (GPU), else None."""
        if self.device.type != "cuda":
            return None
        self._peak_reset()
        base = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def measure(
        self,
        *,
        case: str,
        impl: str,
        pass_: str,
        fn: Callable[[], Any],
        flops: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Time `fn`, measure its peak memory, record and return the row.

        A failing implementation (e.g. out of memory) is recorded with `ms=None` and the error in
        `extra.error`, so a table still shows it side by side.
        """
        error = None
        ms = peak = None
        try:
            peak = self._peak_mb(fn)
            if self.device.type == "cuda":
                ms = time_gpu(fn)
            else:
                ms = time_cpu(fn, rep=self.cpu_rep)
        except Exception as exc:  # noqa: BLE001 - recorded in the row, not hidden
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        extra = dict(extra or {})
        if error:
            extra["error"] = error
        return self.record(
            case=case, impl=impl, pass_=pass_, ms=ms, flops=flops, peak_mem_mb=peak, extra=extra
        )

    def record(
        self,
        *,
        case: str,
        impl: str,
        pass_: str,
        ms: float | None,
        flops: float | None = None,
        peak_mem_mb: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append one row (already measured) to the results file and return it."""
        tflops = None
        if flops is not None and ms is not None and ms > 0:
            tflops = flops / (ms * 1e-3) / 1e12
        row = {
            "suite": self.suite,
            "case": case,
            "impl": impl,
            "pass": pass_,
            "ms": _round(ms),
            "tflops": _round(tflops),
            "peak_mem_mb": _round(peak_mem_mb),
            **self.stamp,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if extra:
            row["extra"] = extra
        self.results_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)
        label = f"{row['ms']:.3f} ms" if row["ms"] is not None else f"failed ({extra})"
        tf = f"  {row['tflops']:.1f} TFLOP/s" if row["tflops"] is not None else ""
        mem = f"  {row['peak_mem_mb']:.1f} MB" if row["peak_mem_mb"] is not None else ""
        if extra and extra.get("predicted_ms") is not None:  # bench/perf_model.py
            mem += f"  (predicted {extra['predicted_ms']:.3f} ms on {extra['predicted_for']})"
        print(f"[{self.suite}] {case:<28} {impl:<22} {pass_:<8} {label}{tf}{mem}", flush=True)
        return row


def _round(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.{digits}g}") if abs(x) < 1e4 else round(float(x), 1)


# --- FLOP formulas -------------------------------------------------------------------------------


def attention_flops(visible_pairs: float, heads: int, head_dim: int, pass_: str = "fwd") -> float:
    """FLOPs of attention: 4 * pairs * H * D forward (QK^T and PV, 2 FLOPs per MAC), 2.5x backward.

    `visible_pairs` counts only (query, key) pairs that are not masked: B*S*S for full dense
    attention, sum(len_i^2) for packed batches, fewer for windows.
    """
    fwd = 4.0 * visible_pairs * heads * head_dim
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def linear_ce_flops(rows: int, dim: int, vocab: int, pass_: str = "fwd") -> float:
    """lm_head + cross-entropy: 2*rows*d*V forward; backward computes dH and dW (2x forward)."""
    fwd = 2.0 * rows * dim * vocab
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[pass_]


def similarity_flops(queries: int, docs: int, dim: int, pass_: str = "fwd") -> float:
    """Similarity matrix: 2*B*M*d forward; backward gives dQ and dD (2x forward)."""
    fwd = 2.0 * queries * docs * dim
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[pass_]


def load_rows(path: Path | str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
