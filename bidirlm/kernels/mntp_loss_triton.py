"""Triton kernels, launch configs and launchers of the fused MNTP loss (see `mntp_loss.py`).

Kept apart from the public API so that `import bidirlm.kernels` (which imports `mntp_loss`
eagerly, see the package docstring) never imports Triton.

Forward (2 launches): `_mntp_fwd_kernel` on a (labelled-row blocks x vocabulary splits) grid,
each program an online log-sum-exp over its split; `_mntp_merge_kernel` merges the splits'
log-sum-exps exactly (`lse = M + log sum_k exp(lse_k - M)`), adds the target logit written by the
split that holds it, and scatters the per-row results.

Backward: chunks of `Rc` labelled slots x `Vc` vocabulary entries. `_mntp_dz_kernel` writes the
chunk's `dlogits` (input dtype, as torch's own backward feeds its GEMMs) into one bounded buffer;
`_mntp_dh_kernel` (`dz @ W[chunk]`) and `_mntp_dw_kernel` (`dz.T @ H[slots]`) are GEMMs over the
whole chunk with fp32 accumulators on chip. A GEMM adds its tile to a float32 partial in global
memory once per chunk (its epilogue), never inside its K loop; the partial of dW covers one
vocabulary chunk, that of dH one row chunk. Every output tile has one owner: deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import config
from .config import arch_family, autotune_enabled
from .dispatch import interpreting

# Working memory of the backward beyond inputs and gradients: the dlogits chunk plus one float32
# partial (dH rows or dW rows of a chunk). See `_chunk_sizes` for the math.
_SCRATCH_BYTES = 48 * 2**20


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
        # loaded as [BLOCK_K, BLOCK_V]: the dot needs no transpose
        w = tl.load(
            w_ptr + cols[None, :] * stride_w + ks[:, None],
            mask=col_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        if UPCAST:  # the interpreter computes bf16 on raw bits: go to float32 at once
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _mntp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr,
    lse_part_ptr, sum_part_ptr, max_part_ptr, arg_part_ptr, tgt_ptr,
    N, V, D, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    ACCURACY: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (labelled-slot block, vocabulary split): the split's log-sum-exp per row.

    Writes `lse_part[split, slot]` (-inf for an empty split), and when asked the split's sum of
    logits (label smoothing) and its max / first argmax (token accuracy); the split holding a
    row's target writes the target logit `tgt[slot]`.
    """
    n_valid = tl.load(count_ptr)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    if pid_m * BLOCK_M >= n_valid:
        return  # the grid covers all rows; only the first n_valid compacted slots are labelled
    n_splits = tl.num_programs(1)
    per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits) * BLOCK_V
    v_lo = pid_s * per_split
    v_hi = tl.minimum(v_lo + per_split, V)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = pos < n_valid
    # row * stride overflows int32 past 2**31 elements: index in int64
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    amax = tl.zeros([BLOCK_M], dtype=tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        x = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, row_mask, cols.to(tl.int64), col_mask, D, stride_h,
            stride_w, HAS_BIAS, UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        tgt += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        if SMOOTH:
            xsum += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        tile_max = tl.max(x, axis=1)  # every tile has >= 1 real column: finite
        if ACCURACY:  # first index of the max, as torch.argmax
            first = tl.min(tl.where(x == tile_max[:, None], cols[None, :], V), axis=1)
            amax = tl.where(tile_max > m, first, amax)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    part = pid_s * N + pos
    tl.store(lse_part_ptr + part, m + tl.log(s), mask=row_mask)  # -inf when the split is empty
    if SMOOTH:
        tl.store(sum_part_ptr + part, xsum, mask=row_mask)
    if ACCURACY:
        tl.store(max_part_ptr + part, m, mask=row_mask)
        tl.store(arg_part_ptr + part, amax, mask=row_mask)
    owns = row_mask & (target >= v_lo) & (target < v_hi)
    tl.store(tgt_ptr + pos, tgt, mask=owns)


@triton.jit
def _mntp_merge_kernel(
    lse_part_ptr, sum_part_ptr, max_part_ptr, arg_part_ptr, tgt_ptr, labels_ptr, order_ptr,
    count_ptr, loss_ptr, lse_ptr, correct_ptr, N, V, smoothing,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, SMOOTH: tl.constexpr,
    ACCURACY: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Exact merge of the splits per labelled row; scatters loss, lse (and correct) by row."""
    n_valid = tl.load(count_ptr)
    if tl.program_id(0) * BLOCK_R >= n_valid:
        return
    pos = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = pos < n_valid
    sp = tl.arange(0, SPLITS_P2)
    mask2 = row_mask[:, None] & (sp < SPLITS)[None, :]
    part = sp[None, :] * N + pos[:, None]
    lse_k = tl.load(lse_part_ptr + part, mask=mask2, other=float("-inf"))
    big = tl.max(lse_k, axis=1)  # split 0 is never empty: finite
    lse = big + tl.log(tl.sum(tl.exp(lse_k - big[:, None]), axis=1))
    tgt = tl.load(tgt_ptr + pos, mask=row_mask, other=0.0)
    if SMOOTH:
        # (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j): torch's label_smoothing
        xsum = tl.sum(tl.load(sum_part_ptr + part, mask=mask2, other=0.0), axis=1)
        loss = lse - (1.0 - smoothing) * tgt - (smoothing / V) * xsum
    else:
        loss = lse - tgt
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if ACCURACY:
        mx = tl.load(max_part_ptr + part, mask=mask2, other=float("-inf"))
        arg = tl.load(arg_part_ptr + part, mask=mask2, other=V)
        best = tl.max(mx, axis=1)
        first = tl.min(tl.where(mx == best[:, None], arg, V), axis=1)  # splits are in order
        target = tl.load(labels_ptr + rows, mask=row_mask, other=0)
        tl.store(correct_ptr + rows, tl.where(first == target, 1.0, 0.0), mask=row_mask)


@triton.jit
def _mntp_dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr, gce_ptr, glse_ptr, lse_ptr, dz_ptr,
    r0, c0, n_chunk_cols, V, D, stride_h, stride_w, stride_dz, softcap, smoothing,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_GLSE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One tile of the chunk `dz[slot r0 + i, col c0 + j] = d loss / d logit` (before softcap').

    `dz = (g_ce + g_lse) * softmax - g_ce * ((1 - eps) [j == t] + eps / V)`, times
    `1 - tanh^2` under softcap; 0 outside the labelled slots and the vocabulary.
    """
    n_valid = tl.load(count_ptr)
    pid_m = tl.program_id(0)
    if r0 + pid_m * BLOCK_M >= n_valid:
        return  # no GEMM reads these slots (their K loops stop at n_valid, their rows exit)
    local_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    pos = r0 + local_r
    row_mask = pos < n_valid
    col_mask = local_c < n_chunk_cols
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    cols = (c0 + local_c).to(tl.int64)
    target = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_ce = tl.load(gce_ptr + rows, mask=row_mask, other=0.0)
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
    if HAS_GLSE:
        p = p * (g_ce + tl.load(glse_ptr + rows, mask=row_mask, other=0.0))[:, None]
    else:
        p = p * g_ce[:, None]
    hit = cols[None, :] == target[:, None]
    if SMOOTH:
        dz = p - g_ce[:, None] * (tl.where(hit, 1.0 - smoothing, 0.0) + smoothing / V)
    else:
        dz = p - tl.where(hit, g_ce[:, None], 0.0)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)  # d/dx softcap*tanh(x/softcap)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    ptrs = dz_ptr + local_r[:, None].to(tl.int64) * stride_dz + local_c[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty))


@triton.jit
def _mntp_dh_kernel(
    dz_ptr, w_ptr, order_ptr, count_ptr, acc_ptr, dh_ptr,
    r0, c0, n_chunk_cols, D, stride_w, stride_dz, stride_dh, first, last,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`dH[slots] (+)= dz[Rc, vc] @ W[c0 : c0 + vc]`: a GEMM whose K loop (the chunk's
    vocabulary) accumulates on chip; the float32 row-chunk partial `acc` is read and written once
    per vocabulary chunk, and the last chunk scatters the result to `dH[order[slot]]`."""
    n_valid = tl.load(count_ptr)
    pid_m = tl.program_id(0)
    if r0 + pid_m * BLOCK_M >= n_valid:
        return
    local_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = r0 + local_r < n_valid
    ds = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = ds < D
    a_base = dz_ptr + local_r[:, None].to(tl.int64) * stride_dz
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_chunk_cols, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_chunk_cols
        a = tl.load(a_base + ks[None, :], mask=k_mask[None, :], other=0.0)
        b = tl.load(
            w_ptr + (c0 + ks).to(tl.int64)[:, None] * stride_w + ds[None, :],
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    mask = row_mask[:, None] & d_mask[None, :]
    acc_ptrs = acc_ptr + local_r[:, None].to(tl.int64) * D + ds[None, :]
    if first == 0:
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
    if last != 0:
        rows = tl.load(order_ptr + r0 + local_r, mask=row_mask, other=0).to(tl.int64)
        out = dh_ptr + rows[:, None] * stride_dh + ds[None, :]
        tl.store(out, acc.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptrs, acc, mask=mask)


@triton.jit
def _mntp_dw_kernel(
    dz_ptr, h_ptr, order_ptr, count_ptr, acc_ptr, accb_ptr, dw_ptr, db_ptr,
    r0, c0, n_chunk_rows, n_chunk_cols, D, stride_h, stride_dz, stride_dw,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`dW[c0 + j] (+)= dz[:, j].T @ H[order[r0 + k]]` over the chunk's labelled slots: a GEMM
    whose K loop (the slots) accumulates on chip in float32; the vocabulary-chunk partial `acc`
    is read and written once per row chunk, and the last row chunk writes dW (and dBias)."""
    n_valid = tl.load(count_ptr)
    if r0 >= n_valid:
        return
    n_k = tl.minimum(n_chunk_rows, n_valid - r0)
    local_c = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = local_c < n_chunk_cols
    pid_d = tl.program_id(1)
    ds = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = ds < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_k
        a = tl.load(
            dz_ptr + ks[:, None].to(tl.int64) * stride_dz + local_c[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_M]
        rows = tl.load(order_ptr + r0 + ks, mask=k_mask, other=0).to(tl.int64)
        b = tl.load(
            h_ptr + rows[:, None] * stride_h + ds[None, :],
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
        if HAS_BIAS:
            dbias += tl.sum(a.to(tl.float32), axis=0)
    mask = col_mask[:, None] & d_mask[None, :]
    b_mask = col_mask & (pid_d + tl.zeros_like(local_c) == 0)  # one program per column owns it
    acc_ptrs = acc_ptr + local_c[:, None].to(tl.int64) * D + ds[None, :]
    if r0 > 0:
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
        if HAS_BIAS:
            dbias += tl.load(accb_ptr + local_c, mask=b_mask, other=0.0)
    cols = (c0 + local_c).to(tl.int64)
    if r0 + n_chunk_rows >= n_valid:  # the last row chunk with labelled slots
        tl.store(dw_ptr + cols[:, None] * stride_dw + ds[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip
        if HAS_BIAS:
            tl.store(db_ptr + cols, dbias.to(db_ptr.dtype.element_ty), mask=b_mask)
    else:
        tl.store(acc_ptrs, acc, mask=mask)
        if HAS_BIAS:
            tl.store(accb_ptr + local_c, dbias, mask=b_mask)


# --- launch configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LaunchConfig:
    block_m: int  # fwd/dz: labelled rows per tile; GEMMs: output rows (slots for dH, vocab for dW)
    block_n: int  # fwd/dz: vocabulary per tile; GEMMs: output columns (hidden width)
    block_k: int  # reduction step (d for fwd/dz; vocabulary for dH; slots for dW)
    num_warps: int
    num_stages: int
    waves_per_eu: int = 0  # AMD occupancy hint; 0 = not passed

    def launch_kwargs(self) -> dict[str, int]:
        kw = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.waves_per_eu:
            kw["waves_per_eu"] = self.waves_per_eu
        return kw


@dataclass(frozen=True)
class _Family:
    fwd: _LaunchConfig  # forward and dz kernels: logits tiles
    gemm: _LaunchConfig  # dH and dW GEMMs
    align: int  # chunk sizes are multiples of this (every tile divides it)
    max_chunk: int  # largest Rc / Vc
    programs_per_sm: int  # forward splits aim at this many programs per SM


C = _LaunchConfig
_CONFIGS: dict[str, _Family] = {
    # Hopper/Blackwell: 128 x 128 tiles, 8 warps (two warpgroups) keep wgmma fed; 3 stages of
    # (128x64 + 64x128) bf16 operands = 96 KB of the 228 KB of shared memory. GEMM accumulators
    # are 64 registers per thread.
    "hopper": _Family(C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 3), 256, 4096, 4),
    # Ampere (A100: 164 KB shared memory): the same tiles, fwd/dz with BLOCK_K 32.
    "ampere": _Family(C(128, 128, 32, 8, 3), C(128, 128, 32, 8, 3), 256, 4096, 4),
    "nvidia": _Family(C(64, 64, 32, 4, 2), C(64, 64, 32, 4, 2), 256, 2048, 4),
    # CDNA (MI200/MI300): no software pipelining (num_stages=1), 64-wide wavefronts so 4 warps
    # is 256 threads; never 32 warps (Liger #231); waves_per_eu=2 trades registers for occupancy.
    "cdna": _Family(C(128, 128, 64, 8, 1, 2), C(128, 128, 64, 8, 1, 2), 256, 4096, 4),
    "amd": _Family(C(64, 64, 32, 4, 1), C(64, 64, 32, 4, 1), 256, 2048, 4),
    # Interpreter: tl.dot is a numpy matmul whose cost follows the padded MACs, so tiles fit the
    # test shapes (d = 96 is 3 K steps of 32, V = 1003 eight vocabulary tiles) and chunks are
    # small so the tests cover several chunks and splits.
    "interpreter": _Family(C(32, 128, 32, 4, 1), C(64, 128, 64, 4, 1), 128, 512, 4),
}


# float32 IEEE dots run on the FP32 units (no tensor cores): Triton keeps the operand slices in
# registers, and 128 x 128 tiles with BLOCK_K 64 spill on sm_90 (255 registers + 44-280 B in the
# fwd, dz and biased dW kernels). Half the rows and BLOCK_K 32 fit (all kernels, GEMMs included).
_FP32_TILES = {"hopper": C(64, 128, 32, 8, 2), "ampere": C(64, 128, 32, 8, 2)}
del C


def launch_config(
    device: torch.device, kernel: str, dtype: torch.dtype = torch.bfloat16
) -> _LaunchConfig:
    """The fixed launch config of `kernel` ('fwd', 'dz', 'gemm') on `device`'s architecture."""
    name = arch_family(device)
    family = _CONFIGS[name]
    if dtype == torch.float32 and name in _FP32_TILES:
        return _FP32_TILES[name]
    return family.gemm if kernel == "gemm" else family.fwd


def _autotune_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bv, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 256, 64, 8, 3),
        ]
    ]


@functools.cache
def _autotuned(kernel: str):  # noqa: ANN202 - a triton Autotuner
    # Both kernels are idempotent (pure stores), so autotune may re-run them.
    fn = {"fwd": _mntp_fwd_kernel, "dz": _mntp_dz_kernel}[kernel]
    return triton.autotune(configs=_autotune_configs(), key=["V", "D"])(fn)


def _launch_tiles(
    kernel: str, device: torch.device, grid_of, args: tuple, flags: dict, dtype: torch.dtype
) -> None:
    """Launch the fwd or dz kernel: the device's fixed config, or autotuned (BIDIRLM_AUTOTUNE=1)."""
    if autotune_enabled():
        _autotuned(kernel)[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_V"])](*args, **flags)
        return
    cfg = launch_config(device, kernel, dtype)
    fn = {"fwd": _mntp_fwd_kernel, "dz": _mntp_dz_kernel}[kernel]
    blocks = {"BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_n, "BLOCK_K": cfg.block_k}
    fn[grid_of(cfg.block_m, cfg.block_n)](*args, **flags, **blocks, **cfg.launch_kwargs())


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few "SMs" so the tests see several vocabulary splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits of the forward so that few labelled rows still fill the GPU.

    The number of labelled rows is on the device (no host sync), so the grid assumes MNTP's
    usual fraction, about a third of `n`: (row blocks / 3) x splits ~ `programs_per_sm` waves.
    Each split keeps >= 4 vocabulary tiles (one tile in the interpreter) so its merge is cheap.
    """
    name = arch_family(device)
    return _num_splits_of(_CONFIGS[name], n, v, _sm_count(device), name == "interpreter")


def _num_splits_of(family: _Family, n: int, v: int, sms: int, interpreter: bool = False) -> int:
    bm, bv = family.fwd.block_m, family.fwd.block_n
    tiles = triton.cdiv(v, bv)
    min_tiles = 1 if interpreter else 4
    row_blocks = max(1, triton.cdiv(n, bm) // 3)
    wanted = triton.cdiv(family.programs_per_sm * sms, row_blocks)
    return max(1, min(wanted, tiles // min_tiles, 64))


def working_memory(
    n: int, v: int, d: int, elem: int, *, family: str = "hopper", sms: int = 132
) -> dict[str, int]:
    """Bytes the op allocates beyond its inputs, outputs and gradients, as the launchers size
    them (no GPU needed): `fwd` (compaction, split partials, saved lse) and `bwd` (compaction,
    float32 upstream gradient, saved lse, dlogits chunk, the larger float32 partial)."""
    fam = _CONFIGS[family]
    splits = _num_splits_of(fam, n, v, sms)
    compact = n * 8 + 4
    fwd = compact + splits * n * 4 + n * 4 + n * 4  # order, lse parts, target logits, lse
    rc, vc = _chunk_sizes_of(fam, n, v, d, elem, True, True)
    partial = max(rc * d * 4 if vc < v else 0, (vc * d * 4 + vc * 4) if rc < n else 0)
    bwd = compact + n * 4 + n * 4 + rc * vc * elem + partial
    return {"fwd": fwd, "bwd": bwd, "chunk_rows": rc, "chunk_vocab": vc, "splits": splits}


def _chunk_sizes(
    n: int, v: int, d: int, elem: int, need_dh: bool, need_dw: bool, device: torch.device
) -> tuple[int, int]:
    """(Rc, Vc): labelled slots x vocabulary per backward chunk.

    Working memory = `Rc * Vc * elem` (the dlogits chunk) + the float32 partials: dH's
    `Rc * d * 4` (only with more than one vocabulary chunk) and dW's `Vc * d * 4` (only with more
    than one row chunk); at most `_SCRATCH_BYTES` unless even the smallest chunk exceeds it. One
    row chunk covering all `n` rows is preferred (each dlogits chunk then feeds both GEMMs: 8
    n V d FLOPs in all); otherwise the dH and dW passes recompute the chunk each (10 n V d).
    Example (bf16, H100/H200): n = 32,768 tokens, V = 151,936, d = 1024: one row chunk would
    need a 128 MB float32 dH partial, so two passes with Rc = Vc = 3840: 28 MB of dlogits + a
    15 MB partial = 43 MB (d = 2048: 3328 x 3328, 21 + 26 = 47 MB); with the compaction index,
    float32 upstream gradient and saved lse (0.4 MB) the backward needs 44 MB (48 MB at d = 2048),
    below the 64 MB target, whatever the labelled fraction (`working_memory`).
    """
    return _chunk_sizes_of(_CONFIGS[arch_family(device)], n, v, d, elem, need_dh, need_dw)


def _chunk_sizes_of(
    family: _Family, n: int, v: int, d: int, elem: int, need_dh: bool, need_dw: bool
) -> tuple[int, int]:
    align, cap = family.align, family.max_chunk
    n_al = triton.cdiv(max(n, 1), align) * align
    v_al = triton.cdiv(v, align) * align

    def cost(rc: int, vc: int) -> int:  # the two partials are never alive together
        dh = rc * d * 4 if need_dh and vc < v else 0
        dw = (vc * d * 4 + vc * 4) if need_dw and rc < n else 0
        return rc * vc * elem + max(dh, dw)

    # one row chunk: the largest vocabulary chunk that fits, if it is not tiny
    vc = min(v_al, cap)
    while vc > align and cost(n_al, vc) > _SCRATCH_BYTES:
        vc -= align
    if cost(n_al, vc) <= _SCRATCH_BYTES and (vc >= min(v_al, cap // 4) or n_al <= cap):
        return n_al, vc
    size = cap
    while size > align and cost(min(size, n_al), min(size, v_al)) > _SCRATCH_BYTES:
        size -= align
    return min(size, n_al), min(size, v_al)


def _compact(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): labelled row indices first, in order; count as a 1-element int32 tensor.

    A stable partition on the device instead of `nonzero()`, which would sync with the host.
    """
    valid = labels != ignore_index
    order = torch.argsort(valid.to(torch.uint8), descending=True, stable=True)
    count = valid.sum(dtype=torch.int32).reshape(1)
    return order, count


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str | None:
    """`input_precision` of the kernels' dots, valid on every target.

    16-bit inputs: None (the backend's default; the operands are 16-bit). float32: "ieee" when
    torch's float32 matmuls are full precision (its default) or on AMD other than gfx942, where
    "tf32" does not exist (gfx90a allows ieee, bf16x3, bf16x6); else "tf32" as torch's own
    allow_tf32 GEMMs.
    """
    if dtype != torch.float32:
        return None
    if not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    key = config.arch_key(device)  # AMD: only gfx942 (CDNA3) has xf32, Triton's "tf32" there
    if key.startswith("amd") and key != "amd-gfx942":
        return "ieee"
    return "tf32"


def _flags(hidden: torch.Tensor, bias: torch.Tensor | None, softcap: float) -> dict:
    upcast = interpreting() and hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16
    return {
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": softcap > 0.0,
        # bf16 arithmetic is wrong in the interpreter (it computes on raw bits)
        "UPCAST": upcast,
        "PREC": _dot_precision(hidden.dtype, hidden.device),
    }


def _triton_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float,
    label_smoothing: float = 0.0,
    with_accuracy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss [N], lse [N] and correct [N] (float32; 0 at ignored rows; correct is empty
    unless `with_accuracy`) of `hidden [N, d]`."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    loss = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    correct = torch.zeros(n if with_accuracy else 0, dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse, correct
    order, count = _compact(labels, ignore_index)
    splits = _num_splits(n, v, dev)
    smooth = label_smoothing > 0.0
    lse_part = torch.empty(splits, n, dtype=torch.float32, device=dev)
    sum_part = torch.empty(splits, n, dtype=torch.float32, device=dev) if smooth else lse_part
    max_part = torch.empty(splits, n, dtype=torch.float32, device=dev) if with_accuracy else lse
    arg_part = torch.empty(splits, n, dtype=torch.int32, device=dev) if with_accuracy else count
    tgt = torch.zeros(n, dtype=torch.float32, device=dev)  # 0 for out-of-range labels
    b = bias if bias is not None else weight  # dummy pointer, never read (HAS_BIAS=False)
    flags = _flags(hidden, bias, softcap)
    args = (hidden, weight, b, labels, order, count, lse_part, sum_part, max_part, arg_part, tgt,
            n, v, d, hidden.stride(0), weight.stride(0), softcap)  # fmt: skip
    flags = {**flags, "SMOOTH": smooth, "ACCURACY": with_accuracy}
    _launch_tiles(
        "fwd", dev, lambda bm, bv: (triton.cdiv(n, bm), splits), args, flags, hidden.dtype
    )
    block_r = 64
    _mntp_merge_kernel[(triton.cdiv(n, block_r),)](
        lse_part, sum_part, max_part, arg_part, tgt, labels, order, count, loss, lse,
        correct if with_accuracy else loss, n, v, float(label_smoothing),
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), SMOOTH=smooth,
        ACCURACY=with_accuracy, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return loss, lse, correct


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
    label_smoothing: float = 0.0,
    grad_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dhidden [N, d], dweight [V, d], dbias [V]) for per-row gradients of the loss (`grad`)
    and of the log-sum-exp (`grad_lse`, from the z-loss; None = 0).

    A gradient that is not needed (need_dh / need_dw, the latter covering weight and bias) is
    None and its GEMMs are not launched: a frozen lm_head saves a third of the backward.
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
    glse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else grad
    order, count = _compact(labels, ignore_index)
    flags = _flags(hidden, bias, softcap)
    # the interpreter keeps dlogits in float32: its bf16 stores are not round-to-nearest
    dz_dtype = torch.float32 if flags["UPCAST"] else hidden.dtype
    elem = torch.finfo(dz_dtype).bits // 8
    rc, vc = _chunk_sizes(n, v, d, elem, need_dh, need_dw, dev)
    dz = torch.empty(rc, vc, dtype=dz_dtype, device=dev)
    multi_row = rc < n
    f32 = {"dtype": torch.float32, "device": dev}
    acc_h = acc_w = acc_b = dz  # dummies until a pass needs them (never both partials at once)
    b = bias if bias is not None else weight
    smooth = label_smoothing > 0.0
    dz_flags = {**flags, "SMOOTH": smooth, "HAS_GLSE": grad_lse is not None}
    gemm = launch_config(dev, "gemm", hidden.dtype)
    gemm_kw = {"BLOCK_M": gemm.block_m, "BLOCK_N": gemm.block_n, "BLOCK_K": gemm.block_k,
               "UPCAST": flags["UPCAST"], "PREC": flags["PREC"],
               **gemm.launch_kwargs()}  # fmt: skip
    row_chunks = range(0, n, rc)
    vocab_chunks = range(0, v, vc)

    def make_dz(r0: int, c0: int) -> int:
        cols = min(vc, v - c0)
        args = (hidden, weight, b, labels, order, count, grad, glse, lse, dz, r0, c0, cols, v, d,
                hidden.stride(0), weight.stride(0), dz.stride(0), softcap,
                float(label_smoothing))  # fmt: skip
        grid_of = lambda bm, bv: (triton.cdiv(rc, bm), triton.cdiv(cols, bv))  # noqa: E731
        _launch_tiles("dz", dev, grid_of, args, dz_flags, hidden.dtype)
        return cols

    def dw_gemm(r0: int, c0: int, cols: int) -> None:
        grid = (triton.cdiv(cols, gemm.block_m), triton.cdiv(d, gemm.block_n))
        _mntp_dw_kernel[grid](
            dz, hidden, order, count, acc_w, acc_b, dw, db if db is not None else dw, r0, c0,
            rc, cols, d, hidden.stride(0), dz.stride(0), dw.stride(0),
            HAS_BIAS=db is not None, **gemm_kw,
        )  # fmt: skip

    def dh_gemm(r0: int, c0: int, cols: int) -> None:
        grid = (triton.cdiv(rc, gemm.block_m), triton.cdiv(d, gemm.block_n))
        _mntp_dh_kernel[grid](
            dz, weight, order, count, acc_h, dh, r0, c0, cols, d, weight.stride(0), dz.stride(0),
            dh.stride(0), int(c0 == 0), int(c0 + vc >= v), **gemm_kw,
        )  # fmt: skip

    if not multi_row:  # one row chunk: each dlogits chunk feeds both GEMMs
        if need_dh and vc < v:
            acc_h = torch.empty(rc, d, **f32)
        for c0 in vocab_chunks:
            cols = make_dz(0, c0)
            if need_dw:
                dw_gemm(0, c0, cols)
            if need_dh:
                dh_gemm(0, c0, cols)
        return dh, dw, db
    if need_dw:  # vocabulary-major: dW's partial covers one vocabulary chunk
        acc_w = torch.empty(vc, d, **f32)
        acc_b = torch.empty(vc, **f32) if db is not None else dz
        for c0 in vocab_chunks:
            for r0 in row_chunks:
                dw_gemm(r0, c0, make_dz(r0, c0))
    if need_dh:  # row-major: dH's partial covers one row chunk
        acc_w = acc_b = dz
        acc_h = torch.empty(rc, d, **f32) if vc < v else dz
        for r0 in row_chunks:
            for c0 in vocab_chunks:
                dh_gemm(r0, c0, make_dz(r0, c0))
    return dh, dw, db
