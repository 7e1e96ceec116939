"""Gemma3 text model: (1 + w) RMSNorm, scaled embeddings, QK-norm, sandwich norms, GeGLU.

Sliding and full layers follow `layer_types` (or `sliding_window_pattern`, default every 6th
layer full); sliding layers use the local RoPE base (`rope_parameters["sliding_attention"]`,
legacy `rope_local_base_freq`), full layers the global one with its scaling. Scores are scaled by
`query_pre_attn_scalar ** -0.5`; `attn_logit_softcapping` is ignored, as transformers does. Reads
`Gemma3ForCausalLM` / `Gemma3TextModel` checkpoints and the text part of multimodal
`Gemma3ForConditionalGeneration` ones (`text_config`, weights under `model.language_model.` or
the 4.x `language_model.model.`); always writes a text-only `Gemma3ForCausalLM` checkpoint.
Bidirectionality is recorded as `use_bidirectional_attention: true`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bidirlm.runtime.models.common import (
    ArchSpec,
    Attention,
    AttentionLayout,
    GatedMLP,
    GemmaRMSNorm,
)
from bidirlm.runtime.models.config import ModelConfig, RopeConfig

# Gemma3TextConfig defaults (transformers 5.x): multimodal configs often list only a few keys.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}

WEIGHTS: dict[str, str | None] = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "layers.{}.self_attn.q_proj.weight": "layers.{}.attn.wq.weight",
    "layers.{}.self_attn.k_proj.weight": "layers.{}.attn.wk.weight",
    "layers.{}.self_attn.v_proj.weight": "layers.{}.attn.wv.weight",
    "layers.{}.self_attn.o_proj.weight": "layers.{}.attn.wo.weight",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.post_attn_norm.weight",
    "layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.weight",
    "layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_mlp_norm.weight",
    "layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w_gate.weight",
    "layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w_up.weight",
    "layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w_down.weight",
    "norm.weight": "norm.weight",
    "rotary_emb.inv_freq": None,
    "rotary_emb_local.inv_freq": None,
}

BIAS_WEIGHTS: dict[str, str] = {
    "layers.{}.self_attn.q_proj.bias": "layers.{}.attn.wq.bias",
    "layers.{}.self_attn.k_proj.bias": "layers.{}.attn.wk.bias",
    "layers.{}.self_attn.v_proj.bias": "layers.{}.attn.wv.bias",
    "layers.{}.self_attn.o_proj.bias": "layers.{}.attn.wo.bias",
}


class Gemma3Block(nn.Module):
    """Sandwich-norm block: `x += post(attn(pre(x))); x += post(mlp(pre(x)))`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.attn_norm = GemmaRMSNorm(d, eps=eps)
        self.attn = Attention(config, GemmaRMSNorm)
        self.post_attn_norm = GemmaRMSNorm(d, eps=eps)
        self.mlp_norm = GemmaRMSNorm(d, eps=eps)
        self.mlp = GatedMLP(config)
        self.post_mlp_norm = GemmaRMSNorm(d, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        window: tuple[int, int],
    ) -> torch.Tensor:
        """`x [N, d]` -> `[N, d]`."""
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, layout, window))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The text model's config dict: `text_config` of a multimodal config, else the dict itself."""
    if hf.get("model_type") == "gemma3":
        return dict(hf.get("text_config") or {})
    return dict(hf)


def _rope(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer-type rope parameter dicts from 5.x nested `rope_parameters` or legacy keys."""
    params = copy.deepcopy(c.get("rope_parameters") or {})
    if params and not ({"full_attention", "sliding_attention"} & set(params)):
        params = {"full_attention": params}  # a flat dict describes the global layers
    full = params.get("full_attention") or dict(c.get("rope_scaling") or {})
    full.setdefault("rope_theta", c.get("rope_theta", DEFAULTS["rope_theta"]))
    local = params.get("sliding_attention") or {"rope_type": "default"}
    local.setdefault("rope_theta", c.get("rope_local_base_freq", DEFAULTS["rope_local_base_freq"]))
    return {"full_attention": full, "sliding_attention": local}


def parse_config(hf: dict[str, Any]) -> ModelConfig:
    """Our `ModelConfig` from a Gemma3 (text or multimodal) config.json dict."""
    tc = text_config(hf)
    c = {**DEFAULTS, **{k: v for k, v in tc.items() if v is not None}}
    layers = int(c["num_hidden_layers"])
    pattern = int(c["sliding_window_pattern"])
    layer_types = tc.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    max_pos = int(c["max_position_embeddings"])
    rope = {t: RopeConfig.from_hf(p, max_position_embeddings=max_pos) for t, p in _rope(c).items()}
    heads = int(c["num_attention_heads"])
    return ModelConfig(
        arch="gemma3",
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(c["num_key_value_heads"]),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        rms_norm_eps=float(c["rms_norm_eps"]),
        hidden_act=str(c.get("hidden_activation") or c.get("hidden_act")),
        softmax_scale=float(c["query_pre_attn_scalar"]) ** -0.5,
        layer_types=tuple(layer_types),
        rope=rope,
        sliding_window=int(c["sliding_window"]) if c["sliding_window"] else None,
        attention_bias=bool(c["attention_bias"]),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", c["tie_word_embeddings"])),
        # transformers 5.23's Gemma3Attention never passes `attn_logit_softcapping` to its
        # attention functions (Gemma3 replaced soft-capping with QK-norm), so scores are not capped
        attn_logit_softcap=None,
        final_logit_softcap=c["final_logit_softcapping"],
        max_position_embeddings=max_pos,
        pad_token_id=c.get("pad_token_id"),
        extra={"query_pre_attn_scalar": c["query_pre_attn_scalar"]},
    )


def is_bidirectional(hf: dict[str, Any]) -> bool:
    """True when transformers would run this config bidirectionally."""
    return bool(text_config(hf).get("use_bidirectional_attention", False))


def to_hf_config(
    config: ModelConfig, hf: dict[str, Any], bidirectional: bool, dtype: torch.dtype
) -> dict[str, Any]:
    """A text-only `Gemma3ForCausalLM` config.json (a multimodal source keeps its text part).

    `sliding_window` is written as read: transformers turns w into a +/- w//2 window itself when
    `use_bidirectional_attention` is true.
    """
    out = {**DEFAULTS, **text_config(hf)}  # explicit values for keys a multimodal source omits
    for legacy in (
        "rope_scaling",
        "torch_dtype",
        "rope_theta",
        "rope_local_base_freq",
        "sliding_window_pattern",
    ):
        out.pop(legacy, None)
    out.update(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        rope_parameters={t: r.to_hf() for t, r in config.rope.items()},
        layer_types=list(config.layer_types),
        sliding_window=config.sliding_window,
        hidden_activation=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        attention_bias=config.attention_bias,
        max_position_embeddings=config.max_position_embeddings,
        query_pre_attn_scalar=config.extra.get("query_pre_attn_scalar", config.softmax_scale**-2),
        final_logit_softcapping=config.final_logit_softcap,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        use_bidirectional_attention=bool(bidirectional),
        dtype=str(dtype).removeprefix("torch."),
    )
    return out


SPEC = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    architectures=(
        "Gemma3ForCausalLM",
        "Gemma3TextModel",
        "Gemma3ForConditionalGeneration (text part)",
        "Gemma3Model (text part)",
    ),
    text_prefixes=("model.language_model.", "language_model.model.", "model.", ""),
    weights=WEIGHTS,
    bias_weights=BIAS_WEIGHTS,
    block=Gemma3Block,
    norm=GemmaRMSNorm,
    scale_embeddings=True,
    parse_config=parse_config,
    is_bidirectional=is_bidirectional,
    to_hf_config=to_hf_config,
)
