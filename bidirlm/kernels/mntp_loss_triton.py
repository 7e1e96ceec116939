"""Triton kernels, launch configs and launchers of the fused MNTP loss (see `mntp_loss.py`).

Kept apart from the public API so that `import bidirlm.kernels` (which imports `mntp_loss`
eagerly, see the package docstring) never imports Triton.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import arch_family, autotune_enabled
from .dispatch import interpreting

# The float32 scratch that holds partial dH / dW sums is at most this large unless one wave of
# tiles needs more (see `_chunk`).
_SCRATCH_BYTES = 64 * 2**20


# --- Triton kernels ------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """float32 tanh within a few ulp everywhere (tl has no tanh; libdevice's does not interpret).

    The textbook `(1 - e) / (1 + e)`, `e = exp(-2|x|)`, cancels for small |x|: `1 - e` keeps
    the absolute error of `e` (half an ulp of ~1 in the interpreter, ~2^-22 with the GPU's
    `ex2.approx`), a relative error of up to 1e-6 / |x|; times the softcap that is ~1e-6 on every
    logit at softcap 30, 10x torch's float32 error. Below |x| = 0.6 we take the odd Taylor series
    at |x| / 2 <= 0.3 (terms to x^13; the first omitted one, 929569/638512875 y^15, is < 3e-11
    there) and double it with `2t / (1 + t^2)`, which does not cancel. Above 0.6, `e <= 0.3` and
    `1 - e >= 0.7`: the exp form is accurate. Neither branch overflows (`e <= 1`).
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    y = 0.5 * a
    y2 = y * y
    p = -1382.0 / 155925.0 + y2 * (21844.0 / 6081075.0)
    p = 62.0 / 2835.0 + y2 * p
    p = -17.0 / 315.0 + y2 * p
    p = 2.0 / 15.0 + y2 * p
    p = -1.0 / 3.0 + y2 * p
    ty = y + y * (y2 * p)
    small = 2.0 * ty / (1.0 + ty * ty)
    t = tl.where(a < 0.6, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 `[BLOCK_M, BLOCK_V]` tile of `H[rows] @ W[cols].T + b[cols]` (before softcap)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        h = tl.load(
            h_ptr + rows[:, None] * stride_h + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_w + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter computes bf16 on raw bits: go to float32 at once
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dlogits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    row_mask,
    target,
    lse,
    grad,
    cols,
    col_mask,
    D,
    stride_h,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 `d loss / d (H @ W.T + b)` tile: `grad * (softmax - onehot) * softcap'`."""
    x = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, stride_h, stride_w,
        HAS_BIAS, UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    p = tl.exp(z - lse[:, None])
    dz = p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    dz = dz * grad[:, None]
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)  # d/dx softcap*tanh(x/softcap)
    return tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)


@triton.jit
def _mntp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr, loss_ptr, lse_ptr,
    V, D, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n_valid = tl.load(count_ptr)
    pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if tl.program_id(0) * BLOCK_M >= n_valid:
        return  # the grid covers all rows; only the first n_valid compacted slots are labelled
    row_mask = pos < n_valid
    # row * stride overflows int32 past 2**31 elements: index in int64
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        x = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, row_mask, cols.to(tl.int64), col_mask, D, stride_h,
            stride_w, HAS_BIAS, UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        tgt += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))  # every tile has >= 1 real column: finite
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, lse - tgt, mask=row_mask)


@triton.jit
def _mntp_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr, grad_ptr, lse_ptr, dh_ptr, acc_ptr,
    row_start, V, D, stride_h, stride_w, stride_dh, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dH for compacted slots [row_start + pid*BLOCK_M, ...): this program owns those rows."""
    n_valid = tl.load(count_ptr)
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if row_start + tl.program_id(0) * BLOCK_M >= n_valid:
        return
    pos = row_start + local
    row_mask = pos < n_valid
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        dz = _dlogits_tile(
            h_ptr, w_ptr, b_ptr, rows, row_mask, target, lse, grad, cols, col_mask, D,
            stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, PREC,
            BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            w = tl.load(
                w_ptr + cols[:, None] * stride_w + ds[None, :],
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            # dlogits go to the tensor cores in the input dtype, as torch's own backward does
            upd = tl.dot(dz.to(w.dtype), w, input_precision=PREC)
            acc_ptrs = acc_ptr + local[:, None] * D + ds[None, :]
            mask = row_mask[:, None] & d_mask[None, :]
            if v0 > 0:  # the first tile stores: re-running the kernel (autotune) is harmless
                upd += tl.load(acc_ptrs, mask=mask, other=0.0)
            if v0 + BLOCK_V >= V:
                out_ptrs = dh_ptr + rows[:, None] * stride_dh + ds[None, :]
                tl.store(out_ptrs, upd.to(dh_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(acc_ptrs, upd, mask=mask)


@triton.jit
def _mntp_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr, grad_ptr, lse_ptr, dw_ptr, db_ptr,
    acc_ptr, v_start, V, D, stride_h, stride_w, stride_dw, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dW (and dBias) for vocabulary [v_start + pid*BLOCK_V, ...): this program owns them."""
    n_valid = tl.load(count_ptr)
    local = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = (v_start + local).to(tl.int64)
    col_mask = cols < V
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(0, n_valid, BLOCK_M):
        pos = r0 + tl.arange(0, BLOCK_M)
        row_mask = pos < n_valid
        rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
        target = tl.load(labels_ptr + rows, mask=row_mask, other=0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
        dz = _dlogits_tile(
            h_ptr, w_ptr, b_ptr, rows, row_mask, target, lse, grad, cols, col_mask, D,
            stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, PREC,
            BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        if HAS_BIAS:
            db += tl.sum(dz, axis=0)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            h = tl.load(
                h_ptr + rows[:, None] * stride_h + ds[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                h = h.to(tl.float32)
            upd = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=PREC)
            acc_ptrs = acc_ptr + local[:, None] * D + ds[None, :]
            mask = col_mask[:, None] & d_mask[None, :]
            if r0 > 0:
                upd += tl.load(acc_ptrs, mask=mask, other=0.0)
            if r0 + BLOCK_M >= n_valid:
                out_ptrs = dw_ptr + cols[:, None] * stride_dw + ds[None, :]
                tl.store(out_ptrs, upd.to(dw_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(acc_ptrs, upd, mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_mask)


# --- launch configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LaunchConfig:
    block_m: int  # rows per tile (forward/dH: rows a program owns; dW: rows per step)
    block_v: int  # vocabulary columns per tile
    block_k: int  # reduction step over d when computing logits
    block_d: int  # width of the dH/dW output chunk (backward only)
    num_warps: int
    num_stages: int
    waves_per_eu: int = 0  # AMD occupancy hint; 0 = not passed

    def launch_kwargs(self) -> dict[str, int]:
        kw = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.waves_per_eu:
            kw["waves_per_eu"] = self.waves_per_eu
        return kw


C = _LaunchConfig
_CONFIGS: dict[str, dict[str, _LaunchConfig]] = {
    # Hopper/Blackwell: 128-row forward tiles with 8 warps keep the tensor cores fed; 3 stages of
    # (128x64 + 128x64) bf16 operands fit shared memory. The backward holds a [64, 128] float32
    # dlogits tile plus a [64|128, 128] float32 update, hence 64-row tiles.
    "hopper": {"fwd": C(128, 128, 64, 0, 8, 3), "dh": C(64, 128, 64, 128, 8, 3),
               "dw": C(64, 128, 64, 128, 8, 3)},
    # Ampere (A100: 164 KB shared memory): same shapes, 4 warps for the forward's smaller tiles.
    "ampere": {"fwd": C(64, 128, 64, 0, 4, 3), "dh": C(64, 128, 64, 128, 8, 2),
               "dw": C(64, 128, 64, 128, 8, 2)},
    "nvidia": {"fwd": C(64, 64, 32, 0, 4, 2), "dh": C(32, 64, 32, 64, 4, 2),
               "dw": C(32, 64, 32, 64, 4, 2)},
    # CDNA (MI200/MI300): no software pipelining (num_stages=1), 64-wide wavefronts so 4 warps
    # is 256 threads; never 32 warps (Liger #231); waves_per_eu=2 trades registers for occupancy.
    "cdna": {"fwd": C(64, 128, 64, 0, 4, 1, 2), "dh": C(64, 128, 64, 64, 4, 1, 2),
             "dw": C(64, 128, 64, 64, 4, 1, 2)},
    "amd": {"fwd": C(64, 64, 32, 0, 4, 1), "dh": C(32, 64, 32, 64, 4, 1),
            "dw": C(32, 64, 32, 64, 4, 1)},
    # Interpreter: tl.dot is a numpy matmul whose cost follows the padded MACs, so tiles fit the
    # test shapes tightly (d = 96 is 3 K steps of 32, V = 1003 four vocabulary tiles); measured
    # ~2x faster than 64 x 256 x 128 tiles on the 257-row tests.
    "interpreter": {"fwd": C(32, 256, 32, 0, 4, 1), "dh": C(32, 256, 32, 64, 4, 1),
                    "dw": C(32, 256, 32, 64, 4, 1)},
}  # fmt: skip
del C

# Chunks of rows / vocabulary that share the scratch are multiples of the largest tile.
_CHUNK_ALIGN = 256


def launch_config(device: torch.device, kernel: str) -> _LaunchConfig:
    """The fixed launch config of `kernel` ('fwd', 'dh' or 'dw') on `device`'s architecture."""
    return _CONFIGS[arch_family(device)][kernel]


def _autotune_configs(kernel: str) -> list[triton.Config]:
    out = []
    for bm in (32, 64, 128):
        for bv in (64, 128, 256):
            for warps in (4, 8):
                for stages in (1, 2, 3, 4):
                    meta = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": 64}
                    if kernel != "fwd":
                        if bm == 128:
                            continue  # float32 dlogits + update tiles spill registers
                        meta["BLOCK_D"] = 128 if kernel == "dh" else 64
                    out.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return out


@functools.cache
def _autotuned(kernel: str):  # noqa: ANN202 - a triton Autotuner
    # The kernels are idempotent (the first step of each accumulation stores instead of adding),
    # so autotune may re-run them without reset_to_zero/restore_value.
    fn = {"fwd": _mntp_fwd_kernel, "dh": _mntp_bwd_dh_kernel, "dw": _mntp_bwd_dw_kernel}[kernel]
    return triton.autotune(configs=_autotune_configs(kernel), key=["V", "D"])(fn)


def _launch(kernel: str, device: torch.device, grid_of, args: tuple, flags: dict) -> None:
    """Launch `kernel` with the fixed config of the device, or autotuned (BIDIRLM_AUTOTUNE=1)."""
    if autotune_enabled():
        _autotuned(kernel)[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_V"])](*args, **flags)
        return
    cfg = launch_config(device, kernel)
    fn = {"fwd": _mntp_fwd_kernel, "dh": _mntp_bwd_dh_kernel, "dw": _mntp_bwd_dw_kernel}[kernel]
    blocks = {"BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k}
    if kernel != "fwd":
        blocks["BLOCK_D"] = cfg.block_d
    fn[grid_of(cfg.block_m, cfg.block_v)](*args, **flags, **blocks, **cfg.launch_kwargs())


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunk(total: int, d: int, device: torch.device) -> int:
    """Rows (or vocabulary entries) per launch so a float32 `[chunk, d]` scratch stays bounded.

    At most `_SCRATCH_BYTES`, unless one wave of 128-wide tiles (one per SM) needs more: an idle
    SM costs more than the memory. H100 (132 SMs), d = 2048: 16,896 x 2048 x 4 B = 138 MB; a
    float32 weight gradient needs no less, because every tile in flight holds a float32 partial.
    """
    budget = (_SCRATCH_BYTES // (4 * max(d, 1))) // _CHUNK_ALIGN * _CHUNK_ALIGN
    wave = triton.cdiv(_sm_count(device) * 128, _CHUNK_ALIGN) * _CHUNK_ALIGN
    chunk = max(budget, wave, _CHUNK_ALIGN)
    return min(chunk, triton.cdiv(max(total, 1), _CHUNK_ALIGN) * _CHUNK_ALIGN)


def _compact(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): labelled row indices first, in order; count as a 1-element int32 tensor.

    A stable partition on the device instead of `nonzero()`, which would sync with the host.
    """
    valid = labels != ignore_index
    order = torch.argsort(valid.to(torch.uint8), descending=True, stable=True)
    count = valid.sum(dtype=torch.int32).reshape(1)
    return order, count


def _flags(hidden: torch.Tensor, bias: torch.Tensor | None, softcap: float) -> dict:
    prec = None  # the backend's default (16-bit operands; TF32 where torch allows it)
    if hidden.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        prec = "ieee"  # torch's float32 matmul is full precision by default: match it
    upcast = interpreting() and hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16
    return {
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": softcap > 0.0,
        # bf16 arithmetic is wrong in the interpreter (it computes on raw bits)
        "UPCAST": upcast,
        "PREC": prec,
    }


def _triton_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [N] and lse [N] (float32; 0 at ignored rows) of `hidden [N, d]`."""
    n, d = hidden.shape
    v = weight.shape[0]
    loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return loss, lse
    order, count = _compact(labels, ignore_index)
    b = bias if bias is not None else weight  # dummy pointer, never read (HAS_BIAS=False)
    args = (hidden, weight, b, labels, order, count, loss, lse, v, d,
            hidden.stride(0), weight.stride(0), softcap)  # fmt: skip
    _launch(
        "fwd",
        hidden.device,
        lambda bm, bv: (triton.cdiv(n, bm),),
        args,
        _flags(hidden, bias, softcap),
    )
    return loss, lse


def _triton_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float,
    need_dh: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dhidden [N, d], dweight [V, d], dbias [V]) for per-row loss gradients `grad`.

    A gradient that is not needed (need_dh / need_dw, the latter covering weight and bias) is
    None and its kernel is not launched: a frozen lm_head halves the backward.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    db = torch.zeros_like(bias) if bias is not None and need_dw else None
    if n == 0 or not (need_dh or need_dw):
        return dh, dw, db
    grad = grad.to(torch.float32).contiguous()
    order, count = _compact(labels, ignore_index)
    flags = _flags(hidden, bias, softcap)
    b = bias if bias is not None else weight
    row_chunk, vocab_chunk = _chunk(n, d, dev), _chunk(v, d, dev)
    rows_needed = max(row_chunk if need_dh else 0, vocab_chunk if need_dw else 0)
    scratch = torch.empty(rows_needed * d, dtype=torch.float32, device=dev)
    common = (hidden, weight, b, labels, order, count, grad, lse)
    for start in range(0, n if need_dh else 0, row_chunk):
        rows = min(row_chunk, n - start)
        args = (*common, dh, scratch, start, v, d, hidden.stride(0), weight.stride(0),
                dh.stride(0), softcap)  # fmt: skip
        _launch("dh", dev, lambda bm, bv, rows=rows: (triton.cdiv(rows, bm),), args, flags)
    for start in range(0, v if need_dw else 0, vocab_chunk):
        cols = min(vocab_chunk, v - start)
        args = (*common, dw, db if db is not None else dw, scratch, start, v, d,
                hidden.stride(0), weight.stride(0), dw.stride(0), softcap)  # fmt: skip
        _launch("dw", dev, lambda bm, bv, cols=cols: (triton.cdiv(cols, bv),), args, flags)
    return dh, dw, db
