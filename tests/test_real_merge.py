"""The recipe's merge on checkpoints of real models' shape: two bf16 Qwen3-0.6B-shaped encoders
(the published config, sizes shrunk, the 151936-token vocabulary and tied embeddings kept),
merged 50/50 as the recipe merges Bi+MNTP with its base; bitwise equal to mergekit on the same
YAML, still bf16, and loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from bidirlm.runtime import load_model
from bidirlm.runtime.merging.merge import merge_from_config
from tests.omni.helpers import bits_equal
from tests.real_models import build_text, real_config, shrink, tensors

YAML = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def test_real_shape_linear_merge_matches_mergekit(tmp_path: Path) -> None:
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    cfg = shrink(real_config("qwen3-0.6b"))
    a = build_text(tmp_path / "a", cfg, seed=0, dtype=torch.bfloat16)
    b = build_text(tmp_path / "b", cfg, seed=1, dtype=torch.bfloat16)
    text = YAML.format(a=a, b=b)
    (tmp_path / "merge.yml").write_text(text)
    merge_from_config(tmp_path / "merge.yml", tmp_path / "ours", threads=1)
    config = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    mk_merge.run_merge(config, str(tmp_path / "theirs"), mk_options.MergeOptions(quiet=True))
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    assert all(bits_equal(ours[n], theirs[n]) for n in theirs)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert ours["model.embed_tokens.weight"].shape == (151936, 16)
    ta, tb = tensors(a), tensors(b)
    n = "model.layers.0.mlp.up_proj.weight"
    ref = (ta[n].float() + tb[n].float()) / 2
    torch.testing.assert_close(ours[n].float(), ref, rtol=2**-8, atol=0)
    model = load_model(tmp_path / "ours")
    assert model.dtype == torch.bfloat16 and model.config.rope["full_attention"].theta == 1e6
    emb = model.encode(["the quick brown fox", "hello world"])
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
