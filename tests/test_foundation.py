"""The package foundation: dispatch, `bidirlm env`, the CLI, the benchmark harness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import report
from bench.runner import FIELDS, Runner, attention_flops, load_rows
from bidirlm.kernels import dispatch


def test_import_is_lazy_and_device_free() -> None:
    code = (
        "import sys, bidirlm, bidirlm.kernels, bidirlm.runtime, bidirlm.cli;"
        "assert 'triton' not in sys.modules, 'triton imported at package import';"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("env", "interp", "device", "impl"),
    [
        ("auto", "1", "cpu", "triton"),
        ("auto", "0", "cpu", "torch"),
        ("torch", "1", "cpu", "torch"),
        ("triton", "1", "cpu", "triton"),
    ],
)
def test_dispatch_choices(monkeypatch, env, interp, device, impl) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", env)
    monkeypatch.setenv("TRITON_INTERPRET", interp)
    decision = dispatch.decide(device)
    assert decision.impl == impl
    assert decision.reason  # never silent


def test_dispatch_explicit_triton_that_cannot_run_raises(monkeypatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run"):
        dispatch.decide("cpu")


def test_dispatch_rejects_unknown_value(monkeypatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "cuda")
    with pytest.raises(ValueError, match="BIDIRLM_KERNELS"):
        dispatch.decide("cpu")


def test_use_triton_follows_tensor_device(monkeypatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(torch.zeros(1))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bidirlm.cli", *args], capture_output=True, text=True, env=full_env
    )


def test_env_command_prints_versions_device_and_choice() -> None:
    out = _cli("env", env={"BIDIRLM_KERNELS": "auto", "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    for key in ("python", "torch", "triton", "transformers", "device", "kernels"):
        assert any(line.startswith(key) for line in out.stdout.splitlines()), key
    assert "triton -- auto: TRITON_INTERPRET=1" in out.stdout


def test_env_command_reports_impossible_choice() -> None:
    out = _cli("env", env={"BIDIRLM_KERNELS": "triton", "TRITON_INTERPRET": "0"})
    if torch.cuda.is_available():
        pytest.skip("a GPU makes BIDIRLM_KERNELS=triton valid")
    assert out.returncode == 1
    assert "error -- BIDIRLM_KERNELS=triton" in out.stdout


def test_cli_unknown_command_fails_cleanly() -> None:
    out = _cli("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr


def test_runner_writes_rows_with_every_field(tmp_path) -> None:
    runner = Runner("unit", device="cpu", results_dir=tmp_path, cpu_rep=2)
    a = torch.randn(64, 64)
    flops = 2 * 64**3
    row = runner.measure(case="mm64", impl="torch", pass_="fwd", fn=lambda: a @ a, flops=flops)
    runner.measure(case="mm64", impl="slow", pass_="fwd", fn=lambda: (a @ a, a @ a), flops=flops)
    runner.measure(case="mm64", impl="broken", pass_="fwd", fn=lambda: 1 / 0)
    rows = load_rows(runner.path)
    assert len(rows) == 3
    for r in rows:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert r["run_id"] == runner.run_id
    assert row["ms"] > 0 and row["tflops"] > 0
    assert rows[2]["ms"] is None and "ZeroDivisionError" in rows[2]["extra"]["error"]
    assert json.loads(runner.path.read_text().splitlines()[0])["suite"] == "unit"


def test_runner_rows_of_separate_runs_have_separate_ids(tmp_path) -> None:
    r1 = Runner("unit", device="cpu", results_dir=tmp_path)
    r2 = Runner("unit", device="cpu", results_dir=tmp_path)
    assert r1.run_id != r2.run_id


def test_report_renders_table_and_plot(tmp_path) -> None:
    runner = Runner("unit", device="cpu", results_dir=tmp_path, cpu_rep=1)
    runner.record(case="c1", impl="base", pass_="fwd", ms=2.0, flops=4e9)
    runner.record(case="c1", impl="ours", pass_="fwd", ms=1.0, flops=4e9, peak_mem_mb=3.0)
    rows = report.select(load_rows(runner.path), suite="unit")
    table = report.markdown_table(rows, baseline="base")
    assert "| unit | c1 | fwd | ours | 1 | 4 | 3 | 2x |" in table
    assert "device cpu-" in table
    png = report.plot(rows, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main([str(runner.path), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == report.markdown_table(rows)


def test_report_selects_latest_run(tmp_path) -> None:
    old = Runner("unit", device="cpu", results_dir=tmp_path)
    old.record(case="c", impl="x", pass_="fwd", ms=5.0)
    new = Runner("unit", device="cpu", results_dir=tmp_path)
    new.record(case="c", impl="x", pass_="fwd", ms=1.0)
    rows = report.select(load_rows(new.path))
    assert [r["run_id"] for r in rows] == [new.run_id]


def test_attention_flop_formula() -> None:
    assert attention_flops(10, 2, 8, "fwd") == 4 * 10 * 2 * 8
    assert attention_flops(10, 2, 8, "bwd") == 2.5 * 4 * 10 * 2 * 8


def test_command_error_is_one_line_under_python_dash_m() -> None:
    # `python -m bidirlm.cli` runs the file as __main__; errors must still be one line.
    out = _cli("bench", "no-such-suite")
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "unknown suite" in out.stderr
