"""`bidirlm bench`: lists suites without one, writes rows outside the source tree, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.plot import latest_run, plot_suite
from bench.runner import load_rows
from bidirlm.cli import main
from bidirlm.commands.bench import SUITES, default_results_dir

ROOT = Path(__file__).resolve().parents[2]
TRACKED = ROOT / "bench" / "results"


def _tracked_state() -> dict[str, int]:
    return {p.name: p.stat().st_size for p in TRACKED.glob("*.jsonl")}


def test_no_suite_lists_and_runs_nothing(capsys) -> None:
    before = _tracked_state()
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    for suite in SUITES:
        assert f"  {suite} " in out
    assert _tracked_state() == before


def test_default_results_folder_is_outside_the_source_tree(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("BIDIRLM_BENCH_RESULTS", raising=False)
    monkeypatch.setenv("BIDIRLM_CACHE", str(tmp_path))
    assert default_results_dir() == tmp_path / "bench-results"
    monkeypatch.delenv("BIDIRLM_CACHE")
    assert ROOT not in default_results_dir().parents


def test_quick_suite_with_plot_writes_rows_and_png_where_asked(tmp_path: Path) -> None:
    before = _tracked_state()
    proc = subprocess.run(
        [sys.executable, "-m", "bidirlm", "bench", "attention", "--quick", "--plot",
         "--results", str(tmp_path), "--suite-args", "--seqlens 64,96 --no-packed"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        # the torch path: a smoke run of the command, not of the interpreter
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.open()]
    assert rows and {r["suite"] for r in rows} == {"attention"}
    assert {r["case"] for r in rows} == {"hd32-s64-b4", "hd32-s96-b2"}  # --suite-args forwarded
    pngs = list(tmp_path.glob("attention-*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"attention chart -> {pngs[0]}" in proc.stdout
    assert _tracked_state() == before  # the git-tracked rows are untouched


def test_unknown_suite_and_conflicting_flags(capsys) -> None:
    assert main(["bench", "nope"]) == 1
    assert "unknown suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "merge", "--results", "/tmp/x", "--commit-results"])


def _row(suite: str, case: str, impl: str, pass_: str, ms: float, run: str, **kw) -> dict:
    return {"suite": suite, "case": case, "impl": impl, "pass": pass_, "ms": ms,
            "tflops": kw.pop("tflops", None), "peak_mem_mb": kw.pop("mem", None),
            "device": "cpu-test", "torch": "t", "triton": "t", "commit": "c", "run_id": run,
            "time": kw.pop("time", "2026-12-07T00:00:00+00:00"), "extra": kw}  # fmt: skip


SYNTHETIC = {
    "attention": ["hd64-s1024-b4", "hd64-s2048-b4", "hd128-s1024-b4", "hd128-s2048-b4"],
    "mntp_loss": ["qwen3-t1024-r0.3", "qwen3-t4096-r0.3"],
    "infonce": ["B256-M256-d512", "B1024-M1024-d512"],
    "merge": ["3x15MB-bf16-linear", "3x60MB-bf16-linear"],
    "model": ["qwen3-100tok-4seq-max64"],
    "st_loss": ["B512-d256-hard1"],
}


@pytest.mark.parametrize("suite", [*SYNTHETIC, "compile"])
def test_every_suite_has_a_chart(tmp_path: Path, suite: str) -> None:
    rows = []
    if suite == "compile":
        for i, target in enumerate(("sm90", "gfx942")):
            extra = {"target": target, "registers": 100 + i, "spill_bytes": 8 * i}
            rows.append(_row(suite, f"{target} attention bf16 hd64 dense", "_attn_fwd_kernel",
                             "fwd", 1.0, "r1", **extra))  # fmt: skip
    else:
        for case in SYNTHETIC[suite]:
            for impl in ("bidirlm", "baseline", "bidirlm-predicted"):
                rows.append(_row(suite, case, impl, "fwd", 2.0, "r1", tflops=5.0, mem=3.0))
    # an older run of the same suite must not be mixed into the chart
    rows.append(_row(suite, "old", "bidirlm", "fwd", 9.0, "r0", time="2026-01-01T00:00:00+00:00"))
    path = tmp_path / "cpu-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = latest_run(load_rows(path), suite)
    assert {r["run_id"] for r in chosen} == {"r1"}
    assert not any(r["impl"].endswith("predicted") for r in chosen)
    png = plot_suite(path, suite)
    assert png == tmp_path / f"{suite}-cpu-test.png" and png.stat().st_size > 1000


def test_plot_of_a_missing_suite_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row("merge", "3x1MB-bf16-linear", "a", "warm", 1, "r")) + "\n")
    with pytest.raises(ValueError, match="no measured row of suite 'attention'"):
        plot_suite(path, "attention")
