"""Triton kernels, launch configs and launchers of the fused MNTP loss (see `mntp_loss.py`).

Kept apart from the public API so that `import bidirlm.kernels` (which imports `mntp_loss`
eagerly, see the package docstring) never imports Triton.

Forward (2 launches, whatever the number of rows): `_mntp_fwd_kernel` is persistent: a grid of
`persist` programs per SM strides over (vocabulary split, labelled-row block) units, the number
of row blocks read from the on-device labelled count, each unit an online log-sum-exp over its
split (full vocabulary tiles unmasked, the split's partial last tile masked; per logit a max, one
FFMA, one exp2 and an add); `_mntp_merge_kernel` merges the splits' log-sum-exps exactly
(`lse = M + log sum_k exp(lse_k - M)`), takes the target logit once per row as a float32 dot
`h . W[label]` (no compare against every vocabulary column), and scatters the per-row results.

Backward (2 launches per dlogits chunk): chunks of `Rc` labelled slots x `Vc` vocabulary entries,
`Rc` covering every labelled slot (sized from `num_labelled` when the caller passes it).
`_mntp_dz_kernel` writes the chunk's `dlogits` (input dtype, as torch's own backward feeds its
GEMMs) into one bounded buffer (plain cross entropy: the target entry from the forward's per-row
loss, `exp(-loss)`, so no per-logit compare); `_mntp_grads_kernel` runs both GEMMs on it in one
launch, `dW[chunk] = dz.T @ H[slots]` (K loop over all slots: no partial) and `dH[slots] += dz @
W[chunk]`, with fp32 accumulators on chip: 8 n V d FLOPs in all with the forward. dH's float32
partial across vocabulary chunks is read once per chunk (it starts the accumulator) and written
once (the epilogue), never inside a K loop, and lives in dH's own ignored rows when there is
room (see `_bwd_plan_of`). Every output tile has one owner: deterministic, no atomics.
Optional gradient filtering (Cut Cross-Entropy's): dlogits tiles below `filter_eps` x the row's
gradient are skipped by the GEMMs.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import config
from .config import arch_family, autotune_enabled
from .dispatch import interpreting
from .exp2_triton import exp2_mufu as _exp2
from .exp2_triton import row_sum_exp2

# Working memory of the backward beyond inputs and gradients: the dlogits chunk plus one float32
# partial (dH rows or dW rows of a chunk). See `_bwd_plan_of` for the math. 56 MB keeps the
# op under 64 MB in all and lets the target shape (32k tokens, 30% labelled, V = 151,936) take
# Vc = 2,816 (54 chunks, 110 launches; 48 MB gave Vc = 1,792 / 1,536 at d = 1024 / 2048 and
# 172 / 200 launches, 0.7 ms more in bench/perf_model_losses.py's prediction).
_SCRATCH_BYTES = 56 * 2**20


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


LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): one FFMA with the shift


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
    MASKED: tl.constexpr = True,
    EVEN_K: tl.constexpr = False,
):
    """float32 `[BLOCK_M, BLOCK_V]` tile of `H[rows] @ W[cols].T + b[cols]` (before softcap).

    MASKED=False: every row and column index is a valid address (the caller clamps them), so
    the loads take no row/column mask; EVEN_K: `D` is a positive multiple of BLOCK_K (the
    launcher checks), so no mask along K either, and the K loop runs at least once: without
    a zero-trip path the compiler zero-fills the accumulator once per tile, not twice."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    if EVEN_K:
        tl.assume(D > 0)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
        # loaded as [BLOCK_K, BLOCK_V]: the dot needs no transpose
        w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]
        if EVEN_K and not MASKED:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        elif EVEN_K:
            h = tl.load(h_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        elif not MASKED:
            h = tl.load(h_ptrs, mask=(ks < D)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(ks < D)[:, None], other=0.0)
        else:
            k_mask = ks < D
            h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:  # the interpreter computes bf16 on raw bits: go to float32 at once
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PREC)
    if HAS_BIAS:
        if MASKED:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_tile(
    h_ptr, w_ptr, b_ptr, rows, row_mask, v0, v_hi, V, D, stride_h, stride_w, softcap,
    m, s, xsum, amax,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    ACCURACY: tl.constexpr, MASKED: tl.constexpr, FTZ: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    POLY_LOG: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """One vocabulary tile `[v0, v0 + BLOCK_V)` of the online log-sum-exp: the updated (max,
    sum of exp, sum of logits, first argmax) per row. Only a MASKED tile (the split's partial
    last one) masks columns `>= v_hi`; a full tile's elementwise work per logit is the max, one
    FFMA (x log2(e) - m log2(e)), one exp2 and the sum."""
    cols = v0 + tl.arange(0, BLOCK_V)
    if MASKED:
        col_mask = cols < v_hi
    else:
        col_mask = cols >= 0  # always true, folded away
    # rows past the labelled ones read row 0's h (`other=0` of their index load: a valid
    # address; their results are never stored), so only the tail tile's columns need a mask
    x = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, row_mask, cols, col_mask, D, stride_h, stride_w, HAS_BIAS,
        UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K, MASKED, EVEN_K,
    )  # fmt: skip
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    if MASKED:
        x = tl.where(col_mask[None, :], x, float("-inf"))
    if SMOOTH:
        if MASKED:
            xsum += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        else:
            xsum += tl.sum(x, axis=1)
    tile_max = tl.max(x, axis=1)  # every tile has >= 1 real column: finite
    if ACCURACY:  # first index of the max, as torch.argmax
        first = tl.min(tl.where(x == tile_max[:, None], cols[None, :], V), axis=1)
        amax = tl.where(tile_max > m, first, amax)
    m_new = tl.maximum(m, tile_max)
    mc = m_new * LOG2E
    if MASKED:  # masked columns are -inf: all on MUFU
        tile_sum = tl.sum(_exp2(x * LOG2E - mc[:, None], FTZ), axis=1)
    else:  # 1 / 2**POLY_LOG of the columns on the FMA pipe (every argument finite, <= 0)
        tile_sum = row_sum_exp2(x * LOG2E - mc[:, None], POLY_LOG, FTZ)
    s = s * _exp2(m * LOG2E - mc, FTZ) + tile_sum
    return m_new, s, xsum, amax


@triton.jit
def _mntp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, order_ptr, count_ptr,
    lse_part_ptr, sum_part_ptr, max_part_ptr, arg_part_ptr,
    N, V, D, stride_h, stride_w, softcap, row_bound, n_splits,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    ACCURACY: tl.constexpr, FTZ: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    POLY_LOG: tl.constexpr = 0, EVEN_K: tl.constexpr = False,
):  # fmt: skip
    """Persistent program: work units (vocabulary split s, labelled-slot block b), `unit = s *
    blocks + b`, strided over the grid; the number of blocks comes from the on-device count.

    Per unit: the split's log-sum-exp per row in `lse_part[s, slot]` (-inf for an empty split),
    and when asked the split's sum of logits (label smoothing) and its max / first argmax (token
    accuracy). The split's full vocabulary tiles run unmasked; only its partial last tile (the
    last split's, when V is not a multiple of BLOCK_V) masks columns. The target logit is not
    looked for here: the merge takes it once per row (a dot of h with W[label]). Programs
    running together share a split (consecutive units), so its weight tiles are read from L2.
    """
    n_valid = tl.minimum(tl.load(count_ptr), row_bound)
    n_blocks = tl.cdiv(n_valid, BLOCK_M)
    per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits) * BLOCK_V
    for unit in range(tl.program_id(0), n_blocks * n_splits, tl.num_programs(0)):
        pid_s = unit // n_blocks
        pid_m = unit % n_blocks
        v_lo = pid_s * per_split
        v_hi = tl.maximum(tl.minimum(v_lo + per_split, V), v_lo)  # empty split: v_hi = v_lo
        v_full = v_lo + ((v_hi - v_lo) // BLOCK_V) * BLOCK_V  # end of the full tiles
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = pos < n_valid
        # row indices (< N < 2**31) in 32 bits; row * stride (which overflows int32 past 2**31
        # elements) is formed in int64 where the addresses are
        rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int32)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
        amax = tl.zeros([BLOCK_M], dtype=tl.int32)
        for v0 in range(v_lo, v_full, BLOCK_V):
            m, s, xsum, amax = _fwd_tile(
                h_ptr, w_ptr, b_ptr, rows, row_mask, v0, v_hi, V, D, stride_h, stride_w,
                softcap, m, s, xsum, amax, HAS_BIAS, HAS_SOFTCAP, SMOOTH, ACCURACY, False, FTZ,
                UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K, POLY_LOG, EVEN_K,
            )  # fmt: skip
        if v_full < v_hi:
            m, s, xsum, amax = _fwd_tile(
                h_ptr, w_ptr, b_ptr, rows, row_mask, v_full, v_hi, V, D, stride_h, stride_w,
                softcap, m, s, xsum, amax, HAS_BIAS, HAS_SOFTCAP, SMOOTH, ACCURACY, True, FTZ,
                UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K, 0, EVEN_K,
            )  # fmt: skip
        part = pid_s * N + pos
        tl.store(lse_part_ptr + part, m + tl.log(s), mask=row_mask)  # -inf: the split is empty
        if SMOOTH:
            tl.store(sum_part_ptr + part, xsum, mask=row_mask)
        if ACCURACY:
            tl.store(max_part_ptr + part, m, mask=row_mask)
            tl.store(arg_part_ptr + part, amax, mask=row_mask)


@triton.jit
def _mntp_merge_kernel(
    h_ptr, w_ptr, b_ptr, lse_part_ptr, sum_part_ptr, max_part_ptr, arg_part_ptr, labels_ptr,
    order_ptr, count_ptr, loss_ptr, lse_ptr, correct_ptr, N, V, D, stride_h, stride_w, softcap,
    smoothing, row_bound,
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, SMOOTH: tl.constexpr,
    ACCURACY: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Exact merge of the splits per labelled row, plus the target logit `softcap(h . W[label] +
    b[label])` as a float32 dot per row (labels outside [0, V) give 0: never an address);
    scatters loss, lse (and correct) by row."""
    n_valid = tl.minimum(tl.load(count_ptr), row_bound)
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
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(labels_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    ok = row_mask & (target >= 0) & (target < V)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        mk = ok[:, None] & (ks < D)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=mk, other=0.0)
        w = tl.load(w_ptr + target[:, None] * stride_w + ks[None, :], mask=mk, other=0.0)
        acc += h.to(tl.float32) * w.to(tl.float32)
    tgt = tl.sum(acc, axis=1)
    if HAS_BIAS:
        tgt += tl.load(b_ptr + target, mask=ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        tgt = softcap * _tanh(tgt / softcap)
    tgt = tl.where(ok, tgt, 0.0)
    if SMOOTH:
        # (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j): torch's label_smoothing
        xsum = tl.sum(tl.load(sum_part_ptr + part, mask=mask2, other=0.0), axis=1)
        loss = lse - (1.0 - smoothing) * tgt - (smoothing / V) * xsum
    else:
        loss = lse - tgt
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if ACCURACY:
        mx = tl.load(max_part_ptr + part, mask=mask2, other=float("-inf"))
        arg = tl.load(arg_part_ptr + part, mask=mask2, other=V)
        best = tl.max(mx, axis=1)
        first = tl.min(tl.where(mx == best[:, None], arg, V), axis=1)  # splits are in order
        tl.store(correct_ptr + rows, tl.where(first == target, 1.0, 0.0), mask=row_mask)


@triton.jit
def _mntp_dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, order_ptr, count_ptr, gce_ptr, glse_ptr, lse_ptr, loss_ptr,
    dz_ptr, flag_ptr, r0, c0, n_chunk_cols, V, D, stride_h, stride_w, stride_dz, softcap,
    smoothing, filter_eps, row_bound,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_GLSE: tl.constexpr, FILTER: tl.constexpr, FIX_TARGET: tl.constexpr, FTZ: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One tile of the chunk `dz[slot r0 + i, col c0 + j] = d loss / d logit` (before softcap').

    `dz = (g_ce + g_lse) * softmax - g_ce * ((1 - eps) [j == t] + eps / V)`, times
    `1 - tanh^2` under softcap. Per logit: one FFMA and one exp2 for `softmax * g`, then one
    32-bit compare of the tile column with the row's target column (a per-row int32, -1 when
    the target is elsewhere) and one select + FFMA for the subtrahend. FIX_TARGET (plain cross
    entropy: no smoothing, softcap or filtering) drops the compare: the tile is stored as
    `softmax * g`, then, after a CTA barrier, each row whose target lies in the tile overwrites
    that one entry with `g exp(-loss) - g_ce` (`exp(-loss)` is the target's softmax, from the
    forward's per-row loss at `loss_ptr`). Slots past the labelled
    ones load `lse = +inf`, so their softmax and dz are exactly 0 with no mask; columns past
    the chunk are stored but never read (both GEMMs mask them). With FILTER (Cut
    Cross-Entropy's gradient filtering) both are masked to 0 and a tile whose every `|dz|` is
    at most `filter_eps * (|g_ce| + |g_lse|)` of its row is stored as zeros and flagged 0 in
    `flag[tile row, tile col]`, so the GEMMs skip it.
    """
    n_valid = tl.minimum(tl.load(count_ptr), row_bound)
    pid_m = tl.program_id(0)
    if r0 + pid_m * BLOCK_M >= n_valid:
        return  # no GEMM reads these slots (their K loops stop at n_valid, their rows exit)
    local_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tile_c = tl.program_id(1) * BLOCK_V
    local_c = tile_c + tl.arange(0, BLOCK_V)
    pos = r0 + local_r
    row_mask = pos < n_valid
    col_mask = local_c < n_chunk_cols
    # row indices (< N < 2**31) kept in 32 bits: each address is one widening multiply-add
    rows = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int32)
    cols = c0 + local_c
    target = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))
    g_ce = tl.load(gce_ptr + rows, mask=row_mask, other=0.0)
    x = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, row_mask, tl.minimum(cols, V - 1), col_mask, D, stride_h,
        stride_w, HAS_BIAS, UPCAST, PREC, BLOCK_M, BLOCK_V, BLOCK_K, False, EVEN_K,
    )  # fmt: skip
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = softcap * t
    else:
        z = x
    p = _exp2(z * LOG2E - (lse * LOG2E)[:, None], FTZ)
    g = g_ce
    if HAS_GLSE:
        g_lse = tl.load(glse_ptr + rows, mask=row_mask, other=0.0)
        g = g_ce + g_lse
    # the target's column inside this tile, per row (int32; -1: not in this tile)
    t_col = target - (c0 + tile_c)
    t_col = tl.where((t_col >= 0) & (t_col < BLOCK_V), t_col, -1).to(tl.int32)
    hit = tl.arange(0, BLOCK_V)[None, :] == t_col[:, None]
    if SMOOTH:
        sub_miss = g_ce * (smoothing / V)
        sub_hit = g_ce * (1.0 - smoothing) + sub_miss
    else:
        sub_miss = tl.zeros_like(g_ce)
        sub_hit = g_ce
    if FIX_TARGET:
        dz = p * g[:, None]
    else:
        dz = p * g[:, None] - tl.where(hit, sub_hit[:, None], sub_miss[:, None])
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)  # d/dx softcap*tanh(x/softcap)
    if FILTER:
        dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
        g_abs = tl.abs(g_ce)
        if HAS_GLSE:
            g_abs += tl.abs(g_lse)
        big = tl.abs(dz) > (filter_eps * g_abs)[:, None]
        keep = tl.max(big.to(tl.int32))
        dz = dz * keep.to(tl.float32)
        tl.store(flag_ptr + pid_m * tl.num_programs(1) + tl.program_id(1), keep.to(tl.int8))
    # the tile's base (64-bit, uniform) + 32-bit offsets (BLOCK_M * stride_dz < 2**31)
    tile_ptr = dz_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_dz + tile_c
    offs = tl.arange(0, BLOCK_M)[:, None] * stride_dz + tl.arange(0, BLOCK_V)[None, :]
    tl.store(tile_ptr + offs, dz.to(dz_ptr.dtype.element_ty))
    if FIX_TARGET:
        tl.debug_barrier()  # the tile's stores before the overwrite (CTA-ordered)
        loss = tl.load(loss_ptr + rows, mask=row_mask, other=0.0)
        d_t = g * _exp2(-loss * LOG2E, FTZ) - g_ce
        fix = tile_ptr + (tl.arange(0, BLOCK_M) * stride_dz + t_col)
        tl.store(fix, d_t.to(dz_ptr.dtype.element_ty), mask=row_mask & (t_col >= 0))


@triton.jit
def _dw_role(
    dz_ptr, h_ptr, order_ptr, acc_ptr, accb_ptr, dw_ptr, db_ptr, flag_ptr, n_valid, pid_c, pid_d,
    r0, c0, n_chunk_rows, n_chunk_cols, D, stride_h, stride_dz, stride_dw, n_flag_cols,
    HAS_BIAS: tl.constexpr, FILTER: tl.constexpr, FLAG_M: tl.constexpr, FLAG_V: tl.constexpr,
    FLAGS_K: tl.constexpr, FLAGS_N: tl.constexpr, SINGLE: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`dW[c0 + j] (+)= dz[:, j].T @ H[order[r0 + k]]` over the chunk's labelled slots: the K
    loop (slots, bounded by the on-device count) accumulates on chip in float32; with one row
    chunk (the usual plan) there is no partial, else the vocabulary-chunk partial `acc` is read
    and written once per row chunk. The last row chunk writes dW (and dBias). SINGLE (one row
    chunk, a compile-time fact of the plan) compiles only that path."""
    if r0 >= n_valid:
        return
    n_k = tl.minimum(n_chunk_rows, n_valid - r0)
    local_c = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = local_c < n_chunk_cols
    ds = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = ds < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_k
        run = True
        if FILTER:  # skip K steps whose dz tiles were all filtered out (a few flags per step)
            f_r = k0 // FLAG_M + tl.arange(0, FLAGS_K)
            f_c = (pid_c * BLOCK_M) // FLAG_V + tl.arange(0, FLAGS_N)
            f_ok = (f_r * FLAG_M < n_k)[:, None] & (f_c * FLAG_V < n_chunk_cols)[None, :]
            f_idx = f_r[:, None] * n_flag_cols + f_c[None, :]
            flags = tl.load(flag_ptr + f_idx, mask=f_ok, other=0)
            run = tl.max(flags.to(tl.int32)) > 0
        if run:
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
    if not SINGLE and r0 > 0:
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
        if HAS_BIAS:
            dbias += tl.load(accb_ptr + local_c, mask=b_mask, other=0.0)
    cols = (c0 + local_c).to(tl.int64)
    if SINGLE or r0 + n_chunk_rows >= n_valid:  # the last row chunk with labelled slots
        tl.store(dw_ptr + cols[:, None] * stride_dw + ds[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip
        if HAS_BIAS:
            tl.store(db_ptr + cols, dbias.to(db_ptr.dtype.element_ty), mask=b_mask)
    else:
        tl.store(acc_ptrs, acc, mask=mask)
        if HAS_BIAS:
            tl.store(accb_ptr + local_c, dbias, mask=b_mask)


@triton.jit
def _dh_partial_ptrs(
    acc_ptr, order_ptr, local_r, row_mask, ds, pid_d, r0, n_valid, stride_acc, acc_width,
    ACC_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Pointers of a dH tile's float32 partial (see `_dh_role`'s ACC_MODE)."""
    if ACC_MODE == 0:
        return acc_ptr + local_r[:, None].to(tl.int64) * stride_acc + ds[None, :]
    elif ACC_MODE == 1:
        rows = tl.load(order_ptr + r0 + local_r, mask=row_mask, other=0).to(tl.int64)
        return acc_ptr + rows[:, None] * stride_acc + ds[None, :]
    else:  # the tile's columns lie in one half (the host asks acc_width % BLOCK_N == 0)
        half = (pid_d * BLOCK_N) // acc_width
        spare = n_valid + (r0 + local_r) * 2 + half
        prow = tl.load(order_ptr + spare, mask=row_mask, other=0).to(tl.int64)
        return acc_ptr + prow[:, None] * stride_acc + (ds - half * acc_width)[None, :]


@triton.jit
def _dh_role(
    dz_ptr, w_ptr, order_ptr, acc_ptr, dh_ptr, flag_ptr, n_valid, pid_m, pid_d,
    r0, c0, n_chunk_cols, D, stride_w, stride_dz, stride_dh, stride_acc, acc_width,
    n_flag_cols, n_valid_local,
    FIRST: tl.constexpr, LAST: tl.constexpr, ACC_MODE: tl.constexpr, FILTER: tl.constexpr,
    FLAG_M: tl.constexpr, FLAG_V: tl.constexpr,
    FLAGS_R: tl.constexpr, FLAGS_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`dH[slots] (+)= dz[Rc, vc] @ W[c0 : c0 + vc]`: the K loop (the chunk's vocabulary)
    accumulates on chip, starting from the float32 partial of the earlier vocabulary chunks
    (zeros in the FIRST), which the epilogue writes back once, or, in the LAST chunk, writes
    `dH[order[slot]]` from (FIRST / LAST are compile-time: each chunk kind compiles only its
    own path). Where the partial
    lives (`ACC_MODE`): 0 its own `[Rc, d]` buffer; 1 dH itself (float32 inputs); 2 the
    ignored rows of dH, which are zero in the result and otherwise unused: slot i's float32
    partial spans the bytes of rows `order[n_valid + 2 i]` and `order[n_valid + 2 i + 1]`
    (16-bit dH, `acc_ptr` its float32 view of width `acc_width = d / 2`); the last chunk
    zeroes them again."""
    if r0 + pid_m * BLOCK_M >= n_valid:
        return
    local_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = r0 + local_r < n_valid
    ds = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = ds < D
    a_base = dz_ptr + local_r[:, None].to(tl.int64) * stride_dz
    if FIRST:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:  # the partial of the earlier chunks is the accumulator's start: no add after the loop
        acc = tl.load(
            _dh_partial_ptrs(acc_ptr, order_ptr, local_r, row_mask, ds, pid_d, r0, n_valid,
                             stride_acc, acc_width, ACC_MODE, BLOCK_N),
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # fmt: skip
    for k0 in range(0, n_chunk_cols, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_chunk_cols
        run = True
        if FILTER:
            f_r = (pid_m * BLOCK_M) // FLAG_M + tl.arange(0, FLAGS_R)
            f_c = k0 // FLAG_V + tl.arange(0, FLAGS_K)
            f_ok = (f_r * FLAG_M < n_valid_local)[:, None]
            f_ok = f_ok & (f_c * FLAG_V < n_chunk_cols)[None, :]
            f_idx = f_r[:, None] * n_flag_cols + f_c[None, :]
            flags = tl.load(flag_ptr + f_idx, mask=f_ok, other=0)
            run = tl.max(flags.to(tl.int32)) > 0
        if run:
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
    # pointers formed again after the K loop, not kept live through it (registers)
    mask = row_mask[:, None] & d_mask[None, :]
    rows = tl.load(order_ptr + r0 + local_r, mask=row_mask, other=0).to(tl.int64)
    acc_ptrs = _dh_partial_ptrs(acc_ptr, order_ptr, local_r, row_mask, ds, pid_d, r0, n_valid,
                                stride_acc, acc_width, ACC_MODE, BLOCK_N)  # fmt: skip
    if LAST:
        out = dh_ptr + rows[:, None] * stride_dh + ds[None, :]
        tl.store(out, acc.to(dh_ptr.dtype.element_ty), mask=mask)
        if ACC_MODE == 2:
            if not FIRST:
                tl.store(acc_ptrs, tl.zeros_like(acc), mask=mask)  # the ignored rows stay 0
    else:
        tl.store(acc_ptrs, acc, mask=mask)


@triton.jit
def _mntp_grads_kernel(
    dz_ptr, h_ptr, w_ptr, order_ptr, count_ptr, accw_ptr, accb_ptr, dw_ptr, db_ptr, acch_ptr,
    dh_ptr, flag_ptr, r0, c0, n_chunk_rows, n_chunk_cols, D, stride_h, stride_w, stride_dz,
    stride_dw, stride_dh, stride_acch, acch_width, n_flag_cols, n_dw_programs, row_bound,
    FIRST: tl.constexpr, LAST: tl.constexpr, SINGLE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACC_MODE: tl.constexpr, FILTER: tl.constexpr,
    FLAG_M: tl.constexpr, FLAG_V: tl.constexpr, FLAGS_WK: tl.constexpr, FLAGS_WN: tl.constexpr,
    FLAGS_HR: tl.constexpr, FLAGS_HK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Both GEMMs of one dlogits chunk in one launch: programs `[0, n_dw_programs)` compute dW
    tiles (their K loops over all labelled slots are the long ones, so they start first), the
    rest dH tiles. Each output tile has one owner: deterministic, no atomics."""
    n_valid = tl.minimum(tl.load(count_ptr), row_bound)
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_N)
    if pid < n_dw_programs:
        _dw_role(
            dz_ptr, h_ptr, order_ptr, accw_ptr, accb_ptr, dw_ptr, db_ptr, flag_ptr, n_valid,
            pid // n_d, pid % n_d, r0, c0, n_chunk_rows, n_chunk_cols, D, stride_h, stride_dz,
            stride_dw, n_flag_cols, HAS_BIAS, FILTER, FLAG_M, FLAG_V, FLAGS_WK, FLAGS_WN,
            SINGLE, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        q = pid - n_dw_programs
        _dh_role(
            dz_ptr, w_ptr, order_ptr, acch_ptr, dh_ptr, flag_ptr, n_valid, q // n_d, q % n_d,
            r0, c0, n_chunk_cols, D, stride_w, stride_dz, stride_dh, stride_acch, acch_width,
            n_flag_cols, n_valid - r0, FIRST, LAST, ACC_MODE, FILTER, FLAG_M, FLAG_V, FLAGS_HR,
            FLAGS_HK, UPCAST, PREC, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


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
    programs_per_sm: int  # (kept for the autotuned grids) programs per SM of a full wave
    # persistent forward programs per SM: the 128 x 128 bf16 forward takes ~214 registers x 256
    # threads on sm_90 (compile suite), so one program per SM is resident
    persist: int = 1
    vocab_cap: int = 65536  # largest Vc of the one-row-chunk backward plan
    # forward full tiles: 1 / 2**fwd_poly_log of the exp2 on the FMA pipe (`exp2_triton`), 0 = none
    fwd_poly_log: int = 0


C = _LaunchConfig
_CONFIGS: dict[str, _Family] = {
    # Hopper/Blackwell: 128 x 128 tiles, 8 warps (two warpgroups) keep wgmma fed; 3 stages of
    # (128x64 + 64x128) bf16 operands = 96 KB of the 228 KB of shared memory. GEMM accumulators
    # are 64 registers per thread.
    "hopper": _Family(C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 3), 256, 4096, 4, fwd_poly_log=3),
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
    "interpreter": _Family(
        C(32, 128, 32, 4, 1), C(64, 128, 64, 4, 1), 128, 512, 4, persist=1, vocab_cap=512
    ),
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


def _even_k(d: int, block_k: int, dtype: torch.dtype) -> bool:
    """EVEN_K of the fwd/dz kernels: no K mask when `d` is a positive multiple of BLOCK_K, for
    16-bit inputs only (float32's IEEE dots keep their operands in registers: unmasked loads
    made the dz kernel spill 8 B on sm_90 with triton 3.9, 128 registers)."""
    return d > 0 and d % block_k == 0 and dtype != torch.float32


def _launch_tiles(
    kernel: str, device: torch.device, grid_of, args: tuple, flags: dict, dtype: torch.dtype,
    d: int,
) -> None:  # fmt: skip
    """Launch the fwd or dz kernel: the device's fixed config, or autotuned (BIDIRLM_AUTOTUNE=1),
    with EVEN_K (`_even_k`) for every BLOCK_K the launch may use."""
    if autotune_enabled():
        even = all(_even_k(d, c.kwargs["BLOCK_K"], dtype) for c in _autotune_configs())
        _autotuned(kernel)[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_V"])](
            *args, **flags, EVEN_K=even
        )
        return
    cfg = launch_config(device, kernel, dtype)
    flags = {**flags, "EVEN_K": _even_k(d, cfg.block_k, dtype)}
    fn = {"fwd": _mntp_fwd_kernel, "dz": _mntp_dz_kernel}[kernel]
    blocks = {"BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_n, "BLOCK_K": cfg.block_k}
    kw = cfg.launch_kwargs()
    if kernel == "fwd" and flags.get("SMOOTH") and kw["num_stages"] > 2:
        # the label-smoothing sum adds a live [BLOCK_M] accumulator to the persistent forward:
        # 3 stages spill 4 B on sm_90 (255 registers), 2 stages none
        kw["num_stages"] = 2
    fn[grid_of(cfg.block_m, cfg.block_n)](*args, **flags, **blocks, **kw)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few "SMs" so the tests see several programs and splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class _FwdPlan:
    splits: int  # vocabulary splits
    programs: int  # persistent programs (the grid)
    units: int  # (split, row block) work units for `rows` labelled rows
    waves: float  # units / programs: the last wave is `waves - floor(waves)` full


def _fwd_plan_of(family: _Family, rows: int, v: int, sms: int, interpreter: bool) -> _FwdPlan:
    """Splits and persistent grid of the forward for `rows` labelled rows (a bound or estimate).

    The grid is `persist` programs per SM (the resident count) and every program strides over
    (split, row block) units, so the number of launches does not depend on
    the rows. Splits keep >= 4 vocabulary tiles each (one in the interpreter) and are chosen, up
    to 64, so the last wave of units is as full as possible (at 9,830 rows: 77 row blocks x 64
    splits = 4,928 units on 132 programs = 37.3 waves, 98% of the last-wave-rounded time busy).
    """
    bm, bv = family.fwd.block_m, family.fwd.block_n
    tiles = triton.cdiv(v, bv)
    blocks = triton.cdiv(max(rows, 1), bm)
    programs = sms * family.persist
    most = max(1, min(64, tiles // (1 if interpreter else 4)))
    best, best_eff = 1, -1.0
    for s in range(1, most + 1):
        units = blocks * s
        eff = units / (triton.cdiv(units, programs) * programs)
        # fewer splits when equally good (cheaper merge); aim for >= 4 waves of units
        score = eff + (0.0 if units >= 4 * programs or s == most else -1.0)
        if score > best_eff + 1e-9:
            best, best_eff = s, score
    units = blocks * best
    programs = min(programs, units)
    return _FwdPlan(best, programs, units, units / programs)


@dataclass(frozen=True)
class _BwdPlan:
    rows: int  # Rc: labelled slots per chunk (all of them unless `two_pass`)
    vocab: int  # Vc: vocabulary entries per chunk
    acc_mode: int  # where dH's float32 partial lives: 0 buffer, 1 dH itself, 2 dH's ignored rows
    two_pass: bool  # several row chunks: a dW pass and a dH pass recompute dlogits (10 n V d)

    def chunks(self, n_rows: int, v: int) -> int:
        return triton.cdiv(max(n_rows, 1), self.rows) * triton.cdiv(v, self.vocab)


def _list_schedule(costs: list[float], sms: int) -> float:
    """Makespan of programs taken in order by the first free SM (how CTAs are handed out)."""
    free = [0.0] * max(1, min(sms, len(costs)))
    end = 0.0
    for c in costs:
        t = heapq.heappop(free) + c
        end = max(end, t)
        heapq.heappush(free, t)
    return end


@functools.lru_cache(maxsize=64)
def _balanced_vocab_chunk(
    family: _Family, bound: int, v_max: int, d: int, sms: int, need_dh: bool, need_dw: bool
) -> int:
    """The vocabulary chunk in [v_max / 2, v_max] (multiples of the alignment) with the least
    estimated backward time per vocabulary entry, in units of one 128 x 128-tile MAC step:
    the dz launch `ceil(programs / sms)` waves of `d`; the GEMM launch list-scheduled (its dW
    programs, K = all labelled slots, are the long ones and go first; then the dH programs);
    plus two launch gaps (4 us ~ 640 units on an H100). E.g. d = 1024, 9,830 labelled: Vc =
    2,304 gives 144 dW programs on 132 SMs, a second wave of 12 long programs while 120 SMs
    share 616 dH programs; Vc = 2,048 gives 128 and costs less (Vc = 2,816, 176 dW programs
    in a 1.33-wave fill, less still). Cached: one search per shape."""
    bm_f, bv_f = family.fwd.block_m, family.fwd.block_n
    bm_g, bn_g = family.gemm.block_m, family.gemm.block_n
    blocks = triton.cdiv(max(bound, 1), bm_f)
    k_rows = triton.cdiv(max(bound, 1), 64) * 64
    d_tiles = triton.cdiv(d, bn_g)
    best, best_cost = v_max, float("inf")
    vc = v_max
    while vc >= max(family.align, v_max // 2):
        dz = triton.cdiv(blocks * triton.cdiv(vc, bv_f), sms) * d
        p_w = triton.cdiv(vc, bm_g) * d_tiles if need_dw else 0
        p_h = triton.cdiv(max(bound, 1), bm_g) * d_tiles if need_dh else 0
        gemm = _list_schedule([float(k_rows)] * p_w + [float(vc)] * p_h, sms)
        cost = (dz + gemm + 2 * 640) / vc
        if cost < best_cost * 0.999:
            best, best_cost = vc, cost
        vc -= family.align
    return best


def _bwd_plan_of(
    family: _Family, n: int, bound: int, v: int, d: int, elem: int, dh_elem: int,
    need_dh: bool, need_dw: bool, sms: int = 132,
) -> _BwdPlan:  # fmt: skip
    """(Rc, Vc, partial placement) of the backward for `bound` labelled rows out of `n`.

    The usual plan is one row chunk holding every labelled slot: each dlogits chunk `[Rc, Vc]`
    feeds both GEMMs (8 n V d FLOPs with the forward, as Cut Cross-Entropy), dW needs no partial
    (its K loop covers all slots) and dH's float32 partial across vocabulary chunks lives where
    it costs no memory when it can: in dH itself for float32 inputs, else in the rows of dH that
    are ignored (zero in the result): that takes `n >= 3 * bound` for 16-bit dH (MNTP labels
    20-33% of rows) and `d / 2` a multiple of the GEMM tile width (d = 1024, 2048, ...). Vc is
    at most the largest multiple of the alignment with `Rc Vc elem` (+ a partial buffer when one
    is needed) within `_SCRATCH_BYTES`, then chosen by `_balanced_vocab_chunk` for full waves.
    Example (bf16, H100): n = 32,768, 9,830 labelled, V = 151,936: Rc = 9,984, Vc = 2,816 at
    d = 1024 and 2048 (54 chunks, 54.0 MB).
    When no single row chunk fits (many labelled rows and no room for dH's partial), the
    two-pass plan of `_two_pass_sizes_of` bounds the memory at 10 n V d FLOPs.
    """
    align = family.align
    rows = triton.cdiv(max(bound, 1), align) * align
    v_al = triton.cdiv(v, align) * align
    if not need_dh:
        mode = 0
    elif dh_elem == 4:
        mode = 1
    elif (d * dh_elem // 4) % family.gemm.block_n == 0 and n >= bound * (1 + 4 // dh_elem):
        mode = 2  # (a GEMM tile's columns then lie in one of the two spare rows)
    else:
        mode = 0

    def cost(vc: int) -> int:
        partial = rows * d * 4 if need_dh and mode == 0 and vc < v else 0
        return rows * vc * elem + partial

    vc = min(v_al, family.vocab_cap)
    if cost(vc) > _SCRATCH_BYTES:
        vc = max(align, (_SCRATCH_BYTES // max(rows * elem, 1)) // align * align)
        while vc > align and cost(vc) > _SCRATCH_BYTES:
            vc -= align
    if cost(vc) <= _SCRATCH_BYTES:
        if vc < v_al:  # several chunks: balance the waves of both launches
            vc = _balanced_vocab_chunk(family, bound, vc, d, sms, need_dh, need_dw)
        return _BwdPlan(rows, vc, mode, False)
    rc, vc = _two_pass_sizes_of(family, bound, v, d, elem, need_dh, need_dw)
    return _BwdPlan(rc, vc, 0, rc < rows)


def _two_pass_sizes_of(
    family: _Family, n: int, v: int, d: int, elem: int, need_dh: bool, need_dw: bool
) -> tuple[int, int]:
    """(Rc, Vc) of the two-pass plan: the dlogits chunk + the larger float32 partial (dH rows of
    a row chunk or dW rows of a vocabulary chunk) within `_SCRATCH_BYTES`."""
    align, cap = family.align, family.max_chunk
    n_al = triton.cdiv(max(n, 1), align) * align
    v_al = triton.cdiv(v, align) * align

    def cost(rc: int, vc: int) -> int:  # the two partials are never alive together
        dh = rc * d * 4 if need_dh and vc < v else 0
        dw = (vc * d * 4 + vc * 4) if need_dw and rc < n else 0
        return rc * vc * elem + max(dh, dw)

    size = cap
    while size > align and cost(min(size, n_al), min(size, v_al)) > _SCRATCH_BYTES:
        size -= align
    return min(size, n_al), min(size, v_al)


def _row_bound(n: int, num_labelled: int | None) -> int:
    """Rows the kernels may see labelled: the caller's count, else all `n` (no host sync)."""
    return n if num_labelled is None or num_labelled < 0 else min(int(num_labelled), n)


def working_memory(
    n: int, v: int, d: int, elem: int, *, num_labelled: int | None = None,
    family: str = "hopper", sms: int = 132,
) -> dict[str, int]:  # fmt: skip
    """Bytes the op allocates beyond its inputs, outputs and gradients, as the launchers size
    them (no GPU needed): `fwd` (compaction, split partials, saved lse) and `bwd`
    (compaction, float32 upstream gradient, dlogits chunk, a partial buffer if the plan needs
    one), with the plans' chunk sizes, splits, launches and waves."""
    fam = _CONFIGS[family]
    bound = _row_bound(n, num_labelled)
    fp = _fwd_plan_of(fam, bound, v, sms, False)
    compact = n * 4 + 4  # int32 order + count
    fwd = compact + fp.splits * n * 4 + n * 4  # (the merge takes the target logits itself)
    bp = _bwd_plan_of(fam, n, bound, v, d, elem, elem, True, True, sms)
    if bp.two_pass:
        partial = max(bp.rows * d * 4 if bp.vocab < v else 0, bp.vocab * d * 4 + bp.vocab * 4)
    else:
        partial = bp.rows * d * 4 if bp.acc_mode == 0 and bp.vocab < v else 0
    bwd = compact + n * 4 + bp.rows * bp.vocab * elem + partial
    chunks = bp.chunks(bound, v)
    bwd_launches = chunks * (4 if bp.two_pass else 2)
    return {
        "fwd": fwd, "bwd": bwd, "chunk_rows": bp.rows, "chunk_vocab": bp.vocab,
        "splits": fp.splits, "fwd_programs": fp.programs, "fwd_units": fp.units,
        "fwd_waves": fp.waves, "chunks": chunks, "two_pass": bp.two_pass,
        "fwd_launches": 2, "bwd_launches": bwd_launches,
    }  # fmt: skip


def _compact(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): labelled row indices first, in order, then the ignored rows in order;
    count as a 1-element int32 tensor.

    A stable partition on the device instead of `nonzero()`, which would sync with the host.
    """
    valid = labels != ignore_index
    # int32 (row indices < N < 2**31): the kernels widen them where an address needs 64 bits, one
    # widening multiply-add instead of a 64 x 64-bit product (and half the bytes)
    order = torch.argsort(valid.to(torch.uint8), descending=True, stable=True).to(torch.int32)
    count = valid.sum(dtype=torch.int32).reshape(1)
    return order, count


def _check_bound(count: torch.Tensor, bound: int, n: int) -> None:
    """`num_labelled` must be at least the labelled rows: a device-side assert on a GPU (no
    host sync), a ValueError elsewhere. The kernels also clamp to it, so no address past the
    buffers is ever formed."""
    if bound >= n:
        return
    if count.device.type == "cuda":
        torch._assert_async(count[0] <= bound, "num_labelled is below the labelled rows")
    elif int(count[0]) > bound:
        raise ValueError(f"num_labelled={bound} is below the {int(count[0])} labelled rows")


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
        # one MUFU.EX2 per exp on NVIDIA GPUs (inline PTX: not in the interpreter, not on AMD)
        "FTZ": not interpreting() and arch_family(hidden.device) in ("hopper", "ampere", "nvidia"),
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
    num_labelled: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss [N], lse [N] and correct [N] (float32; 0 at ignored rows; correct is empty
    unless `with_accuracy`) of `hidden [N, d]`; `num_labelled` (-1 = unknown) sizes the grid.

    Two Triton launches whatever N: the persistent `_mntp_fwd_kernel` and the merge."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    loss = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    correct = torch.zeros(n if with_accuracy else 0, dtype=torch.float32, device=dev)
    if n == 0:
        return loss, lse, correct
    order, count = _compact(labels, ignore_index)
    bound = _row_bound(n, num_labelled)
    _check_bound(count, bound, n)
    name = arch_family(dev)
    # unknown count: MNTP's usual third of the rows sizes the splits (any count stays correct)
    estimate = bound if num_labelled is not None and num_labelled >= 0 else max(1, n // 3)
    plan = _fwd_plan_of(_CONFIGS[name], estimate, v, _sm_count(dev), name == "interpreter")
    splits = plan.splits
    smooth = label_smoothing > 0.0
    lse_part = torch.empty(splits, n, dtype=torch.float32, device=dev)
    sum_part = torch.empty(splits, n, dtype=torch.float32, device=dev) if smooth else lse_part
    max_part = torch.empty(splits, n, dtype=torch.float32, device=dev) if with_accuracy else lse
    arg_part = torch.empty(splits, n, dtype=torch.int32, device=dev) if with_accuracy else count
    b = bias if bias is not None else weight  # dummy pointer, never read (HAS_BIAS=False)
    flags = _flags(hidden, bias, softcap)
    args = (hidden, weight, b, order, count, lse_part, sum_part, max_part, arg_part,
            n, v, d, hidden.stride(0), weight.stride(0), softcap, bound, splits)  # fmt: skip
    flags = {**flags, "SMOOTH": smooth, "ACCURACY": with_accuracy,
             "POLY_LOG": _CONFIGS[name].fwd_poly_log}  # fmt: skip
    programs = _sm_count(dev) * _CONFIGS[name].persist

    def grid_of(bm: int, bv: int) -> tuple[int]:
        return (max(1, min(programs, triton.cdiv(bound, bm) * splits)),)

    _launch_tiles("fwd", dev, grid_of, args, flags, hidden.dtype, d)
    block_r = 64
    _mntp_merge_kernel[(triton.cdiv(bound, block_r),)](
        hidden, weight, b, lse_part, sum_part, max_part, arg_part, labels, order, count, loss,
        lse, correct if with_accuracy else loss, n, v, d, hidden.stride(0), weight.stride(0),
        softcap, float(label_smoothing), bound,
        SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits), SMOOTH=smooth,
        ACCURACY=with_accuracy, HAS_BIAS=flags["HAS_BIAS"], HAS_SOFTCAP=flags["HAS_SOFTCAP"],
        BLOCK_R=block_r, BLOCK_D=64, num_warps=4,
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
    num_labelled: int = -1,
    filter_eps: float = 0.0,
    row_loss: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dhidden [N, d], dweight [V, d], dbias [V]) for per-row gradients of the loss (`grad`)
    and of the log-sum-exp (`grad_lse`, from the z-loss; None = 0).

    Two Triton launches per dlogits chunk (`_mntp_dz_kernel`, then `_mntp_grads_kernel` with
    both GEMMs), the chunks sized by `_bwd_plan_of` from `num_labelled` (-1: all rows may be
    labelled). A gradient that is not needed (need_dh / need_dw, the latter covering weight and
    bias) is None and its GEMM programs are not launched. `filter_eps > 0` skips the dlogits
    tiles whose every entry is at most `filter_eps` times its row's upstream gradient.
    `row_loss` (the forward's per-row loss) lets plain cross entropy skip the per-logit target
    compare (`FIX_TARGET` of `_mntp_dz_kernel`).
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
    bound = _row_bound(n, num_labelled)
    _check_bound(count, bound, n)
    flags = _flags(hidden, bias, softcap)
    # the interpreter keeps dlogits in float32: its bf16 stores are not round-to-nearest
    dz_dtype = torch.float32 if flags["UPCAST"] else hidden.dtype
    elem = torch.finfo(dz_dtype).bits // 8
    dh_elem = hidden.element_size()
    family = _CONFIGS[arch_family(dev)]
    plan = _bwd_plan_of(family, n, bound, v, d, elem, dh_elem, need_dh, need_dw, _sm_count(dev))
    rc, vc = plan.rows, plan.vocab
    dz = torch.empty(rc, vc, dtype=dz_dtype, device=dev)
    f32 = {"dtype": torch.float32, "device": dev}
    b = bias if bias is not None else weight
    smooth = label_smoothing > 0.0
    filtering = filter_eps > 0.0
    fwd_cfg = launch_config(dev, "fwd", hidden.dtype)
    flag = torch.empty(
        triton.cdiv(rc, fwd_cfg.block_m) * triton.cdiv(vc, fwd_cfg.block_n) if filtering else 1,
        dtype=torch.int8, device=dev,
    )  # fmt: skip
    fix_target = row_loss is not None and not smooth and not filtering and softcap == 0.0
    row_loss = row_loss.to(torch.float32).contiguous() if fix_target else grad
    dz_flags = {**flags, "SMOOTH": smooth, "HAS_GLSE": grad_lse is not None, "FILTER": filtering,
                "FIX_TARGET": fix_target}  # fmt: skip
    gemm = launch_config(dev, "gemm", hidden.dtype)
    gemm_kw = {"BLOCK_M": gemm.block_m, "BLOCK_N": gemm.block_n, "BLOCK_K": gemm.block_k,
               "UPCAST": flags["UPCAST"], "PREC": flags["PREC"], "HAS_BIAS": db is not None,
               "FILTER": filtering, "FLAG_M": fwd_cfg.block_m, "FLAG_V": fwd_cfg.block_n,
               # dz tiles (flags) one GEMM step covers: K rows x output columns for dW,
               # output rows x K columns for dH (powers of two, >= 1)
               "FLAGS_WK": max(1, gemm.block_k // fwd_cfg.block_m),
               "FLAGS_WN": max(1, gemm.block_m // fwd_cfg.block_n),
               "FLAGS_HR": max(1, gemm.block_m // fwd_cfg.block_m),
               "FLAGS_HK": max(1, gemm.block_k // fwd_cfg.block_n),
               **gemm.launch_kwargs()}  # fmt: skip
    n_dt = triton.cdiv(d, gemm.block_n)
    # dH's partial: a buffer, dH itself (float32) or the float32 view of dH's ignored rows
    acc_h, acc_width = dz, d
    if need_dh and vc < v and not plan.two_pass:
        if plan.acc_mode == 1:
            acc_h = dh
        elif plan.acc_mode == 2:
            acc_h, acc_width = dh.view(torch.float32), d * dh_elem // 4
        else:
            acc_h = torch.empty(rc, d, **f32)
    acc_w = acc_b = dz  # dW's partial: only in the two-pass plan

    def make_dz(r0: int, c0: int) -> int:
        cols = min(vc, v - c0)
        args = (hidden, weight, b, labels, order, count, grad, glse, lse, row_loss, dz, flag, r0,
                c0, cols,
                v, d, hidden.stride(0), weight.stride(0), dz.stride(0), softcap,
                float(label_smoothing), float(filter_eps), bound)  # fmt: skip
        grid_of = lambda bm, bv: (triton.cdiv(rc, bm), triton.cdiv(cols, bv))  # noqa: E731
        if filtering:  # the flag layout must be the fixed config's tiles: never autotuned
            _mntp_dz_kernel[grid_of(fwd_cfg.block_m, fwd_cfg.block_n)](
                *args, **dz_flags, BLOCK_M=fwd_cfg.block_m, BLOCK_V=fwd_cfg.block_n,
                BLOCK_K=fwd_cfg.block_k, EVEN_K=_even_k(d, fwd_cfg.block_k, hidden.dtype),
                **fwd_cfg.launch_kwargs(),
            )  # fmt: skip
        else:
            _launch_tiles("dz", dev, grid_of, args, dz_flags, hidden.dtype, d)
        return cols

    def grads(r0: int, c0: int, cols: int, do_dw: bool, do_dh: bool) -> None:
        n_dw = triton.cdiv(cols, gemm.block_m) * n_dt if do_dw else 0
        n_dh = triton.cdiv(rc, gemm.block_m) * n_dt if do_dh else 0
        _mntp_grads_kernel[(n_dw + n_dh,)](
            dz, hidden, weight, order, count, acc_w, acc_b, dw if dw is not None else dz,
            db if db is not None else dz, acc_h, dh if dh is not None else dz, flag, r0, c0, rc,
            cols, d, hidden.stride(0), weight.stride(0), dz.stride(0), dw.stride(0) if do_dw else 0,
            dh.stride(0) if do_dh else 0, acc_h.stride(0), acc_width,
            triton.cdiv(cols, fwd_cfg.block_n), n_dw, bound, FIRST=c0 == 0, LAST=c0 + vc >= v,
            SINGLE=not plan.two_pass, ACC_MODE=plan.acc_mode if do_dh and vc < v else 0,
            **gemm_kw,
        )  # fmt: skip

    if not plan.two_pass:  # one row chunk: each dlogits chunk feeds both GEMMs
        for c0 in range(0, v, vc):
            grads(0, c0, make_dz(0, c0), need_dw, need_dh)
        return dh, dw, db
    row_chunks = range(0, bound, rc)
    if need_dw:  # vocabulary-major: dW's partial covers one vocabulary chunk
        acc_w = torch.empty(vc, d, **f32)
        acc_b = torch.empty(vc, **f32) if db is not None else dz
        for c0 in range(0, v, vc):
            for r0 in row_chunks:
                grads(r0, c0, make_dz(r0, c0), True, False)
    if need_dh:  # row-major: dH's partial covers one row chunk
        acc_w = acc_b = dz
        acc_h = torch.empty(rc, d, **f32) if vc < v else dz
        for r0 in row_chunks:
            for c0 in range(0, v, vc):
                grads(r0, c0, make_dz(r0, c0), False, True)
    return dh, dw, db
