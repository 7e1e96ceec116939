"""The MNTP/causal phases hand the labelled-row count to the fused loss (no device sync)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bidirlm.runtime.training import load_train_config, train
from bidirlm.runtime.training.phases import module as phase_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mntp_phase_passes_the_exact_labelled_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    seen: list[tuple[int, int]] = []
    real = phase_module.mntp_loss

    def spy(hidden, weight, labels, **kwargs):
        seen.append((kwargs["num_labelled"], int((labels != -100).sum())))
        return real(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(phase_module, "mntp_loss", spy)
    config = load_train_config(
        ROOT / "examples" / "tiny-mntp.toml",
        [f"train.output={tmp_path / 'run'}", "train.steps=2", "train.checkpoint_every=0",
         "data.tokens_per_batch=256", f"train.dtype={dtype}"],
    )  # fmt: skip
    train(config)
    assert len(seen) == 2
    for given, actual in seen:
        assert given == actual > 0
    assert torch.get_default_dtype() == torch.float32
