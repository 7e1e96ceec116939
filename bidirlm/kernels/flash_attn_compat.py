"""flash-attn's call signatures on bidirlm's attention kernels (a drop-in for `flash_attn`).

    from bidirlm.kernels.flash_attn_compat import flash_attn_func, flash_attn_varlen_func

Same names, positional order, keyword names and defaults as flash-attn 2
(`flash_attn.flash_attn_interface`), with flash-attn's documented semantics:

- q `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]` (dense) or `[Tq, Hq, D]`, `[Tk, Hkv, D]` with int32
  `cu_seqlens_q`, `cu_seqlens_k` `[N+1]` (varlen); `Hq % Hkv == 0` (MQA/GQA); D <= 256; float16,
  bfloat16 or float32.
- Sq != Sk (cross-attention) aligns queries bottom-right: query i sits at key position
  `i + Sk - Sq` and sees key j iff `j >= i + Sk - Sq - window_size[0]` and
  `j <= i + Sk - Sq + window_size[1]` (a negative side is unbounded). `causal=True` is
  `window_size[1] = 0`: j <= i + Sk - Sq. A query that sees no key outputs zeros.
- `softcap > 0`: scores become `softcap * tanh(scores / softcap)`; `alibi_slopes` (float32
  `[Hq]` or `[B, Hq]`) then adds `-slope * |i + Sk - Sq - j|`.
- `return_attn_probs=True` returns `(out, softmax_lse, None)`: lse float32 `[B, Hq, Sq]` (dense)
  or `[Hq, Tq]` (varlen); the third item (flash-attn's dropout mask) is None because dropout is
  not supported.

Differences, all refused loudly rather than ignored: `dropout_p` must be 0.0 (ValueError);
`block_table` (paged KV cache) must be None. A query without visible keys has lse = -inf
(its log-sum-exp), where flash-attn's kernel writes +inf. Extension: the dense functions take a
keyword-only `key_padding_mask [B, Sk]` (bool, True = real token); with Sq == Sk it also marks the
real queries, whose padded rows output zeros, as after flash-attn's `pad_input`.
"""

from __future__ import annotations

import math

import torch

from .attention import (
    FlashAttnFunction,
    _check_cu_seqlens,
    _check_options,
    _check_qkv,
    _unit_stride,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]

_Out = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]


# --- argument checks -----------------------------------------------------------------------------


def _options(q, dropout_p, softmax_scale, causal, window_size, softcap, deterministic, ret):
    """flash-attn's scalar options -> (scale, left, right, softcap)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p must be a float, got {dropout_p!r}")
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p={dropout_p} is not supported: bidirlm's attention has no dropout "
            "(pass dropout_p=0.0)"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if window_size is None:
        window_size = (-1, -1)
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    if causal:  # flash-attn: causal=True sets the right side of the window to 0
        right = 0
    for name, flag in (("deterministic", deterministic), ("return_attn_probs", ret)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    return _check_options(q.shape[-1], softmax_scale, (left, right), softcap)


def _check_alibi(alibi_slopes, batch: int, hq: int, device) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise ValueError(f"alibi_slopes must be a tensor, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((hq,), (batch, hq)):
        raise ValueError(
            f"alibi_slopes must be [nheads] = ({hq},) or [batch, nheads] = ({batch}, {hq}), "
            f"got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    return alibi_slopes.detach().contiguous()


def _check_mask(mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("key_padding_mask must be a bool tensor (True = real token)")
    if tuple(mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"key_padding_mask must be [B, Sk] = {(k.shape[0], k.shape[1])}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device}, q on {q.device}")
    return mask.contiguous()


def _result(out: torch.Tensor, lse: torch.Tensor, return_attn_probs: bool) -> _Out:
    return (out, lse, None) if return_attn_probs else out


# --- dense ---------------------------------------------------------------------------------------


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> _Out:
    """flash-attn's `flash_attn_func`: q `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]` ->
    out `[B, Sq, Hq, D]` (or `(out, lse [B, Hq, Sq], None)` with `return_attn_probs`).

    Equals `softmax(cap(q @ k.T * scale) + alibi + mask) @ v` per head (kv head
    `h // (Hq // Hkv)`), the mask from `causal` / `window_size` aligned bottom-right when
    Sq != Sk; see the module docstring for the exact rules and the differences.
    """
    _check_qkv(q, k, v, 4, "[B, S, H, D]", cross=True)
    scale, left, right, softcap = _options(
        q, dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
        return_attn_probs,
    )  # fmt: skip
    alibi = _check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    mask = _check_mask(key_padding_mask, q, k)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    out, lse = FlashAttnFunction.apply(
        q, k, v, None, mask, q.shape[1], scale, left, right, softcap, deterministic, None, -1,
        alibi,
    )  # fmt: skip
    return _result(out, lse, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> _Out:
    """`flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], ...)` with kv `[B, Sk, 2, Hkv, D]`."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be [B, S, 2, H, D], got {_shape(kv)}")
    return flash_attn_func(
        q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs, key_padding_mask=key_padding_mask,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> _Out:
    """`flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...)`, qkv `[B, S, 3, H, D]`."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, S, 3, H, D], got {_shape(qkv)}")
    return flash_attn_func(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs,
        key_padding_mask=key_padding_mask,
    )  # fmt: skip


# --- varlen --------------------------------------------------------------------------------------


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> _Out:
    """flash-attn's `flash_attn_varlen_func`: q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]`, sequence n is
    queries `cu_seqlens_q[n]:cu_seqlens_q[n+1]` against keys `cu_seqlens_k[n]:cu_seqlens_k[n+1]`
    -> out `[Tq, Hq, D]` (or `(out, lse [Hq, Tq], None)` with `return_attn_probs`).

    Per sequence it equals `flash_attn_func` on the slices (bottom-right alignment when the
    lengths differ). `max_seqlen_q/k` must be at least the longest and at most the total.
    """
    if block_table is not None:
        raise ValueError("block_table (paged KV cache) is not supported: pass block_table=None")
    _check_qkv(q, k, v, 3, "[T, H, D]", cross=True)
    scale, left, right, softcap = _options(
        q, dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
        return_attn_probs,
    )  # fmt: skip
    for name, cu, total, longest in (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        try:
            _check_cu_seqlens(cu, total, longest, q.device)
        except ValueError as err:  # name which of the two pairs is wrong
            suffix = name[-2:]
            raise ValueError(
                str(err).replace("cu_seqlens", name).replace("max_seqlen", "max_seqlen" + suffix)
            ) from None
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    alibi = _check_alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q.device)
    same = cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    out, lse = FlashAttnFunction.apply(
        q, k, v, cu_seqlens_q, None, int(max_seqlen_q), scale, left, right, softcap,
        deterministic, None if same else cu_seqlens_k, -1 if same else int(max_seqlen_k), alibi,
    )  # fmt: skip
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Out:
    """`flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], ...)` with kv `[Tk, 2, Hkv, D]`."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [T, 2, H, D], got {_shape(kv)}")
    return flash_attn_varlen_func(
        q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> _Out:
    """`flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
    max_seqlen, max_seqlen, ...)` with qkv `[T, 3, H, D]`."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, H, D], got {_shape(qkv)}")
    return flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs,
    )  # fmt: skip


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def alibi_slopes_for(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes of `num_heads` heads (Press et al.), float32 `[num_heads]`:
    a geometric sequence from 2**(-8/n) over the closest power of two n, then the odd powers of
    the next one's for the remaining heads (as in flash-attn's tests)."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be > 0, got {num_heads}")

    def powers(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**i for i in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest)
    if closest < num_heads:
        slopes += powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
