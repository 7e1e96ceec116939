"""Building blocks shared by the Qwen3 and Gemma3 definitions.

Tokens travel flattened as `[N, d]` through every layer (N = total tokens of a packed batch, or
B * S of a padded one); only attention needs the batch layout, which `AttentionLayout` carries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bidirlm.kernels.attention import flash_attn_func, flash_attn_varlen_func
from bidirlm.runtime.models.config import ModelConfig

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    """The elementwise activation called `name` in Hugging Face configs."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"hidden activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        ) from None


class RMSNorm(nn.Module):
    """Qwen-style RMSNorm: `w * (x / rms(x))`, normalized in float32, cast back before scaling.

    The output keeps the input's dtype, as transformers' `Qwen3RMSNorm` does for a model in that
    dtype (`weight * x_normed.to(input_dtype)`): with float32 master weights under a bf16/fp16
    autocast the weight is rounded to the activation dtype first, so bf16 activations stay bf16
    (a float32 weight times a bf16 tensor would promote to float32 and q/k/v would disagree).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * xf.to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma-style RMSNorm: `(1 + w) * (x / rms(x))`, all in float32 (weights stored as offsets).

    As transformers' `Gemma3RMSNorm`: the scale is applied in float32, then the result is cast to
    the input's dtype (`(x * w).to(dtype)`, where Qwen does `x.to(dtype) * w`).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[N, D]` (float32) for integer `positions [N]` and `inv_freq [D/2]`."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [N, H, D]` by the half-split convention (`rotate_half`), in float32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)


@dataclass
class AttentionLayout:
    """How the flattened tokens `[N]` are grouped into sequences for attention.

    Packed: `cu_seqlens [n+1]` int32 and `max_seqlen`. Padded: `batch, seqlen` and an optional
    `key_padding_mask [B, S]` bool (True = real token).
    """

    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    batch: int = 0
    seqlen: int = 0
    key_padding_mask: torch.Tensor | None = None


class Attention(nn.Module):
    """GQA self-attention with per-head QK-norm and RoPE, calling the bidirlm attention kernel."""

    def __init__(self, config: ModelConfig, norm_cls: type[nn.Module]) -> None:
        super().__init__()
        d, h, hkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.wq = nn.Linear(d, h * hd, bias=bias)
        self.wk = nn.Linear(d, hkv * hd, bias=bias)
        self.wv = nn.Linear(d, hkv * hd, bias=bias)
        self.wo = nn.Linear(h * hd, d, bias=bias)
        self.q_norm = norm_cls(hd, eps=config.rms_norm_eps)
        self.k_norm = norm_cls(hd, eps=config.rms_norm_eps)
        self.softmax_scale = config.softmax_scale
        self.softcap = float(config.attn_logit_softcap or 0.0)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        window: tuple[int, int],
    ) -> torch.Tensor:
        """`x [N, d]` -> `[N, d]`."""
        n = x.shape[0]
        q = self.q_norm(self.wq(x).view(n, self.num_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(n, self.num_kv_heads, self.head_dim))
        v = self.wv(x).view(n, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kwargs = dict(softmax_scale=self.softmax_scale, window_size=window, softcap=self.softcap)
        if layout.cu_seqlens is not None:
            out = flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.max_seqlen, **kwargs)
        else:
            b, s = layout.batch, layout.seqlen
            out = flash_attn_func(
                q.view(b, s, self.num_heads, self.head_dim),
                k.view(b, s, self.num_kv_heads, self.head_dim),
                v.view(b, s, self.num_kv_heads, self.head_dim),
                key_padding_mask=layout.key_padding_mask,
                **kwargs,
            )
        return self.wo(out.reshape(n, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`: SwiGLU for Qwen3 (silu), GeGLU for Gemma3 (tanh gelu)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.w_gate = nn.Linear(d, f, bias=False)
        self.w_up = nn.Linear(d, f, bias=False)
        self.w_down = nn.Linear(f, d, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


def default_softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


@dataclass(frozen=True)
class ArchSpec:
    """Everything that differs between architectures, as data and small callables.

    `weights` maps Hugging Face tensor names, relative to the text model's prefix (`model.`,
    `model.language_model.`, ...), to our parameter names; `{}` is the layer index; None marks a
    tensor that is dropped when reading (e.g. stale rotary buffers). `lm_head.weight` lives
    outside the prefix and is handled by the checkpoint reader.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    text_prefixes: tuple[str, ...]
    weights: dict[str, str | None]
    bias_weights: dict[str, str]
    block: type[nn.Module]
    norm: type[nn.Module]
    scale_embeddings: bool
    parse_config: Callable[[dict[str, Any]], ModelConfig]
    is_bidirectional: Callable[[dict[str, Any]], bool]
    to_hf_config: Callable[[ModelConfig, dict[str, Any], bool, torch.dtype], dict[str, Any]]
