"""Bidirectional flash attention: public API, autograd and `torch.library` registration.

    flash_attn_func(q, k, v)                           # dense  q [B, S, Hq, D], k/v [B, S, Hkv, D]
    flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen)  # packed q [T, Hq, D], k/v [T, Hkv, D]

Both compute, per sequence and q head h (kv head `h // (Hq // Hkv)`, no K/V repeat),

    s = q @ k.T * softmax_scale;  s = softcap * tanh(s / softcap) if softcap > 0
    out = softmax(s masked to the visible keys) @ v

which for full attention without padding equals
`F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
enable_gqa=True).transpose(1, 2)`, but never materialises an `[S, S]` tensor (forward or
backward) and takes names and semantics from flash-attention. Key j is visible from query i iff
`(left < 0 or j >= i - left) and (right < 0 or j <= i + right)` (positions inside each sequence)
and, dense, `key_padding_mask[b, j]` (True = real token). A query with no visible key outputs
zeros, lse = -inf and zero gradients. `return_lse` adds the float32 log-sum-exp of the scores,
`[B, Hq, S]` dense / `[Hq, T]` packed; it carries no gradient.

Layers: Triton kernels and launchers (`attention_triton.py`) -> `torch.library` ops
`bidirlm::flash_attn_fwd` / `bidirlm::flash_attn_bwd` (with fake kernels, so
`torch.compile(fullgraph=True)` traces through them) -> `FlashAttnFunction` -> functional API.
Each op dispatches (see `dispatch.py`) to Triton or to the plain-torch reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import debug_checks
from .dispatch import use_triton
from .reference import attention_reference, attention_reference_backward

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "FlashAttnFunction"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- torch.library ops ---------------------------------------------------------------------------


def _lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, ...]:
    if packed:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _reference(q, k, v, cu_seqlens, key_padding_mask, scale, left, right, softcap, cu_k, alibi):
    out, lse = attention_reference(
        q,
        k,
        v,
        cu_seqlens=cu_seqlens,
        key_padding_mask=key_padding_mask,
        softmax_scale=scale,
        window_size=(left, right),
        softcap=softcap,
        return_lse=True,
        cu_seqlens_k=cu_k,
        alibi_slopes=alibi,
    )
    return out.contiguous(), lse.contiguous()


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    max_seqlen: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_k: int = -1,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q, lse float32) on validated inputs; Triton or the torch reference.

    The last three arguments serve cross-attention and ALiBi: packed keys with their own
    `cu_seqlens_k` / `max_seqlen_k` (None / -1: the query ones), `alibi_slopes` float32 `[Hq]`
    or `[B, Hq]`. Dense cross-attention reads Sk from k.
    """
    if use_triton(q):
        from .attention_triton import attention_forward

        return attention_forward(
            q, k, v, cu_seqlens, key_padding_mask, max_seqlen, softmax_scale,
            (window_left, window_right), softcap, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=None if max_seqlen_k < 0 else max_seqlen_k, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    with torch.no_grad():
        return _reference(
            q, k, v, cu_seqlens, key_padding_mask, softmax_scale, window_left, window_right,
            softcap, cu_seqlens_k, alibi_slopes,
        )  # fmt: skip


# The eager path calls the implementations directly (the custom-op dispatch costs tens of
# microseconds of Python per call); torch.compile traces the registered ops.
_flash_attn_fwd = torch.library.custom_op("bidirlm::flash_attn_fwd", mutates_args=())(_fwd_impl)


@_flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(
    q, k, v, cu_seqlens, key_padding_mask, max_seqlen, softmax_scale, window_left, window_right,
    softcap, cu_seqlens_k=None, max_seqlen_k=-1, alibi_slopes=None,
):  # fmt: skip
    lse = q.new_empty(_lse_shape(q, cu_seqlens is not None), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


def _bwd_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    max_seqlen: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_k: int = -1,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v); Triton or the analytic torch reference backward."""
    if use_triton(q):
        from .attention_triton import attention_backward

        return attention_backward(
            dout, q, k, v, out, lse, cu_seqlens, key_padding_mask, max_seqlen, softmax_scale,
            (window_left, window_right), softcap, deterministic, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=None if max_seqlen_k < 0 else max_seqlen_k, alibi_slopes=alibi_slopes,
        )  # fmt: skip
    return attention_reference_backward(
        dout, q, k, v, cu_seqlens=cu_seqlens, key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale, window_size=(window_left, window_right), softcap=softcap,
        cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
    )  # fmt: skip


_flash_attn_bwd = torch.library.custom_op("bidirlm::flash_attn_bwd", mutates_args=())(_bwd_impl)


@_flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(
    dout, q, k, v, out, lse, cu_seqlens, key_padding_mask, max_seqlen, softmax_scale, window_left,
    window_right, softcap, deterministic, cu_seqlens_k=None, max_seqlen_k=-1, alibi_slopes=None,
):  # fmt: skip
    fmt = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=fmt),
        torch.empty_like(k, memory_format=fmt),
        torch.empty_like(v, memory_format=fmt),
    )


def _op_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, key_padding_mask, cu_seqlens_k, alibi = ctx.saved_tensors
    if dout is None:  # only lse was used downstream; it carries no gradient
        dout = torch.zeros_like(out)
    bwd = torch.ops.bidirlm.flash_attn_bwd if torch.compiler.is_compiling() else _bwd_impl
    dq, dk, dv = bwd(
        dout, q, k, v, out, lse, cu_seqlens, key_padding_mask, *ctx.params, cu_seqlens_k,
        ctx.max_seqlen_k, alibi,
    )  # fmt: skip
    return dq, dk, dv


def _op_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, key_padding_mask, max_seqlen, scale, left, right, softcap = inputs[:10]
    # the defaults of the trailing arguments, when a caller left them out
    cu_seqlens_k, max_seqlen_k, alibi = (*inputs[10:], *(None, -1, None)[len(inputs) - 10 :])
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, key_padding_mask, cu_seqlens_k, alibi)
    ctx.params = (max_seqlen, scale, left, right, softcap, False)
    ctx.max_seqlen_k = max_seqlen_k


def _op_autograd_backward(ctx, dout, dlse):
    dq, dk, dv = _op_backward(ctx, dout, dlse)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


# Direct users of torch.ops.bidirlm.flash_attn_fwd get gradients too (non-deterministic mode).
_flash_attn_fwd.register_autograd(_op_autograd_backward, setup_context=_op_setup_context)


# --- autograd.Function ---------------------------------------------------------------------------


class FlashAttnFunction(torch.autograd.Function):
    """Autograd of the attention ops on validated inputs; `deterministic` selects the backward."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        max_seqlen: int,
        softmax_scale: float,
        window_left: int,
        window_right: int,
        softcap: float,
        deterministic: bool,
        cu_seqlens_k: torch.Tensor | None = None,
        max_seqlen_k: int = -1,
        alibi_slopes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fwd = torch.ops.bidirlm.flash_attn_fwd if torch.compiler.is_compiling() else _fwd_impl
        out, lse = fwd(
            q, k, v, cu_seqlens, key_padding_mask, max_seqlen, softmax_scale, window_left,
            window_right, softcap, cu_seqlens_k, max_seqlen_k, alibi_slopes,
        )  # fmt: skip
        ctx.save_for_backward(
            q, k, v, out, lse, cu_seqlens, key_padding_mask, cu_seqlens_k, alibi_slopes
        )
        ctx.params = (max_seqlen, softmax_scale, window_left, window_right, softcap, deterministic)
        ctx.max_seqlen_k = max_seqlen_k
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dlse: torch.Tensor | None):
        dq, dk, dv = _op_backward(ctx, dout, dlse)
        return (dq, dk, dv) + (None,) * 11


# --- validation ----------------------------------------------------------------------------------


def _check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ndim: int,
    layout: str,
    *,
    cross: bool = False,
) -> None:
    """Shapes, dtypes and devices of q/k/v; `cross` lets k/v have their own sequence length."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cross:
        if ndim == 4 and k.shape[0] != q.shape[0]:
            raise ValueError(f"k batch {k.shape[0]} != q batch {q.shape[0]}")
    elif k.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"k must match q in its leading (token) dims: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k head dim {k.shape[-1]} != q head dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")


def _check_options(
    head_dim: int, softmax_scale: float | None, window_size, softcap: float
) -> tuple[float, int, int, float]:
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a float, got {softmax_scale!r}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    for side in (left, right):
        if isinstance(side, bool) or not isinstance(side, int) or side < -1:
            raise ValueError(f"window_size entries must be ints >= -1, got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise ValueError(f"softcap must be a float, got {softcap!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0 disables it), got {softcap}")
    return float(softmax_scale), int(left), int(right), float(softcap)


def _values_checkable(t: torch.Tensor) -> bool:
    """Content checks need a device sync: always on the CPU, on a GPU only with BIDIRLM_DEBUG=1,
    never while torch.compile traces (data-dependent control flow)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or debug_checks()


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int, device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be an int >= 0, got {max_seqlen!r}")
    if max_seqlen > total:
        # The grid is sized by max_seqlen: a huge value launches millions of empty programs.
        raise ValueError(
            f"max_seqlen ({max_seqlen}) is larger than the total token count {total}; "
            "pass the longest sequence length"
        )
    if not _values_checkable(cu_seqlens):
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError("cu_seqlens must be non-decreasing")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at the token count {total}, got {bounds[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(
            f"max_seqlen ({max_seqlen}) is smaller than the longest sequence {longest}"
        )


def _check_flags(deterministic: bool, return_lse: bool) -> None:
    for name, flag in (("deterministic", deterministic), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")


# The profiler range every public attention call runs in (a trace names the op's kernels and
# torch ops by it; under torch.compile Dynamo keeps the range as a no-op context).
PROFILER_RANGE = "bidirlm.flash_attn"


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels index the head dim with unit stride; any other layout is read through strides.
    return t if t.stride(-1) == 1 else t.contiguous()


# --- public API ----------------------------------------------------------------------------------


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense attention: q `[B, S, Hq, D]`, k/v `[B, S, Hkv, D]` -> out `[B, S, Hq, D]`.

    Equals `F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
    v.transpose(1, 2), attn_mask=visible, scale=softmax_scale, enable_gqa=True).transpose(1, 2)`
    with `visible[b, i, j]` from `window_size` and `key_padding_mask [B, S]` (bool, True = real
    token), except that a query with no visible key gives zeros instead of NaN. `softcap > 0`
    caps the scaled scores with `softcap * tanh(s / softcap)`. `deterministic=True` makes the
    backward bitwise reproducible (no atomics). With `return_lse`, returns `(out, lse)` where lse
    is `[B, Hq, S]` float32 (-inf for queries without visible keys). D <= 256; Hq % Hkv == 0;
    dtypes float16, bfloat16, float32 (float32 accumulation).
    """
    _check_qkv(q, k, v, 4, "[B, S, H, D]")
    scale, left, right, softcap = _check_options(q.shape[-1], softmax_scale, window_size, softcap)
    _check_flags(deterministic, return_lse)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = real token)")
        if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"key_padding_mask must be [B, S] = {tuple(q.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
        key_padding_mask = key_padding_mask.contiguous()
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with torch.profiler.record_function(PROFILER_RANGE):
        out, lse = FlashAttnFunction.apply(
            q, k, v, None, key_padding_mask, q.shape[1], scale, left, right, softcap, deterministic
        )
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed attention: q `[T, Hq, D]`, k/v `[T, Hkv, D]` -> out `[T, Hq, D]`.

    Sequence n is tokens `cu_seqlens[n]:cu_seqlens[n+1]` (int32 `[N+1]`, starting at 0,
    non-decreasing, ending at T; `max_seqlen` >= the longest); tokens attend only inside their
    own sequence and no padding is computed. Per sequence it equals `flash_attn_func` on
    `q[None, a:b]`, `k[None, a:b]`, `v[None, a:b]`; `window_size` counts positions inside each
    sequence. With `return_lse`, lse is `[Hq, T]` float32. The cu_seqlens contents are checked on
    the CPU always and on a GPU only with BIDIRLM_DEBUG=1 (the check needs a device sync).
    """
    _check_qkv(q, k, v, 3, "[T, H, D]")
    scale, left, right, softcap = _check_options(q.shape[-1], softmax_scale, window_size, softcap)
    _check_flags(deterministic, return_lse)
    _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with torch.profiler.record_function(PROFILER_RANGE):
        out, lse = FlashAttnFunction.apply(
            q, k, v, cu_seqlens, None, max_seqlen, scale, left, right, softcap, deterministic
        )
    return (out, lse) if return_lse else out
