"""The GEMM K-loop calibration (bench/gemm_calibration.py) from the cached sm_90 compile facts:
no GPU and no compile (the facts of the installed triton are committed in bench/results/)."""

from __future__ import annotations

import json

import pytest

from bench import gemm_calibration as gc


@pytest.fixture(scope="module")
def facts():
    path = gc._facts_file()
    if not path.exists():
        pytest.skip(
            f"no cached facts for this triton ({path.name}): run python -m bench.gemm_calibration"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def test_facts_are_one_program_per_sm_without_spills(facts):
    for dtype in ("fp16", "fp8"):
        f = facts[dtype]
        assert f["resident_per_sm"] == 1, dtype  # the accounting assumes one program per SM
        assert f["spills"] == 0, dtype
        assert f["k_loop_hgmma"] > 0, dtype


def test_fit_reproduces_the_published_figure(facts):
    cal = gc.gemm_calibration(facts=facts)
    fit = next(r for r in cal["rows"] if r["role"] == "fit")
    assert abs(fit["predicted_tflops"] - fit["published_tflops"]) / fit["published_tflops"] < 1e-3
    assert 0.05 < cal["eta"] < 1.0
    # the fitted row's K steps are MMA-bound, so e is what moves it
    assert fit["step_binding"] == "mma"


def test_prediction_rises_with_eta(facts):
    row = gc.PUBLISHED[0]
    f = facts[row["dtype"]]
    assert gc.predict(row, f, 0.5)["tflops"] < gc.predict(row, f, 0.7)["tflops"]


def test_validation_rows_are_reported(facts, capsys):
    cal = gc.gemm_calibration(facts=facts)
    val = [r for r in cal["rows"] if r["role"] == "validation"]
    assert val
    line = gc.calibration_line(cal)
    for r in cal["rows"]:
        assert r["name"] in line
        for key in ("error_pct", "error_at_0.64_pct", "error_at_0.70_pct"):
            assert isinstance(r[key], float)
    with capsys.disabled():
        print("\n" + line)


def test_losses_model_uses_the_calibrated_k_loop_efficiency(monkeypatch) -> None:
    """The loss kernels' K loops run at the GEMM-calibrated efficiency, not the 0.70 prior; the
    override exists for sensitivity runs and changes the MMA clocks in proportion."""
    from bench import gemm_calibration as gc
    from bench import perf_model_losses as pml

    monkeypatch.delenv("BIDIRLM_LOSSES_MMA_EFFICIENCY", raising=False)
    pml.mma_efficiency.cache_clear()
    try:
        eta = pml.mma_efficiency()
        assert eta == gc.gemm_calibration()["eta"] and eta != pml.MMA_EFFICIENCY_PRIOR
        at_fit = pml._mma_step_clk(128, 128, 64)
        monkeypatch.setenv("BIDIRLM_LOSSES_MMA_EFFICIENCY", "0.7")
        pml.mma_efficiency.cache_clear()
        assert pml._mma_step_clk(128, 128, 64) == pytest.approx(at_fit * eta / 0.7)
    finally:
        pml.mma_efficiency.cache_clear()
