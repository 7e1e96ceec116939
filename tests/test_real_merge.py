"""The recipe's merge on checkpoints of real models' shape: two bf16 Qwen3-0.6B-shaped encoders
(the published config, sizes shrunk, the 151936-token vocabulary and tied embeddings kept),
merged 50/50 as the recipe merges Bi+MNTP with its base; bitwise equal to mergekit on the same
YAML, still bf16, and loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bidirlm.runtime import load_model
from tests.real_models import half_half_merge_vs_mergekit, real_config, shrink, tensors


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def test_real_shape_linear_merge_matches_mergekit(tmp_path: Path) -> None:
    cfg = shrink(real_config("qwen3-0.6b"))
    a, b, ours = half_half_merge_vs_mergekit(tmp_path, cfg)
    assert ours["model.embed_tokens.weight"].shape == (151936, 16)
    ta, tb = tensors(a), tensors(b)
    n = "model.layers.0.mlp.up_proj.weight"
    ref = (ta[n].float() + tb[n].float()) / 2
    torch.testing.assert_close(ours[n].float(), ref, rtol=2**-8, atol=0)
    model = load_model(tmp_path / "ours")
    assert model.dtype == torch.bfloat16 and model.config.rope["full_attention"].theta == 1e6
    emb = model.encode(["the quick brown fox", "hello world"])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
