"""attn_implementation="bidirlm" in transformers vs "sdpa"/"eager" on tiny random models.

Qwen3 (bidirectional through `config.is_causal = False`, optional sliding window with the
inclusive `|q - kv| <= w` convention), Gemma3 (sliding layers, bidirectional through
`use_bidirectional_attention`, exclusive `|q - kv| < w`), Gemma2 (softcap, GQA 2:1, vs eager since
SDPA has no softcap). Qwen3 and Gemma3 run 2 q heads on 1 kv head, keeping the interpreter grid
small. Batches are right- and left-padded; only real tokens are compared (padded positions are
garbage in every implementation).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2Model,
    Gemma3TextConfig,
    Gemma3TextModel,
    Qwen3Config,
    Qwen3Model,
)

from bidirlm.integrations.transformers import BidirlmMask, bidirlm_mask, register

SEQ = 21


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()


def _qwen3(bidirectional: bool, sliding: int | None = None) -> Qwen3Config:
    cfg = Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        use_sliding_window=sliding is not None, sliding_window=sliding, max_window_layers=0,
    )  # fmt: skip
    if bidirectional:
        cfg.is_causal = False
    return cfg


def _gemma3(bidirectional: bool) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
        sliding_window_pattern=2, query_pre_attn_scalar=24,
        use_bidirectional_attention=bidirectional,
    )  # fmt: skip


def _build(model_cls, config, impl: str, device) -> torch.nn.Module:
    torch.manual_seed(0)
    config._attn_implementation = impl
    return model_cls(config).to(device).eval()


def _batch(device, vocab: int = 64):
    ids = torch.randint(0, vocab, (2, SEQ), device=device)
    mask = torch.ones(2, SEQ, dtype=torch.long, device=device)
    mask[0, 13:] = 0  # right padding
    mask[1, :6] = 0  # left padding
    return ids, mask


def _hidden(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


CASES = [
    ("qwen3-causal", Qwen3Model, lambda: _qwen3(False)),
    ("qwen3-bidirectional", Qwen3Model, lambda: _qwen3(True)),
    ("qwen3-bidirectional-sliding", Qwen3Model, lambda: _qwen3(True, sliding=5)),
    ("gemma3-causal", Gemma3TextModel, lambda: _gemma3(False)),
    ("gemma3-bidirectional", Gemma3TextModel, lambda: _gemma3(True)),
]


@pytest.mark.parametrize("name,model_cls,make_config", CASES, ids=[c[0] for c in CASES])
def test_matches_sdpa_with_padding(name, model_cls, make_config, device):
    ids, mask = _batch(device)
    ours = _hidden(_build(model_cls, make_config(), "bidirlm", device), ids, mask)
    sdpa = _hidden(_build(model_cls, make_config(), "sdpa", device), ids, mask)
    real = mask.bool()
    assert torch.isfinite(ours[real]).all()
    torch.testing.assert_close(ours[real], sdpa[real], atol=2e-5, rtol=2e-5)


def test_bidirectional_differs_from_causal(device):
    """Guards against a silently causal 'bidirectional' run (Qwen3's modules say is_causal)."""
    ids, mask = _batch(device)
    causal = _hidden(_build(Qwen3Model, _qwen3(False), "bidirlm", device), ids, mask)
    bidir = _hidden(_build(Qwen3Model, _qwen3(True), "bidirlm", device), ids, mask)
    assert not torch.allclose(causal[0, :13], bidir[0, :13], atol=1e-3)


def test_windows_probed_from_the_models_mask_functions(device):
    """Each model's own sliding convention is read off its mask function."""
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        sliding_window_bidirectional_overlay,
        sliding_window_overlay,
    )

    def probe(fn):
        m = bidirlm_mask(2, 30, 30, mask_function=fn, device=device)
        assert isinstance(m, BidirlmMask)
        return m.window

    assert probe(causal_mask_function) == (-1, 0)
    assert probe(lambda b, h, q, kv: q >= 0) == (-1, -1)
    assert probe(and_masks(causal_mask_function, sliding_window_overlay(8))) == (7, 0)
    assert probe(sliding_window_bidirectional_overlay(5)) == (5, 5)  # inclusive (Qwen3)
    assert probe(lambda b, h, q, kv: (q - kv).abs() < 5) == (4, 4)  # exclusive (Gemma3)
    padded = torch.ones(2, 30, dtype=torch.bool, device=device)
    padded[1, 20:] = False
    m = bidirlm_mask(2, 30, 30, mask_function=causal_mask_function, attention_mask=padded)
    assert torch.equal(m.key_padding_mask.cpu(), padded.cpu())
    full = bidirlm_mask(
        2, 30, 30, mask_function=causal_mask_function, attention_mask=padded[:1, :] | True
    )
    assert full.key_padding_mask is None  # nothing padded: no per-key mask


def test_non_band_pattern_falls_back_to_sdpa(device):
    """A chunked pattern is not a window: the mask is SDPA's 4D mask and attention warns."""
    chunked = lambda b, h, q, kv: (q // 7) == (kv // 7)  # noqa: E731
    m = bidirlm_mask(2, 30, 30, mask_function=chunked, device=device)
    assert isinstance(m, torch.Tensor) and m.shape == (2, 1, 30, 30)
    from bidirlm.integrations.transformers import bidirlm_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    module.num_key_value_groups = 2
    q = torch.randn(2, 4, 30, 16, device=device)
    kv = torch.randn(2, 2, 30, 16, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = bidirlm_attention_forward(module, q, kv, kv, m)
    assert any("falling back" in str(w.message) for w in caught)
    kv4 = kv.repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv4, kv4, attn_mask=m).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_softcap_and_scaling_vs_eager(device):
    """Gemma2 passes softcap (attn_logit_softcapping) and a custom scaling; SDPA cannot softcap."""
    cfg = Gemma2Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
    )  # fmt: skip
    ids, mask = _batch(device)
    ours = _hidden(_build(Gemma2Model, cfg, "bidirlm", device), ids, mask)
    eager = _hidden(_build(Gemma2Model, cfg, "eager", device), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], atol=2e-5, rtol=2e-5)


def test_training_gradients_match_sdpa(device):
    ids, mask = _batch(device)
    grads = {}
    for impl in ("bidirlm", "sdpa"):
        model = _build(Qwen3Model, _qwen3(True), impl, device).train()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden[mask.bool()] ** 2).mean().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["bidirlm"].keys() == grads["sdpa"].keys()
    for name, g in grads["bidirlm"].items():
        torch.testing.assert_close(g, grads["sdpa"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_kv_cache_is_rejected(device):
    from bidirlm.integrations.transformers import bidirlm_attention_forward

    module = torch.nn.Module()
    q = torch.randn(1, 2, 1, 16, device=device)
    kv = torch.randn(1, 2, 5, 16, device=device)
    with pytest.raises(ValueError, match="no KV cache"):
        bidirlm_attention_forward(module, q, kv, kv, None)
