"""The training loop: examples learn, exact resume, SIGTERM, non-finite losses, errors, kernels."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bidirlm.cli import main as cli_main
from bidirlm.runtime.embedded import embedded_tiny_model
from bidirlm.runtime.training.config import load_train_config
from bidirlm.runtime.training.trainer import TrainingError, TrainingInterrupted, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Small batches keep a step well under a second on a CPU (the examples use larger ones).
SMALL = {
    "causal": ["data.tokens_per_batch=256", "data.max_seq_len=64"],
    "mntp": ["data.tokens_per_batch=256", "data.max_seq_len=64", "mntp.mask_ratio=0.3"],
    "contrastive": ["data.batch_size=8", "data.query_max_len=16", "data.document_max_len=32"],
}


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loop tests use the torch reference ops on a CPU (the Triton interpreter is slow); the
    convergence tests below compare the two."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are too small for intra-op threads; one thread avoids contention
    with other test processes on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(phase: str, output: Path, *extra: str):
    overrides = [f"train.output={output}", "train.progress_bar=false", *SMALL[phase], *extra]
    return load_train_config(EXAMPLES / f"tiny-{phase}.toml", overrides)


def _losses(output: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("phase", ["causal", "mntp", "contrastive"])
def test_example_learns(phase: str, tmp_path: Path, torch_kernels: None) -> None:
    steps = 6
    final = train(_config(phase, tmp_path, f"train.steps={steps}", "train.checkpoint_every=0"))
    assert final == tmp_path / "final"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(row) and row["tokens_per_s"] > 0
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    # HF layout with the tokenizer, direction recorded, resolved config beside the outputs
    config = json.loads((final / "config.json").read_text())
    assert config.get("is_causal", True) is (phase == "causal")
    assert (final / "tokenizer.json").is_file()
    assert load_train_config(tmp_path / "config.toml") == _config(
        phase, tmp_path, f"train.steps={steps}", "train.checkpoint_every=0"
    )
    from bidirlm.runtime.models import load_model

    model = load_model(final)
    assert model.encode(["def f(): pass"]).shape == (1, model.hidden_size)


@pytest.mark.parametrize("phase", ["mntp", "contrastive"])
def test_resume_is_exact(phase: str, tmp_path: Path, torch_kernels: None) -> None:
    args = ("train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    straight = train(_config(phase, tmp_path / "a", *args))
    config = _config(phase, tmp_path / "b", *args)
    with pytest.raises(TrainingInterrupted) as info:
        train(config, stop_after=2)
    assert info.value.step == 2
    resumed = train(config)  # the same call again resumes from step 2
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # bitwise
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000004"]  # the last K, no temporary folders
    # A finished run is not redone.
    mtime = (tmp_path / "b" / "metrics.jsonl").stat().st_mtime_ns
    assert train(config) == resumed
    assert (tmp_path / "b" / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_sigterm_checkpoints_then_stops(tmp_path: Path, torch_kernels: None) -> None:
    config = _config("causal", tmp_path, "train.steps=5", "train.checkpoint_every=0")

    def on_step(row: dict) -> None:
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="stopped at step 2"):
        train(config, on_step=on_step)
    assert (tmp_path / "checkpoints" / "step-00000002" / "state.json").is_file()
    assert not (tmp_path / "final").exists()
    assert train(config) == tmp_path / "final"
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_non_finite_losses_skip_then_stop(
    tmp_path: Path, torch_kernels: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BIDIRLM_ALLOW_NON_FINITE", "1")  # load_model refuses NaN weights
    model = tmp_path / "nan-model"
    shutil.copytree(embedded_tiny_model(), model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if "embed" in k)
    weights[name][:] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    config = _config(
        "causal", tmp_path / "out", f"model={model}", "train.steps=6", "train.max_nonfinite_steps=3"
    )
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(config)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True, True]
    assert rows[-1]["nonfinite_total"] == 3


def test_cli_errors_are_one_line_and_early(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = str(EXAMPLES / "tiny-causal.toml")
    out = f"train.output={tmp_path / 'out'}"
    cases = [
        ([cfg, "--set", "train.stepz=1"], "unknown key train.stepz in [train]; valid keys:"),
        ([str(tmp_path / "missing.toml")], "missing.toml does not exist"),
        (
            [cfg, "--set", out, "--set", f"data.sources.0.path={tmp_path / 'x.jsonl'}"],
            "x.jsonl does not exist",
        ),
        ([cfg, "--set", out, "--set", f"model={tmp_path / 'nomodel'}"], "nomodel does not exist"),
        ([cfg, "--set", out, "--set", "data.sources.1.text_field=body"], "lack field(s) body"),
    ]
    for argv, message in cases:
        assert cli_main(["train", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_contrastive_rejects_text_only_data(tmp_path: Path) -> None:
    config = _config("contrastive", tmp_path, "data.sources.0.path=embedded:python-docs")
    with pytest.raises(ValueError, match=r"lack field\(s\) query, positive"):
        train(config)


# --- convergence: our Triton kernels (interpreter on CPU) vs the torch reference ------------


@pytest.mark.parametrize("phase", ["causal", "mntp", "contrastive"])
def test_convergence_triton_vs_torch(
    phase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = {
        "causal": ["data.tokens_per_batch=48", "data.max_seq_len=24"],
        "mntp": ["data.tokens_per_batch=48", "data.max_seq_len=24"],
        "contrastive": [
            "data.batch_size=4",
            "data.query_max_len=8",
            "data.document_max_len=12",
            "contrastive.mini_batch_size=0",  # one pass per text: the interpreter is slow
        ],
    }[phase]
    losses = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("BIDIRLM_KERNELS", impl)
        out = tmp_path / impl
        train(_config(phase, out, "train.steps=2", "train.checkpoint_every=0", *tiny))
        losses[impl] = _losses(out)
    torch.testing.assert_close(
        torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), rtol=2e-4, atol=2e-4
    )
    assert losses["torch"][1] != losses["torch"][0]  # the second step saw updated weights
