"""transformers adapter: `attn_implementation="bidirlm"` runs bidirlm's flash attention.

    from bidirlm.integrations.transformers import register
    register()
    model = AutoModel.from_pretrained(path, attn_implementation="bidirlm")

`register()` adds two entries under one name:

- AttentionMaskInterface: `bidirlm_mask` turns the model's mask request (a mask function plus the
  2D padding mask) into a small `BidirlmMask`: the key padding mask `[B, S]` (None when nothing
  is padded) and the `(left, right)` window of the pattern. The window is read off the mask
  function itself, probed on a few rows and verified on them, so each model's own convention is
  kept exactly (causal sliding `kv > q - w`, Gemma3 bidirectional `|q - kv| < w`, Qwen3
  bidirectional `|q - kv| <= w`, full bidirectional, causal). A pattern that is not a band
  (chunked, block-wise, packed via position_ids) or a KV cache gets the full 4D mask instead, and
  the attention falls back to transformers' SDPA with a warning.
- AttentionInterface: `bidirlm_attention_forward` calls `flash_attn_func` with the padding
  mask, the window, `scaling` and `softcap`; K/V are never repeated for GQA.

Nothing of transformers is patched: models pick the entries up through their interfaces.

transformers is an optional dependency (the `[train]` / `[st]` extras): it is imported inside
the functions that use it, so this module imports without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bidirlm.kernels.attention import flash_attn_func

NAME = "bidirlm"
_PROBE_ROWS = 17  # rows of the mask pattern evaluated to find and verify the window


@dataclass(frozen=True)
class BidirlmMask:
    """What the attention needs from the mask: key padding `[B, S]` (True = real) and window.

    `window` is None when it could not be probed (under torch.compile tracing); the attention then
    derives it from the module (`is_causal`, `config.is_causal`, `sliding_window`).
    """

    key_padding_mask: torch.Tensor | None
    window: tuple[int, int] | None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _probe_window(
    batch_size: int,
    length: int,
    mask_function: Callable,
    use_vmap: bool,
    device: torch.device | str,
) -> tuple[int, int] | None:
    """The band `(left, right)` that `mask_function` draws on a `length x length` grid, or None
    when the sampled rows are not such a band (or differ between batch rows)."""
    from transformers.masking_utils import sdpa_mask

    rows = sorted({round(i * (length - 1) / (_PROBE_ROWS - 1)) for i in range(_PROBE_ROWS)})
    probed = []
    for row in rows:  # one [B, 1, 1, S] row at a time: O(rows * B * S), never O(S^2)
        vis = sdpa_mask(
            batch_size=batch_size,
            q_length=1,
            kv_length=length,
            q_offset=row,
            kv_offset=0,
            mask_function=mask_function,
            attention_mask=None,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=use_vmap,
            device=device,
        )
        probed.append(vis.reshape(batch_size, length))
    grid = torch.stack(probed, dim=1).bool().cpu()  # [B, rows, S]
    first, last = grid[0, 0].nonzero(), grid[0, -1].nonzero()
    if first.numel() == 0 or last.numel() == 0:
        return None
    # Row S-1 sees keys from S-1-left on (clipped at 0: then left never binds, i.e. unbounded);
    # row 0 sees keys up to right (clipped at S-1: unbounded).
    j_min, j_max = int(last.min()), int(first.max())
    left = -1 if j_min == 0 else length - 1 - j_min
    right = -1 if j_max == length - 1 else j_max
    i = torch.tensor(rows)[:, None]
    j = torch.arange(length)[None, :]
    band = torch.ones(len(rows), length, dtype=torch.bool)
    if left >= 0:
        band &= j >= i - left
    if right >= 0:
        band &= j <= i + right
    return (left, right) if bool((grid == band).all()) else None


def bidirlm_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> BidirlmMask | torch.Tensor:
    """AttentionMaskInterface entry: a `BidirlmMask`, or the full 4D bool mask `[B, 1, Q, K]`
    (SDPA's) when the pattern is not padding + a window over one sequence."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = mask_function or causal_mask_function
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = padding[:, -kv_length:].to(device=device, dtype=torch.bool)
    if q_length == kv_length and q_offset == 0 and kv_offset == 0:
        if _tracing():
            return BidirlmMask(padding, None)
        window = _probe_window(batch_size, kv_length, mask_function, use_vmap, device)
        if window is not None:
            if padding is not None and bool(padding.all()):
                padding = None  # nothing padded: skip the per-key mask loads
            return BidirlmMask(padding, window)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device=device,
    )


def _module_window(module: torch.nn.Module, is_causal: bool | None, sliding_window) -> tuple:
    """Window from the module when no BidirlmMask was made (e.g. traced, or a bare 2D mask)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    config = getattr(module, "config", None)
    if config is not None and not getattr(config, "is_causal", True):
        causal = False  # Qwen3 and others: bidirectional through config.is_causal = False
    if sliding_window:
        # transformers' causal sliding window keeps kv > q - w, i.e. w - 1 keys to the left.
        return (sliding_window - 1, 0 if causal else sliding_window - 1)
    return (-1, 0) if causal else (-1, -1)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def bidirlm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BidirlmMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: q `[B, Hq, S, D]`, k/v `[B, Hkv, S, D]` -> (`[B, S, Hq, D]`, None).

    Runs `flash_attn_func` on the transposed views (no copy, no K/V repeat), with the padding
    mask and window of the `BidirlmMask`, `softmax_scale=scaling` and `softcap`. `deterministic`
    follows `torch.are_deterministic_algorithms_enabled()` unless passed.
    """
    if dropout:
        raise ValueError(f"bidirlm attention does not implement dropout (got dropout={dropout})")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        _warn_once(
            "bidirlm attention: this mask is not padding + a window over one sequence (or a KV "
            "cache is in use); falling back to transformers' SDPA for it"
        )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if softcap:
            raise ValueError("bidirlm attention: the SDPA fallback cannot apply softcap")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, is_causal=False, **kwargs
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"bidirlm attention needs as many keys as queries (no KV cache); got q length "
            f"{query.shape[2]}, kv length {key.shape[2]}"
        )
    key_padding_mask, window = None, None
    if isinstance(attention_mask, BidirlmMask):
        key_padding_mask, window = attention_mask.key_padding_mask, attention_mask.window
    elif isinstance(attention_mask, torch.Tensor):  # a bare 2D padding mask
        key_padding_mask = attention_mask.bool()
    if window is None:
        window = _module_window(module, is_causal, sliding_window)
    deterministic = kwargs.get("deterministic")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    out = flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        softmax_scale=scaling,
        window_size=window,
        softcap=float(softcap or 0.0),
        key_padding_mask=key_padding_mask,
        deterministic=bool(deterministic),
    )
    return out, None


def register(name: str = NAME) -> None:
    """Register attention `name` (default "bidirlm") and its mask function in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, bidirlm_attention_forward)
    AttentionMaskInterface.register(name, bidirlm_mask)


__all__ = ["NAME", "BidirlmMask", "bidirlm_attention_forward", "bidirlm_mask", "register"]
