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
  or `[Hq, Tq]` (varlen), +inf for a query without visible keys as flash-attn writes it; the
  third item (flash-attn's dropout mask) is None because dropout is not supported.
- Scalar options are taken the way flash-attn takes them: `window_size` as a tuple, list, int
  tensor or numpy array of two ints; `softmax_scale`, `softcap`, `dropout_p` as Python/numpy
  numbers or one-element tensors; `max_seqlen_q/k` as ints, numpy ints or 0-d tensors.
- `flash_attn_with_kvcache` (no paged cache), and the kvpacked / qkvpacked forms.

Differences, all refused loudly rather than ignored: `dropout_p` must be 0.0 (ValueError);
`block_table` (paged KV cache) and `cache_leftpad` must be None.

`bidirlm.kernels.flash_attn_func` / `flash_attn_varlen_func` ARE these functions: a superset of
flash-attn's signature and bidirlm's documented keyword-only one (`key_padding_mask`,
`return_lse`; varlen `(q, k, v, cu_seqlens, max_seqlen)`), so either import works. bidirlm's
`return_lse=True` returns `(out, lse)` with lse = -inf (the log of an empty sum) for a query
without visible keys. `key_padding_mask [B, Sk]` (bool, True = real token) is dense only; with
Sq == Sk it also marks the real queries, whose padded rows output zeros, as after flash-attn's
`pad_input`.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch

from .attention import (
    PROFILER_RANGE,
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
    "flash_attn_with_kvcache",
]

_Out = torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]


# --- argument conversion -------------------------------------------------------------------------
#
# flash-attn forwards its scalar options to a C++/custom op that converts them the way Python's
# number protocol does, so its own tests pass `window_size=torch.randint(0, sk, (2,))`, numpy
# ints, 0-d tensors for `max_seqlen`, a tensor `softmax_scale`. They become plain Python numbers
# here (one host sync for a GPU tensor, as flash-attn's own conversion costs).


def _is_numpy_bool(value) -> bool:
    # numpy.bool_ (named "bool" since numpy 2), checked by name: the kernels do not import numpy
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _int(value, name: str) -> int:
    """An int from an int, a numpy integer or a one-element integer tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an int or a one-element integer tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        return int(value.item())
    if isinstance(value, bool) or _is_numpy_bool(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    raise ValueError(f"{name} must be an int, got {value!r}")


def _float(value, name: str) -> float:
    """A float from a Python/numpy real number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name} must be a float or a one-element real tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        return float(value.item())
    if isinstance(value, bool) or _is_numpy_bool(value):
        raise ValueError(f"{name} must be a float, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"{name} must be a float, got {value!r}")


def _flag(value, name: str) -> bool:
    """A bool from a bool, a numpy bool or a one-element bool tensor (never from an int)."""
    if isinstance(value, bool):
        return value
    if _is_numpy_bool(value) or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1
    ):
        return bool(value)
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _window(window_size) -> tuple[int, int]:
    """(left, right) from a pair given as tuple, list, tensor or numpy array of ints."""
    if window_size is None:
        return (-1, -1)
    if isinstance(window_size, torch.Tensor):
        if window_size.numel() != 2 or window_size.dtype.is_floating_point:
            raise ValueError(
                f"window_size must be a pair (left, right) of ints, got a {window_size.dtype} "
                f"tensor of shape {tuple(window_size.shape)}"
            )
        window_size = window_size.reshape(2).tolist()
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    try:
        return _int(left, "window_size"), _int(right, "window_size")
    except ValueError:
        raise ValueError(f"window_size entries must be ints >= -1, got {window_size!r}") from None


def _options(q, dropout_p, softmax_scale, causal, window_size, softcap, deterministic, ret):
    """flash-attn's scalar options -> (scale, left, right, softcap, deterministic, ret)."""
    dropout_p = _float(dropout_p, "dropout_p")
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p={dropout_p} is not supported: bidirlm's attention has no dropout "
            "(pass dropout_p=0.0)"
        )
    causal = _flag(causal, "causal")
    left, right = _window(window_size)
    if causal:  # flash-attn: causal=True sets the right side of the window to 0
        right = 0
    deterministic = _flag(deterministic, "deterministic")
    ret = _flag(ret, "return_attn_probs")
    if softmax_scale is not None:
        softmax_scale = _float(softmax_scale, "softmax_scale")
    softcap = _float(softcap, "softcap")
    scale, left, right, softcap = _check_options(q.shape[-1], softmax_scale, (left, right), softcap)
    return scale, left, right, softcap, deterministic, ret


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


def _fa_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn's convention: a row with no visible key has lse = +inf (its kernel writes
    INFINITY there so that `exp(s - lse)` is 0); bidirlm's native ops report -inf (the log of
    an empty sum)."""
    return lse.masked_fill(torch.isneginf(lse), math.inf)


def _result(out: torch.Tensor, lse: torch.Tensor, return_attn_probs: bool, return_lse: bool):
    if return_attn_probs and return_lse:
        raise ValueError(
            "return_lse (bidirlm's form, (out, lse)) and return_attn_probs (flash-attn's form, "
            "(out, lse, None)) are exclusive: pass one"
        )
    if return_attn_probs:
        return out, _fa_lse(lse), None
    return (out, lse) if return_lse else out


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
    return_lse: bool = False,
) -> _Out:
    """flash-attn's `flash_attn_func`: q `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]` ->
    out `[B, Sq, Hq, D]` (or `(out, lse [B, Hq, Sq], None)` with `return_attn_probs`).

    Equals `softmax(cap(q @ k.T * scale) + alibi + mask) @ v` per head (kv head
    `h // (Hq // Hkv)`), the mask from `causal` / `window_size` aligned bottom-right when
    Sq != Sk; see the module docstring for the exact rules and the differences. bidirlm's own
    keyword-only form `flash_attn_func(q, k, v, *, softmax_scale, window_size, softcap,
    key_padding_mask, deterministic, return_lse)` is the same call: `return_lse=True` returns
    `(out, lse)` with lse -inf for a query without visible keys.
    """
    _check_qkv(q, k, v, 4, "[B, S, H, D]", cross=True)
    scale, left, right, softcap, deterministic, ret = _options(
        q, dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
        return_attn_probs,
    )  # fmt: skip
    return_lse = _flag(return_lse, "return_lse")
    alibi = _check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    mask = _check_mask(key_padding_mask, q, k)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with torch.profiler.record_function(PROFILER_RANGE):
        out, lse = FlashAttnFunction.apply(
            q, k, v, None, mask, q.shape[1], scale, left, right, softcap, deterministic, None, -1,
            alibi,
        )  # fmt: skip
    return _result(out, lse, ret, return_lse)


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


def _is_length(value) -> bool:
    """A max_seqlen-like scalar (int, numpy int, 0-d tensor), as opposed to a 1-D
    `cu_seqlens [N+1]` tensor: how the varlen function tells its two call forms apart."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
) -> _Out:
    """flash-attn's `flash_attn_varlen_func`: q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]`, sequence n is
    queries `cu_seqlens_q[n]:cu_seqlens_q[n+1]` against keys `cu_seqlens_k[n]:cu_seqlens_k[n+1]`
    -> out `[Tq, Hq, D]` (or `(out, lse [Hq, Tq], None)` with `return_attn_probs`).

    Per sequence it equals `flash_attn_func` on the slices (bottom-right alignment when the
    lengths differ). `max_seqlen_q/k` must be at least the longest and at most the total.

    bidirlm's own form `flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, *,
    softmax_scale, window_size, softcap, deterministic, return_lse)` (one `cu_seqlens` for
    queries and keys) is accepted too: it is recognised when the fifth argument is a length (an
    int or a 0-d tensor) rather than a `cu_seqlens_k` tensor, or when `cu_seqlens=` /
    `max_seqlen=` are passed by keyword.
    """
    if block_table is not None:
        raise ValueError("block_table (paged KV cache) is not supported: pass block_table=None")
    native = cu_seqlens is not None or max_seqlen is not None
    if not native and max_seqlen_q is None and max_seqlen_k is None and _is_length(cu_seqlens_k):
        # bidirlm's positional form (q, k, v, cu_seqlens, max_seqlen)
        cu_seqlens, max_seqlen, cu_seqlens_q, cu_seqlens_k = cu_seqlens_q, cu_seqlens_k, None, None
        native = True
    if native:
        given = [
            name
            for name, value in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                                ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k))
            if value is not None
        ]  # fmt: skip
        if given:
            raise ValueError(
                f"pass either cu_seqlens/max_seqlen or {', '.join(given)} (flash-attn's form), "
                "not both"
            )
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("cu_seqlens and max_seqlen are both required")
        return _varlen(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
            causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
            return_lse, names=("cu_seqlens", "cu_seqlens", "max_seqlen", "max_seqlen"),
        )  # fmt: skip
    required = {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k}  # fmt: skip
    for name, value in required.items():
        if value is None:
            raise ValueError(f"{name} is required")
    return _varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, return_lse,
    )  # fmt: skip


def _varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
    causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, return_lse,
    names=("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
):  # fmt: skip
    _check_qkv(q, k, v, 3, "[T, H, D]", cross=True)
    scale, left, right, softcap, deterministic, ret = _options(
        q, dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
        return_attn_probs,
    )  # fmt: skip
    return_lse = _flag(return_lse, "return_lse")
    cu_name_q, cu_name_k, max_name_q, max_name_k = names
    max_seqlen_q = _length(max_seqlen_q, max_name_q)
    max_seqlen_k = _length(max_seqlen_k, max_name_k)
    for cu_name, max_name, cu, total, longest in (
        (cu_name_q, max_name_q, cu_seqlens_q, q.shape[0], max_seqlen_q),
        (cu_name_k, max_name_k, cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        try:
            _check_cu_seqlens(cu, total, longest, q.device)
        except ValueError as err:  # name which of the two pairs is wrong
            msg = str(err).replace("cu_seqlens", cu_name).replace("max_seqlen", max_name)
            raise ValueError(msg) from None
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"{cu_name_q} and {cu_name_k} must have the same length, got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )
    alibi = _check_alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q.device)
    same = cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    with torch.profiler.record_function(PROFILER_RANGE):
        out, lse = FlashAttnFunction.apply(
            q, k, v, cu_seqlens_q, None, max_seqlen_q, scale, left, right, softcap,
            deterministic, None if same else cu_seqlens_k, -1 if same else max_seqlen_k, alibi,
        )  # fmt: skip
    return _result(out, lse, ret, return_lse)


def _length(value, name: str) -> int:
    try:
        return _int(value, name)
    except ValueError:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}") from None


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


# --- KV cache ------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """Rotary embedding of the first `2 * cos.shape[-1]` channels of x `[B, S, H, D]` with
    per-token `cos`/`sin` `[B, S, rd/2]`: pairs (0, 1), (2, 3), ... when interleaved, else
    (i, i + rd/2) (GPT-NeoX), computed in float32."""
    rd = 2 * cos.shape[-1]
    head, tail = x[..., :rd].float(), x[..., rd:]
    cos, sin = cos[:, :, None, :].float(), sin[:, :, None, :].float()
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., : rd // 2], head[..., rd // 2 :]
        rot = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rot.to(x.dtype), tail), dim=-1)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's `flash_attn_with_kvcache` without a paged cache: q `[B, Sq, Hq, D]` attends
    to the first `cache_seqlens[b] (+ Sn)` rows of `k_cache/v_cache[cache_batch_idx[b]]`
    (`[Bc, Sc, Hkv, D]`) -> out `[B, Sq, Hq, D]` (and lse float32 `[B, Hq, Sq]`, +inf for a
    query without visible keys, with `return_softmax_lse`).

    New keys/values `k`, `v` `[B, Sn, Hkv, D]` are first written into the caches *in place* at
    rows `cache_seqlens[b] : cache_seqlens[b] + Sn`, rotated by `rotary_cos/sin [Sro, rd/2]` at
    positions `cache_seqlens[b] + t` when given (q at the same positions when causal or local,
    else all at `cache_seqlens[b]`), exactly as flash-attn documents. The mask is flash-attn's
    bottom-right one with `Sk = cache_seqlens[b] + Sn`. No backward (as in flash-attn).
    `cache_leftpad` and `block_table` are refused (ValueError); `num_splits` is a GPU
    scheduling hint and is accepted and ignored.
    """
    if block_table is not None:
        raise ValueError("block_table (paged KV cache) is not supported: pass block_table=None")
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad is not supported: pass cache_leftpad=None")
    _int(num_splits, "num_splits")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got {_shape(t)}")
    batch, sq = q.shape[0], q.shape[1]
    if cache_batch_idx is not None:
        if (
            not isinstance(cache_batch_idx, torch.Tensor)
            or cache_batch_idx.dtype not in (torch.int32, torch.int64)
            or tuple(cache_batch_idx.shape) != (batch,)
        ):
            raise ValueError(f"cache_batch_idx must be an int32 tensor [B] = ({batch},)")
        rows = cache_batch_idx.long()
        if rows.numel() and (rows.min() < 0 or rows.max() >= k_cache.shape[0]):
            raise ValueError(f"cache_batch_idx entries must be in [0, {k_cache.shape[0]})")
    else:
        if k_cache.shape[0] < batch:
            raise ValueError(
                f"k_cache batch {k_cache.shape[0]} < q batch {batch} (pass cache_batch_idx)"
            )
        rows = torch.arange(batch, device=q.device)
    # dtypes, devices, head dims and heads; the empty slices keep the cache from being copied
    _check_qkv(q[:0], k_cache[:0], v_cache[:0], 4, "[B, S, H, D]", cross=True)
    scale, left, right, softcap, _, lse_flag = _options(
        q, 0.0, softmax_scale, causal, window_size, softcap, False, return_softmax_lse
    )
    interleaved = _flag(rotary_interleaved, "rotary_interleaved")
    alibi = _check_alibi(alibi_slopes, batch, q.shape[2], q.device)
    cap = k_cache.shape[1]
    if cache_seqlens is None:
        seqlens = torch.full((batch,), cap, dtype=torch.long)
    elif isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dim() == 1:
        if cache_seqlens.shape[0] != batch or cache_seqlens.dtype.is_floating_point:
            raise ValueError(f"cache_seqlens must be an int or an int32 tensor [B] = ({batch},)")
        seqlens = cache_seqlens.detach().long().cpu()
    else:
        seqlens = torch.full((batch,), _int(cache_seqlens, "cache_seqlens"), dtype=torch.long)
    new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v must be passed together")
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with new keys k, v (where to write them)")
        for name, t in (("k", k), ("v", v)):
            want = (batch, None, k_cache.shape[2], k_cache.shape[3])
            if (
                not isinstance(t, torch.Tensor) or t.dim() != 4
                or any(w is not None and w != s for w, s in zip(want, t.shape))
                or t.dtype != k_cache.dtype
            ):  # fmt: skip
                raise ValueError(
                    f"{name} must be [B, Sn, Hkv, D] = ({batch}, Sn, {k_cache.shape[2]}, "
                    f"{k_cache.shape[3]}) in {k_cache.dtype}, got {_shape(t)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {_shape(k)} and {_shape(v)}")
        new = k.shape[1]
    if seqlens.numel() and (seqlens.min() < 0 or seqlens.max() + new > cap):
        raise ValueError(
            f"cache_seqlens (+ {new} new rows) must be in [0, {cap}], got {seqlens.tolist()}"
        )
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be passed together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need new keys k, v (flash-attn rotates them)")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape:
            raise ValueError(
                f"rotary_cos/rotary_sin must be [Sro, rotary_dim / 2], got {_shape(rotary_cos)} "
                f"and {_shape(rotary_sin)}"
            )
        if 2 * rotary_cos.shape[1] > q.shape[-1]:
            raise ValueError(f"rotary_dim {2 * rotary_cos.shape[1]} > head dim {q.shape[-1]}")
        span = max(new, sq if causal or left >= 0 or right >= 0 else 1)
        if seqlens.numel() and seqlens.max() + span > rotary_cos.shape[0]:
            raise ValueError(
                f"rotary_cos has {rotary_cos.shape[0]} positions; cache_seqlens + new rows needs "
                f"{int(seqlens.max()) + span}"
            )
    with torch.no_grad():
        starts = seqlens.to(q.device)
        if rotary_cos is not None:
            pos_k = starts[:, None] + torch.arange(new, device=q.device)
            k = _rotate(k, rotary_cos[pos_k], rotary_sin[pos_k], interleaved)
            local = causal or left >= 0 or right >= 0
            pos_q = starts[:, None] + (torch.arange(sq, device=q.device) if local else 0)
            pos_q = pos_q.expand(batch, sq)
            q = _rotate(q, rotary_cos[pos_q], rotary_sin[pos_q], interleaved)
        for b in range(batch):  # in place, as flash-attn does
            if new:
                start = int(seqlens[b])
                k_cache[rows[b], start : start + new] = k[b]
                v_cache[rows[b], start : start + new] = v[b]
        lengths = (seqlens + new).tolist()
        keys = torch.cat([k_cache[rows[b], : lengths[b]] for b in range(batch)])
        values = torch.cat([v_cache[rows[b], : lengths[b]] for b in range(batch)])
        cu_k = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        cu_q = torch.arange(0, (batch + 1) * sq, sq, dtype=torch.int32)
        max_k = max(lengths, default=0)
        q_packed = q.reshape(batch * sq, *q.shape[2:])
        with torch.profiler.record_function(PROFILER_RANGE):
            out, lse = FlashAttnFunction.apply(
                _unit_stride(q_packed), keys.contiguous(), values.contiguous(),
                cu_q.to(q.device), None, sq, scale, left, right, softcap, False,
                cu_k.to(q.device), max_k, alibi,
            )  # fmt: skip
    out = out.reshape(q.shape)
    if not lse_flag:
        return out
    return out, _fa_lse(lse.reshape(q.shape[2], batch, sq).transpose(0, 1).contiguous())


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
