"""Gemma3 models of the real shape: tiny random checkpoints of Gemma-3-270M's published config
(tests/data/real_configs/gemma-3-270m; sizes shrunk, everything else kept: the 262144-token
vocabulary, tied embeddings, the 5 sliding + 1 full layer pattern with the 512-token window, RoPE
bases 1e6 (full) / 1e4 (sliding), `query_pre_attn_scalar` 256, GELU-tanh, special ids 2/1/0).

The shrunk model keeps 4 query heads on 1 KV head (the real MQA ratio) with head_dim 64, while
`query_pre_attn_scalar` stays the real 256: scores are scaled by 256 ** -0.5 = 1/16 as in the real
model, not by head_dim ** -0.5 = 1/8, so an implementation that derived the scale from head_dim
would fail the comparisons with transformers below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bidirlm.cli import main
from bidirlm.runtime import load_model
from tests.omni.helpers import bits_equal
from tests.real_models import (
    build_text,
    check_special_ids,
    half_half_merge_vs_mergekit,
    real_config,
    shrink,
    tensors,
)

ATOL = 2e-5  # float32 end to end
LONG = 700  # longer than the real 512-token window, so the sliding layers really slide


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def config() -> dict:
    return shrink(real_config("gemma-3-270m"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, config: dict) -> Path:
    return build_text(tmp_path_factory.mktemp("gemma3") / "270m", config)


def _reference(folder: Path, *, bidirectional: bool):
    """transformers' Gemma3 for the checkpoint, bidirectional the way transformers does it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    raw = json.loads((folder / "config.json").read_text())
    raw["use_bidirectional_attention"] = bidirectional
    hf = Gemma3TextConfig.from_dict(raw)
    return Gemma3ForCausalLM.from_pretrained(folder, config=hf).eval()


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(3, 262144, shape, generator=torch.Generator().manual_seed(seed))


def test_only_sizes_shrink_and_the_rest_is_the_real_model(config: dict) -> None:
    real = real_config("gemma-3-270m")
    sizes = {
        "hidden_size",
        "intermediate_size",
        "head_dim",
        "num_hidden_layers",
        "layer_types",
    }
    assert {k for k in real if real[k] != config[k]} == sizes
    assert set(config) == set(real)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 1)
    assert config["hidden_size"] % config["num_attention_heads"] == 0
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    check_special_ids(config)
    # Gemma3-1B states only its period (`sliding_window_pattern` 6): shrunk to one period too
    one_b = shrink(real_config("gemma-3-1b-it"))
    assert one_b["num_hidden_layers"] == 6 and "layer_types" not in one_b
    assert (one_b["num_attention_heads"], one_b["num_key_value_heads"]) == (4, 1)
    assert one_b["hidden_size"] != config["hidden_size"]  # the two real widths still differ


def test_loaded_config_keeps_the_real_fields(ckpt: Path) -> None:
    enc = load_model(ckpt)
    c = enc.config
    assert c.arch == "gemma3" and c.vocab_size == 262144 and c.tie_word_embeddings
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert c.sliding_window == 512 and c.max_position_embeddings == 32768
    assert c.rope["full_attention"].theta == 1e6 and c.rope["sliding_attention"].theta == 1e4
    assert c.softmax_scale == 256**-0.5 != c.head_dim**-0.5
    assert c.hidden_act == "gelu_pytorch_tanh" and c.final_logit_softcap is None
    assert c.pad_token_id == 0
    assert enc.lm_head_weight.data_ptr() == enc.embed.weight.data_ptr()  # tied, as released


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "causal"])
def test_matches_transformers_gemma3(ckpt: Path, bidirectional: bool) -> None:
    enc = load_model(ckpt, bidirectional=bidirectional)
    ref = _reference(ckpt, bidirectional=bidirectional)
    ids = _ids(0, 2, 9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    real = mask.bool()
    long = _ids(1, 1, LONG)
    with torch.no_grad():
        out, expected = enc(ids, attention_mask=mask), ref.model(ids, attention_mask=mask)
        torch.testing.assert_close(out[real], expected.last_hidden_state[real], rtol=0, atol=ATOL)
        logits = ref(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(out[real] @ enc.lm_head_weight.T, logits, rtol=0, atol=1e-4)
        long_out = enc(long)
        torch.testing.assert_close(long_out, ref.model(long).last_hidden_state, rtol=0, atol=ATOL)
        # the 512 window binds at 700 tokens: the same weights without it give other states
        enc.config.sliding_window = None
        assert not torch.allclose(enc(long), long_out, atol=1e-3)


def test_bf16_smoke(ckpt: Path) -> None:
    ref = load_model(ckpt)
    enc = load_model(ckpt, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.embed.weight.shape == (262144, 12)
    ids = _ids(2, 2, 11)
    with torch.no_grad():
        out, expected = enc(ids), ref(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.float() - expected).abs().max() / expected.abs().max()
    assert err < 0.05, err
    emb = enc.encode(["the quick brown fox", "hello world"])
    assert emb.shape == (2, 12) and torch.isfinite(emb.float()).all()


def test_save_pretrained_round_trips_and_passes_check(ckpt: Path, tmp_path: Path, capsys) -> None:
    from transformers import Gemma3ForCausalLM

    enc = load_model(ckpt, bidirectional=True)
    out = tmp_path / "bi"
    enc.save_pretrained(out)
    raw = json.loads((out / "config.json").read_text())
    assert raw["use_bidirectional_attention"] is True and raw["model_type"] == "gemma3_text"
    assert raw["sliding_window"] == 512 and raw["query_pre_attn_scalar"] == 256
    assert raw["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert raw["vocab_size"] == 262144
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (2, 1, 0)
    thetas = {t: p["rope_theta"] for t, p in raw["rope_parameters"].items()}
    assert thetas == {"full_attention": 1e6, "sliding_attention": 1e4}
    src, saved = tensors(ckpt), tensors(out)
    assert set(saved) <= set(src) and "model.embed_tokens.weight" in saved
    assert all(bits_equal(saved[n], src[n]) for n in saved)
    again = load_model(out)
    assert again.bidirectional
    theirs = Gemma3ForCausalLM.from_pretrained(out).eval()  # bidirectional from config.json
    ids = _ids(3, 1, LONG)
    with torch.no_grad():
        mine = again(ids)
        torch.testing.assert_close(mine, enc(ids), rtol=0, atol=0)
        torch.testing.assert_close(mine, theirs.model(ids).last_hidden_state, rtol=0, atol=ATOL)
    assert main(["check", str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "check: all 3 checks passed"


def test_linear_merge_matches_mergekit_bitwise(config: dict, tmp_path: Path) -> None:
    a, b, ours = half_half_merge_vs_mergekit(tmp_path, config)
    assert ours["model.embed_tokens.weight"].shape == (262144, 12)
    ta, tb = tensors(a), tensors(b)
    n = "model.layers.5.self_attn.q_norm.weight"
    ref = (ta[n].float() + tb[n].float()) / 2
    torch.testing.assert_close(ours[n].float(), ref, rtol=2**-8, atol=0)
    merged = load_model(tmp_path / "ours")
    assert merged.dtype == torch.bfloat16 and merged.config.layer_types[-1] == "full_attention"
    assert merged.config.softmax_scale == 256**-0.5
    emb = merged.encode(["the quick brown fox", "hello world"])
    assert emb.shape == (2, 12) and torch.isfinite(emb.float()).all()


def test_gemma3_1b_shape_matches_transformers(tmp_path: Path) -> None:
    """Gemma3-1B states only `sliding_window_pattern` 6: both sides derive the same pattern."""
    folder = build_text(tmp_path / "1b", shrink(real_config("gemma-3-1b-it")), tokenizer=False)
    enc = load_model(folder, bidirectional=True)
    assert enc.config.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert enc.config.hidden_size == 20 and enc.config.sliding_window == 512
    ref = _reference(folder, bidirectional=True)
    ids = _ids(4, 1, LONG)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids), ref.model(ids).last_hidden_state, rtol=0, atol=ATOL)
