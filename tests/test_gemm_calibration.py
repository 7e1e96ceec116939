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
    for key in {r["kernel"] for r in gc.PUBLISHED}:
        f = facts[key]
        assert f["resident_per_sm"] == 1, key  # the accounting assumes one program per SM
        assert f["spills"] == 0, key
        assert f["k_loop_hgmma"] > 0, key


def test_fit_row_follows_the_rule():
    """The fit is the row `fit_row()` picks: timed on a default-wgmma compiler, established
    config, K >= 2048, 16-bit before fp8, then the most K steps; the rows timed on the 2023
    opt-in MMA v3 path are validation rows; every row names its source URL, date, device and
    config provenance."""
    fits = [r for r in gc.PUBLISHED if r["role"] == "fit"]
    assert len(fits) == 1 and fits[0] is gc.fit_row()
    (fit,) = fits
    assert fit["wgmma_default"] and fit["shape"]["K"] >= 2048
    assert all(r["role"] == "validation" for r in gc.PUBLISHED if not r["wgmma_default"])
    for r in gc.PUBLISHED:
        assert "https://github.com/" in r["source"], r["name"]
        assert r["date"] and r["device"] and r["config_provenance"], r["name"]
        assert r["timing"] in ("proton", "do_bench"), r["name"]
    # the rule itself: a 16-bit eligible row wins over fp8, and among equals the longest K loop
    base = dict(gc.PUBLISHED[-1], wgmma_default=True, config_provenance="x")
    fp8 = dict(base, dtype="fp8", shape={"M": 1, "N": 1, "K": 8192})
    short16 = dict(base, dtype="fp16", shape={"M": 1, "N": 1, "K": 2048})
    long16 = dict(base, dtype="bf16", shape={"M": 1, "N": 1, "K": 4096})
    old16 = dict(long16, wgmma_default=False, shape={"M": 1, "N": 1, "K": 8192})
    assert gc.fit_row([fp8, short16, long16, old16]) is long16
    assert gc.fit_row([fp8, old16]) is fp8
    with pytest.raises(ValueError, match="no published row"):
        gc.fit_row([old16, dict(base, shape={"M": 1, "N": 1, "K": 512})])


def test_fit_reproduces_the_published_figure(facts):
    cal = gc.gemm_calibration(facts=facts)
    fit = next(r for r in cal["rows"] if r["role"] == "fit")
    assert abs(fit["predicted_tflops"] - fit["published_tflops"]) / fit["published_tflops"] < 1e-3
    assert 0.05 < cal["eta"] < 1.0
    # the fitted row's K steps are MMA-bound, so e is what moves it
    assert fit["step_binding"] == "mma"


def test_prediction_rises_with_eta(facts):
    for row in gc.PUBLISHED:
        f = facts[row["kernel"]]
        assert gc.predict(row, f, 0.5)["tflops"] < gc.predict(row, f, 0.7)["tflops"], row["name"]


def test_fixed_tile_cost_sensitivity(facts):
    """The per-tile fixed cost slows every row at a given e, so refitting on the same row needs a
    higher e; the fitted row is reproduced either way; do_bench rows pay the launch gap."""
    cal = gc.gemm_calibration(facts=facts)
    assert cal["eta_fixed"] > cal["eta"]
    fit = next(r for r in cal["rows"] if r["role"] == "fit")
    assert abs(fit["error_fixed_pct"]) < 0.2
    for row in gc.PUBLISHED:
        f = facts[row["kernel"]]
        slow = gc.predict(row, f, 0.6, fixed_clk=gc.FIXED_TILE_CLK)
        fast = gc.predict(row, f, 0.6)
        assert slow["us"] > fast["us"], row["name"]
        assert (fast["launch_gap_us"] > 0) == (row["timing"] == "do_bench"), row["name"]


def test_validation_rows_are_reported(facts, capsys):
    cal = gc.gemm_calibration(facts=facts)
    val = [r for r in cal["rows"] if r["role"] == "validation"]
    assert val
    line = gc.calibration_line(cal)
    for r in cal["rows"]:
        assert r["name"] in line
        for key in ("error_pct", "error_at_0.64_pct", "error_at_0.70_pct", "error_fixed_pct"):
            assert isinstance(r[key], float)
    table = gc.calibration_table(cal)
    assert table.count("\n") == len(cal["rows"]) + 1
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
