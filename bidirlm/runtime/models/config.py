"""Typed model configuration shared by the Qwen3 and Gemma3 definitions, and RoPE frequencies.

`ModelConfig` is what our modules read; each architecture file parses a Hugging Face config.json
dict into it (`qwen3.parse_config`, `gemma3.parse_config`) and writes one back. `RopeConfig`
computes the inverse frequencies for the RoPE types these models ship with: `default`, `linear`
(Gemma3 4B+ global layers) and `yarn` (Qwen3 long-context), following the formulas of the YaRN
paper (arXiv 2309.00071) as transformers 5.x parameterizes them in `rope_parameters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

ROPE_TYPES = ("default", "linear", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE parameter set (transformers 5.x `rope_parameters` entry)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, params: dict[str, Any], *, max_position_embeddings: int) -> RopeConfig:
        """Parse one `rope_parameters` dict (or a legacy `rope_scaling` dict with `rope_theta`)."""
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        partial = params.get("partial_rotary_factor", 1.0)
        if partial not in (None, 1.0, 1):
            raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
        factor = params.get("factor")
        if rope_type == "linear" and factor is None:
            raise ValueError("rope_parameters: rope_type 'linear' needs a 'factor'")
        original = params.get("original_max_position_embeddings")
        if rope_type == "yarn":
            original = original or max_position_embeddings
            if factor is None:  # transformers: the ratio of the extended to the pretrained length
                factor = max_position_embeddings / original
        return cls(
            theta=float(params["rope_theta"]),
            rope_type=rope_type,
            factor=float(factor) if factor is not None else 1.0,
            original_max_position_embeddings=original,
            attention_factor=params.get("attention_factor"),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` entry transformers 5.x writes for this set."""
        out: dict[str, Any] = {"rope_theta": self.theta, "rope_type": self.rope_type}
        if self.rope_type in ("linear", "yarn"):
            out["factor"] = self.factor
        if self.rope_type == "yarn":
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
            out["beta_fast"] = self.beta_fast
            out["beta_slow"] = self.beta_slow
            out["truncate"] = self.truncate
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        return out

    def inv_freq(self, dim: int) -> tuple[torch.Tensor, float]:
        """Inverse frequencies `[dim // 2]` (float32) and the cos/sin scaling factor."""
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        base = self.theta**exponents
        if self.rope_type == "default":
            return 1.0 / base, 1.0
        if self.rope_type == "linear":
            return 1.0 / (self.factor * base), 1.0
        return self._yarn(dim, base)

    def _yarn(self, dim: int, base_pow: torch.Tensor) -> tuple[torch.Tensor, float]:
        factor = self.factor
        original = float(self.original_max_position_embeddings or 0)

        def mscale_of(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = self.attention_factor
        if attention is None:
            if self.mscale and self.mscale_all_dim:
                attention = mscale_of(factor, self.mscale) / mscale_of(factor, self.mscale_all_dim)
            else:
                attention = mscale_of(factor)

        def correction_dim(rotations: float) -> float:
            # the dimension whose wavelength makes `rotations` turns over the pretraining length
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
        inv = (1.0 / (factor * base_pow)) * (1 - extrapolation) + (1.0 / base_pow) * extrapolation
        return inv, float(attention)


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of a Qwen3 or Gemma3 text model (our own typed view).

    `sliding_window` is the value written in config.json (`w`); how it becomes the attention
    kernel's `window_size` depends on the architecture and the attention direction (see
    `window_for`).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    softmax_scale: float
    layer_types: tuple[str, ...]
    rope: dict[str, RopeConfig]
    sliding_window: int | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 32768
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                f"{self.num_layers}"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types: unsupported {bad}; supported: {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is unset")
        missing = sorted(set(self.layer_types) - set(self.rope))
        if missing:
            raise ValueError(f"rope parameters missing for layer types {missing}")

    def window_for(self, layer_type: str, *, bidirectional: bool) -> tuple[int, int]:
        """The attention kernel's `window_size` for one layer, matching transformers' masks.

        Full layers: `(-1, -1)` bidirectional, `(-1, 0)` causal. Sliding layers, config window w:
        causal keeps keys `i - w < j <= i` (transformers' `sliding_window_overlay`), i.e.
        `(w - 1, 0)`. Bidirectional Gemma3 keeps `|i - j| <= w // 2` (Gemma3TextConfig stores
        `w // 2 + 1` and masks `|i - j| < that`); bidirectional Qwen3 (`is_causal: false`) keeps
        `|i - j| <= w` (transformers' `sliding_window_bidirectional_overlay`).
        """
        if layer_type == "full_attention":
            return (-1, -1) if bidirectional else (-1, 0)
        w = int(self.sliding_window or 0)
        if not bidirectional:
            return (w - 1, 0)
        half = w // 2 if self.arch == "gemma3" else w
        return (half, half)


# config.json fields our models read, by the type they must have (None is always allowed: the
# architecture default applies). A wrong type is one line naming the field and the file, instead
# of transformers' TypeError from deep inside AutoConfig or a float('nan') reaching the RoPE.
_INT_FIELDS = {  # field -> smallest valid value
    "vocab_size": 1,
    "hidden_size": 1,
    "intermediate_size": 1,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 1,
    "max_position_embeddings": 1,
    "sliding_window": 0,
    "max_window_layers": 0,
    "sliding_window_pattern": 1,
}
_FLOAT_FIELDS = {  # field -> must be > 0 (else >= 0)
    "rms_norm_eps": True,
    "rope_theta": True,
    "rope_local_base_freq": True,
    "query_pre_attn_scalar": True,
    "attn_logit_softcapping": True,
    "final_logit_softcapping": True,
    "attention_dropout": False,
}
_BOOL_FIELDS = (
    "tie_word_embeddings",
    "attention_bias",
    "use_sliding_window",
    "is_causal",
    "use_bidirectional_attention",
)
_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_ROPE_FLOATS = ("rope_theta", "factor", "attention_factor", "beta_fast", "beta_slow")


def _kind(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"


def _check_number(where: str, name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name} must be a number, got {value!r} ({_kind(value)})")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name} is {value!r}; it must be a finite number")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{where}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def validate_hf_config(hf: dict[str, Any], where: str) -> None:
    """Refuse a config.json dict (and its `text_config`) whose known fields have the wrong type
    or a non-finite / out-of-range value: `ValueError` "`where`: FIELD must be ..., got ...".
    """
    for name, low in _INT_FIELDS.items():
        value = hf.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r} ({_kind(value)})")
        if value < low:
            raise ValueError(f"{where}: {name} must be >= {low}, got {value}")
    for name, positive in _FLOAT_FIELDS.items():
        if hf.get(name) is not None:
            _check_number(where, name, hf[name], positive=positive)
    for name in _BOOL_FIELDS:
        value = hf.get(name)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    for name in _TOKEN_FIELDS:
        value = hf.get(name)
        ids = value if isinstance(value, list) else [value]
        integers = all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        if value is not None and not integers:
            raise ValueError(
                f"{where}: {name} must be a token id (an integer) or a list of them, got {value!r}"
            )
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{where}: {key} must be an object, got {params!r}")
        # one parameter set, or one per layer type (Gemma3: full_attention / sliding_attention)
        sets = {key: params} if not any(isinstance(v, dict) for v in params.values()) else {
            f"{key}.{k}": v for k, v in params.items() if isinstance(v, dict)
        }  # fmt: skip
        for prefix, values in sets.items():
            for name in _ROPE_FLOATS:
                if values.get(name) is not None:
                    _check_number(where, f"{prefix}.{name}", values[name], positive=True)
    text = hf.get("text_config")
    if isinstance(text, dict):
        validate_hf_config(text, f"{where} (text_config)")
