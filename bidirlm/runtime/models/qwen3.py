"""Qwen3 text model: RMSNorm, per-head QK-norm, RoPE, GQA, SwiGLU, tied or untied LM head.

Reads config.json as transformers 5.x writes it (`rope_parameters`) and as older checkpoints do
(`rope_theta` + `rope_scaling`). Bidirectionality is recorded the way transformers reads it:
`"is_causal": false` (masking_utils falls back to a bidirectional mask).
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
    RMSNorm,
    default_softmax_scale,
)
from bidirlm.runtime.models.config import ModelConfig, RopeConfig

# Qwen3Config defaults (transformers 5.x) for keys a config.json may omit.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "rope_theta": 10000.0,
}

# Hugging Face name (relative to the text model prefix) -> our parameter name.
WEIGHTS: dict[str, str | None] = {
    "embed_tokens.weight": "embed.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "layers.{}.self_attn.q_proj.weight": "layers.{}.attn.wq.weight",
    "layers.{}.self_attn.k_proj.weight": "layers.{}.attn.wk.weight",
    "layers.{}.self_attn.v_proj.weight": "layers.{}.attn.wv.weight",
    "layers.{}.self_attn.o_proj.weight": "layers.{}.attn.wo.weight",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w_gate.weight",
    "layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w_up.weight",
    "layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w_down.weight",
    "norm.weight": "norm.weight",
    "rotary_emb.inv_freq": None,
    "layers.{}.self_attn.rotary_emb.inv_freq": None,
}

# Present only when `attention_bias` is true.
BIAS_WEIGHTS: dict[str, str] = {
    "layers.{}.self_attn.q_proj.bias": "layers.{}.attn.wq.bias",
    "layers.{}.self_attn.k_proj.bias": "layers.{}.attn.wk.bias",
    "layers.{}.self_attn.v_proj.bias": "layers.{}.attn.wv.bias",
    "layers.{}.self_attn.o_proj.bias": "layers.{}.attn.wo.bias",
}


class Qwen3Block(nn.Module):
    """Pre-norm decoder block: `x += attn(norm(x)); x += mlp(norm(x))`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, RMSNorm)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        window: tuple[int, int],
    ) -> torch.Tensor:
        """`x [N, d]` -> `[N, d]`."""
        x = x + self.attn(self.attn_norm(x), cos, sin, layout, window)
        return x + self.mlp(self.mlp_norm(x))


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", DEFAULTS["rope_theta"]))
    return params


def parse_config(hf: dict[str, Any]) -> ModelConfig:
    """Our `ModelConfig` from a Qwen3 config.json dict."""
    c = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    layers = int(c["num_hidden_layers"])
    sliding = int(c["sliding_window"]) if c["use_sliding_window"] and c["sliding_window"] else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention"
        if sliding is not None and i >= c["max_window_layers"]
        else "full_attention"
        for i in range(layers)
    ]
    rope = RopeConfig.from_hf(
        _rope_params(hf), max_position_embeddings=c["max_position_embeddings"]
    )
    return ModelConfig(
        arch="qwen3",
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(c["rms_norm_eps"]),
        hidden_act=str(c["hidden_act"]),
        softmax_scale=default_softmax_scale(head_dim),
        layer_types=tuple(layer_types),
        rope={t: rope for t in set(layer_types)},
        sliding_window=sliding,
        attention_bias=bool(c["attention_bias"]),
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        max_position_embeddings=int(c["max_position_embeddings"]),
        pad_token_id=hf.get("pad_token_id"),
    )


def is_bidirectional(hf: dict[str, Any]) -> bool:
    """True when transformers would run this config bidirectionally (`is_causal: false`)."""
    return hf.get("is_causal", True) is False


def to_hf_config(
    config: ModelConfig, hf: dict[str, Any], bidirectional: bool, dtype: torch.dtype
) -> dict[str, Any]:
    """The config.json to write: the source dict, with every field our config holds restated."""
    out = copy.deepcopy(hf)
    for legacy in ("rope_scaling", "rope_theta", "torch_dtype"):
        out.pop(legacy, None)
    out.update(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        attention_bias=config.attention_bias,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=next(iter(config.rope.values())).to_hf(),  # one set for all layers
        use_sliding_window=config.sliding_window is not None,
        sliding_window=config.sliding_window,
        layer_types=list(config.layer_types),
        tie_word_embeddings=config.tie_word_embeddings,
        dtype=str(dtype).removeprefix("torch."),
    )
    if bidirectional:
        out["is_causal"] = False
    else:
        out.pop("is_causal", None)
    return out


SPEC = ArchSpec(
    name="qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM", "Qwen3Model"),
    text_prefixes=("model.", ""),
    weights=WEIGHTS,
    bias_weights=BIAS_WEIGHTS,
    block=Qwen3Block,
    norm=RMSNorm,
    scale_embeddings=False,
    parse_config=parse_config,
    is_bidirectional=is_bidirectional,
    to_hf_config=to_hf_config,
)
