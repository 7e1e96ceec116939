"""Triton kernels and host launchers of bidirectional flash attention (forward and backward).

Layer 1 and 2 of the attention op (see `attention.py` for the autograd function, the
`torch.library` ops and the public API). One code path serves both layouts:

- dense: q `[B, Sq, Hq, D]`, k/v `[B, Sk, Hkv, D]`, optional key padding mask `[B, Sk]` (which
  also zeroes the padded query rows when Sq == Sk); lse/delta `[B, Hq, Sq]` float32.
- packed: q `[Tq, Hq, D]`, k/v `[Tk, Hkv, D]`, int32 `cu_seqlens_q / cu_seqlens_k [N+1]`;
  lse/delta `[Hq, Tq]`.

A program owns one block of queries (forward, dQ) or keys (dK/dV) of one sequence and one head;
the sequence's start and lengths come from the cu_seqlens (packed) or are `b * stride_b`, Sq and
Sk (dense). Query i sits at key position `i + Sk - Sq` (flash-attn's bottom-right alignment; 0
for self-attention); key j is visible from it iff `j >= pos - left and j <= pos + right` (the
launcher turns a negative side into 2**30, i.e. unbounded) and the key is a real token. ALiBi
adds `-slope * |pos - j|` after the softcap.

Each key (or query) loop is split into edge blocks, which are masked, and interior blocks that
every row of the tile sees entirely, which run without masks, bounds checks or -inf guards. Blocks
outside the window's band are never visited. GQA: q head h reads kv head `h // GROUP`; the dK/dV
program loops over the GROUP q heads of its kv head, so dK/dV need no atomics. dQ comes either
from a separate kernel (deterministic) or from relaxed fp32 atomics inside the dK/dV kernel
(fast; relaxed because nothing reads dQ before the kernel ends, and the default acq_rel
semantics put a `MEMBAR.ALL.GPU` pair around every atomic).

Scores live in log2 units (`exp2` is one instruction, `exp` is `exp2` plus a multiply).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .config import arch_family, autotune_enabled
from .dispatch import interpreting
from .exp2_triton import exp2_poly, exp2_poly_affine, join_columns, split_columns

UNBOUNDED = 1 << 30  # a window side of -1 becomes this: |i - j| never reaches it, i + it fits int32


# The forward's FIXED_MAX mode (plain dense bf16 calls on the Hopper tiles of FWD_EXP2_SPLIT):
# after the first interior key block, each row's maximum stays fixed, so the main loop computes
# no row maximum and rescales nothing. 2**x can then exceed 1: the FMA-pipe exp2 clamps x at
# FIXED_HI (MUFU's gives up to inf), and a program whose row sums reach FIXED_LIMIT (a score more
# than 64 log2 units above its row's first-block maximum; any clamped value is above it too) or
# whose accumulator is not finite redoes every key block with the online softmax. FIXED_DEGREE:
# the polynomial of those FMA-pipe columns (relative error 8.9e-5 measured, `exp2_poly_affine`).
FIXED_HI = tl.constexpr(66)
FIXED_LIMIT = tl.constexpr(2.0**64)
FIXED_DEGREE = tl.constexpr(3)


@triton.jit
def _tanh(x):
    """tanh in float32 to a few ulp, from one exp2 and one division (portable: interpreter, ROCm).

    (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1] saturates cleanly to 1 for large |x|; below
    |x| = 0.2 the subtraction 1 - e cancels, so a degree-9 Taylor polynomial (next term < 2e-10)
    takes over there.
    """
    a = tl.abs(x)
    e = tl.exp2(a * -2.8853900817779268)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0.0, -t, t)
    x2 = x * x
    poly = 0.021869488536155203 * x2 - 0.05396825396825397
    poly = poly * x2 + 0.13333333333333333
    poly = poly * x2 - 0.3333333333333333
    poly = x + x * (poly * x2)
    return tl.where(a < 0.2, poly, t)


@triton.jit
def _tanh_fast(x):
    # One MUFU.TANH (sm_75+), max relative error 2**-10.99: the approximation flash-attn's own
    # softcap uses (cutlass::fast_tanh). Only for 16-bit inputs, whose scores round coarser.
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs would otherwise run in tf32 (10-bit mantissa) on NVIDIA tensor cores.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _seq_bounds(CU_SEQLENS, batch, seqlen_dense, PACKED: tl.constexpr):
    """(first token row, length) of sequence `batch`; rows are int64 to index T*H*D > 2**31."""
    if PACKED:
        start = tl.load(CU_SEQLENS + batch)
        seqlen = tl.load(CU_SEQLENS + batch + 1) - start
    else:
        start = batch * 0
        seqlen = seqlen_dense + batch * 0
    return start.to(tl.int64), seqlen


@triton.jit
def _block_ranges(
    p_first, p_last, reach_lo, reach_hi, limit, partial, NO_FULL: tl.constexpr, BLOCK: tl.constexpr
):
    """Blocks of the other axis seen from positions p_first..p_last (both inclusive).

    Position p sees [p - reach_lo, p + reach_hi] of `0..limit-1`. Returns (lo, full_lo, full_hi,
    hi): the band is [lo, hi) with lo a multiple of BLOCK; blocks starting in [full_lo, full_hi)
    are entirely visible from every position (no mask needed); [lo, min(full_lo, hi)) and
    [full_hi, hi) are the edge blocks. A key padding mask (NO_FULL) or a partial tile
    (`partial`) makes every block an edge block. Operands stay >= 0 before // (floor and C
    division differ below 0).
    """
    lo = (tl.maximum(p_first - reach_lo, 0) // BLOCK) * BLOCK
    hi = tl.minimum(p_last + reach_hi + 1, limit)
    # (x + BLOCK - 1) // BLOCK, not tl.cdiv: triton 3.6's interpreter makes a scalar tl.cdiv a
    # 1-element array, which range() cannot take
    full_lo = tl.maximum((tl.maximum(p_last - reach_lo, 0) + BLOCK - 1) // BLOCK * BLOCK, lo)
    if NO_FULL:
        full_hi = full_lo
    else:
        full_hi = (tl.maximum(tl.minimum(p_first + reach_hi + 1, limit), 0) // BLOCK) * BLOCK
        full_hi = tl.where(partial, full_lo, tl.maximum(full_hi, full_lo))
    return lo, full_lo, full_hi, hi


@triton.jit
def _scores(
    s,
    pos,
    cols,
    qk_scale,
    cap_in,
    cap_out,
    slope2,
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    """Raw q.k products (tile of rows `pos` x `cols`, either orientation) -> scores in log2
    units, and the tanh of the softcap (for its derivative; `s` itself when there is none)."""
    if HAS_SOFTCAP:
        if FAST_TANH:
            t = _tanh_fast(s * cap_in)
        else:
            t = _tanh(s * cap_in)
        s2 = t * cap_out
    else:
        t = s
        s2 = s * qk_scale
    if HAS_ALIBI:
        s2 = s2 - slope2 * tl.abs(pos - cols).to(tl.float32)
    return s2, t


@triton.jit
def _exp2_mixed(s, scale, m, POLY_LOG: tl.constexpr, FIXED: tl.constexpr = False):
    """2**(s * scale - m[:, None]) of a [M, N] tile of raw scores s with the last N / 2**POLY_LOG
    columns on the FMA pipe and the others on MUFU; POLY_LOG = 0: all on MUFU. The FMA-pipe
    columns take `exp2_poly(x, 4)` (x <= 0 and finite: an interior block of the online softmax)
    or, FIXED, `exp2_poly_affine` clamped to [-126, FIXED_HI] (x of any sign: scores against a
    fixed maximum)."""
    tl.static_assert(POLY_LOG >= 0 and POLY_LOG <= 3, "POLY_LOG is 0..3")
    if POLY_LOG == 0:
        y = tl.exp2(s * scale - m[:, None])
    else:
        a, b = split_columns(s)
        if POLY_LOG == 1:
            b = _exp2_poly_cols(b, scale, m, FIXED)
        elif POLY_LOG == 2:
            b0, b1 = split_columns(b)
            b = join_columns(tl.exp2(b0 * scale - m[:, None]), _exp2_poly_cols(b1, scale, m, FIXED))
        else:
            b0, b1 = split_columns(b)
            b10, b11 = split_columns(b1)
            b1 = _exp2_poly_cols(b11, scale, m, FIXED)
            b1 = join_columns(tl.exp2(b10 * scale - m[:, None]), b1)
            b = join_columns(tl.exp2(b0 * scale - m[:, None]), b1)
        y = join_columns(tl.exp2(a * scale - m[:, None]), b)
    return y


@triton.jit
def _exp2_poly_cols(s, scale, m, FIXED: tl.constexpr):
    if FIXED:
        return exp2_poly_affine(s, scale, m[:, None], -126, FIXED_HI, FIXED_DEGREE)
    else:
        return exp2_poly(s * scale - m[:, None], 4)


@triton.jit
def _tma_tiles(
    AD, BD, row, start, head, ROWS: tl.constexpr, COLS: tl.constexpr, PACKED: tl.constexpr
):
    """[ROWS, COLS] tiles of two TMA descriptors of one layout at sequence position `start` of
    head `head`: packed [T, H, D] descriptors at token `row + start`, dense [B, S, H, D] ones at
    batch `row`, position `start` (dense boxes past S, and past D, read zeros)."""
    if PACKED:
        a = AD.load([row + start, head, 0])
        b = BD.load([row + start, head, 0])
    else:
        a = AD.load([row, start, head, 0])
        b = BD.load([row, start, head, 0])
    return a.reshape([ROWS, COLS]), b.reshape([ROWS, COLS])


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt, KD, VD, kd_row, kd_col,
    pos, start, end, seqlen_k, qk_scale, cap_in, cap_out, slope2, window_left, window_right,
    offs_n, offs_d, d_ok,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, USE_DESC: tl.constexpr, PACKED: tl.constexpr,
    POLY_LOG: tl.constexpr, POLY_ALPHA: tl.constexpr, BLOCK_N: tl.constexpr,
    FIXED: tl.constexpr = False,
):  # fmt: skip
    """Online softmax over key blocks [start, end); MASKED for edge blocks only.

    USE_DESC: K and V tiles come through TMA tensor descriptors (Hopper), so no thread holds
    per-element addresses: dense descriptors are [B, Sk, Hkv, D] and fill rows past Sk (and
    columns past D) with zeros, so edge blocks use them too; packed ones are [Tk, Hkv, D], whose
    rows past a sequence belong to the next one: their edge blocks keep masked pointer loads.
    POLY_LOG / POLY_ALPHA (interior blocks only, where every exponent is finite): part of the
    exp2 work on the FMA pipe (`_exp2_mixed`, `exp2_poly`)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            col_ok = cols < seqlen_k
        if USE_DESC and not (MASKED and PACKED):
            k, v = _tma_tiles(KD, VD, kd_row, start_n, kd_col, BLOCK_N, offs_d.shape[0], PACKED)
            kT = tl.trans(k)
        else:
            kT_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]
            v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
            if MASKED:
                kT = tl.load(kT_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            elif EVEN_D:
                kT = tl.load(kT_ptrs)
                v = tl.load(v_ptrs)
            else:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, kT, None, IEEE)
        if HAS_SOFTCAP or HAS_ALIBI:
            s, _t = _scores(
                s, pos[:, None], cols[None, :], qk_scale, cap_in, cap_out, slope2,
                HAS_SOFTCAP, FAST_TANH, HAS_ALIBI,
            )  # fmt: skip
            scale = 1.0
        else:
            scale = qk_scale  # folded into the exp2 argument below: one FMA per score
        if MASKED:
            valid = col_ok[None, :]
            if HAS_KPM:
                valid = valid & (tl.load(kpm_base + cols, mask=col_ok, other=0) != 0)[None, :]
            if WINDOWED:
                valid = valid & (cols[None, :] >= pos[:, None] - window_left)
                valid = valid & (cols[None, :] <= pos[:, None] + window_right)
            s = tl.where(valid, s, float("-inf"))
        if FIXED:
            # interior blocks against the row maxima the caller already holds: no max, no
            # rescale; a score above them gives p > 1 (2**x up to 2**FIXED_HI on the FMA pipe),
            # which the caller's check of l_i catches
            p = _exp2_mixed(s, scale, m_i, POLY_LOG, True)
            l_i += tl.sum(p, 1)
            acc = _dot(p.to(v.dtype), v, acc, IEEE)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
            if MASKED:
                # A row with no visible key so far keeps m = -inf; subtract 0 there, never
                # -inf - -inf.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_sub)
                p = tl.exp2(s * scale - m_sub[:, None])
            else:
                # an interior block gives every row a finite maximum; m_i = -inf (first block) makes
                # alpha 2**-126 instead of 0, which multiplies l_i = 0 and acc = 0
                if POLY_ALPHA:
                    alpha = exp2_poly(m_i - m_new, 4)
                else:
                    alpha = tl.exp2(m_i - m_new)
                p = _exp2_mixed(s, scale, m_new, POLY_LOG)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _dot(p.to(v.dtype), v, acc, IEEE)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, KPM, ALIBI, KD, VD,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_mb, stride_ab,
    seqlen_q_dense, seqlen_k_dense, sm_scale, softcap, window_left, window_right, seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PACKED: tl.constexpr, HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, USE_DESC: tl.constexpr, POLY_LOG: tl.constexpr,
    POLY_ALPHA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIXED_MAX: tl.constexpr = False, FIXED_LOG: tl.constexpr = 0,
):  # fmt: skip
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    row0, seqlen_q = _seq_bounds(CU_Q, batch, seqlen_q_dense, PACKED)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    col0, seqlen_k = _seq_bounds(CU_K, batch, seqlen_k_dense, PACKED)
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head dims that are not powers of two (80, 96) mask the tail
    row_ok = offs_m < seqlen_q
    shift = seqlen_k - seqlen_q  # bottom-right alignment of queries on keys (0: self-attention)
    pos = offs_m + shift

    q_ptrs = Q + b64 * stride_qb + row0 * stride_qt + head * stride_qh
    q_ptrs += offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # bf16 arithmetic is wrong in the interpreter: compute on fp32 tiles there
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + col0 * stride_kt + kv_head * stride_kh
    v_base = V + b64 * stride_vb + col0 * stride_vt + kv_head * stride_vh
    # descriptor coordinates (int32): dense [batch, key, kv head, 0], packed [token, kv head, 0]
    if PACKED:
        kd_row = col0.to(tl.int32)
    else:
        kd_row = batch
    kpm_base = KPM + b64 * stride_mb
    qk_scale = sm_scale * 1.4426950408889634
    cap_in = sm_scale / softcap
    cap_out = softcap * 1.4426950408889634
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_ab + head) * 1.4426950408889634

    last = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _block_ranges(
        m_start + shift, last + shift, window_left, window_right, seqlen_k, pid_m < 0, HAS_KPM,
        BLOCK_N,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The two edge ranges first, the interior last (the softmax does not care about the order):
    # nothing the edge loops need stays live across the long interior loop (on sm_90 the 128x128
    # hd128 tile spilled 36-100 B of such values with the interior loop in the middle).
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt, KD, VD, kd_row,
        kv_head, pos, lo, tl.minimum(full_lo, hi), seqlen_k, qk_scale, cap_in, cap_out, slope2,
        window_left, window_right, offs_n, offs_d, d_ok,
        True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
        USE_DESC, PACKED, POLY_LOG, POLY_ALPHA, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt, KD, VD, kd_row,
        kv_head, pos, full_hi, hi, seqlen_k, qk_scale, cap_in, cap_out, slope2,
        window_left, window_right, offs_n, offs_d, d_ok,
        True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
        USE_DESC, PACKED, POLY_LOG, POLY_ALPHA, BLOCK_N,
    )  # fmt: skip
    online_end = full_hi
    if FIXED_MAX:
        # Dense, no window: every key block but a partial last one is interior. The edge and the
        # first interior block set every row's maximum (finite: that block has no mask); the
        # other interior blocks run against it without the max and the rescale (FIXED). A later
        # score more than log2(FIXED_LIMIT) above it, or a non-finite sum, makes the program redo
        # every block with the online softmax (one masked loop over all keys).
        tl.static_assert(not (PACKED or WINDOWED or HAS_KPM), "FIXED_MAX: dense calls only")
        online_end = tl.minimum(full_lo + BLOCK_N, full_hi)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt, KD, VD, kd_row,
        kv_head, pos, full_lo, online_end, seqlen_k, qk_scale, cap_in, cap_out, slope2,
        window_left, window_right, offs_n, offs_d, d_ok,
        False, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
        USE_DESC, PACKED, POLY_LOG, POLY_ALPHA, BLOCK_N,
    )  # fmt: skip
    if FIXED_MAX:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt, KD, VD, kd_row,
            kv_head, pos, online_end, full_hi, seqlen_k, qk_scale, cap_in, cap_out, slope2,
            window_left, window_right, offs_n, offs_d, d_ok,
            False, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
            USE_DESC, PACKED, FIXED_LOG, POLY_ALPHA, BLOCK_N, True,
        )  # fmt: skip
        bad = tl.sum(tl.where(l_i < FIXED_LIMIT, 0, 1), 0)
        bad += tl.sum(tl.sum(tl.where(tl.abs(acc) < float("inf"), 0, 1), 1), 0)
        if bad > 0:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kt, stride_vt, KD, VD, kd_row,
                kv_head, pos, 0, seqlen_k_dense, seqlen_k, qk_scale, cap_in, cap_out, slope2,
                window_left, window_right, offs_n, offs_d, d_ok,
                True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
                USE_DESC, PACKED, POLY_LOG, POLY_ALPHA, BLOCK_N,
            )  # fmt: skip

    has_key = l_i > 0.0  # a query with no visible key outputs zeros and lse = -inf
    if HAS_QPM:  # a padded query row (dense key padding mask, Sq == Sk) too
        has_key = has_key & (tl.load(kpm_base + offs_m, mask=row_ok, other=0) != 0)
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + b64 * stride_ob + row0 * stride_ot + head * stride_oh
    o_ptrs += offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptrs = LSE + b64 * stride_lb + head * stride_lh + row0 + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_SEQLENS,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh, seqlen_dense,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[i] = sum_d dO[i, d] * O[i, d] (float32), the softmax-Jacobian term of dS."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    row0, seqlen = _seq_bounds(CU_SEQLENS, batch, seqlen_dense, PACKED)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:
        return
    b64 = batch.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_ptrs = O + b64 * stride_ob + (row0 + offs_m[:, None]) * stride_ot + head * stride_oh
    do_ptrs = DO + b64 * stride_dob + (row0 + offs_m[:, None]) * stride_dot + head * stride_doh
    o = tl.load(o_ptrs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(
        DELTA + b64 * stride_lb + head * stride_lh + row0 + offs_m, delta, mask=offs_m < seqlen
    )


@triton.jit
def _row_values(base, rows, limit, other, MASKED: tl.constexpr):
    """base[rows] (float32 lse or delta); rows >= limit read `other` when MASKED."""
    if MASKED:
        return tl.load(base + rows, mask=rows < limit, other=other)
    else:
        return tl.load(base + rows)


@triton.jit
def _bwd_kv_blocks(
    dk, dv, k, v, q_base, do_base, dq_base, LSE, DELTA, lse_off,
    stride_qt, stride_dot, stride_dqt,
    cols, col_ok, key_ok, start, end, seqlen_q, shift, sm_scale, qk_scale, cap_in, cap_out,
    slope2, window_left, window_right, offs_m, offs_d, d_ok,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr, PART: tl.constexpr,
    BLOCK_M: tl.constexpr, QD, DOD, d_row, d_head, USE_DESC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """dK/dV (and atomic dQ) contributions of query blocks [start, end) to one key block
    (PART 0: dK and dV, 1: dV only, 2: dK only)."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            row_ok = rows < seqlen_q
            q_mask = row_ok[:, None] & d_ok[None, :]
        elif EVEN_D:
            q_mask = None
        else:
            q_mask = d_ok[None, :]
        if USE_DESC and not (MASKED and PACKED):
            # TMA (as in `_fwd_blocks`): dense boxes past Sq (and past D) read zeros
            q, do = _tma_tiles(QD, DOD, d_row, start_m, d_head, BLOCK_M, offs_d.shape[0], PACKED)
        else:
            q_ptrs = q_base + rows[:, None] * stride_qt + offs_d[None, :]
            do_ptrs = do_base + rows[:, None] * stride_dot + offs_d[None, :]
            if q_mask is None:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=q_mask, other=0.0)
                do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        if MASKED:
            # lse = -inf (rows past the end included) marks a query without visible keys: push
            # it to +inf so its P row is exp2(-inf) = 0, never exp2(-inf - -inf) = NaN.
            lse = tl.load(LSE + lse_off + rows, mask=row_ok, other=float("-inf"))
        else:
            lse = tl.load(LSE + lse_off + rows)
        if ATOMIC_DQ or offs_d.shape[0] <= 64:
            delta = _row_values(DELTA + lse_off, rows, seqlen_q, 0.0, MASKED)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        sT, tT = _scores(
            _dot(k, tl.trans(q), None, IEEE), cols[:, None], (rows + shift)[None, :], qk_scale,
            cap_in, cap_out, slope2, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI,
        )  # fmt: skip
        pT = tl.exp2(sT - lse2[None, :])
        if MASKED:
            valid = key_ok[:, None] & row_ok[None, :]
            if WINDOWED:
                pos = rows + shift
                valid = valid & (cols[:, None] >= pos[None, :] - window_left)
                valid = valid & (cols[:, None] <= pos[None, :] + window_right)
            pT = tl.where(valid, pT, 0.0)
        if PART != 2:
            dv = _dot(pT.to(do.dtype), do, dv, IEEE)
        if PART != 1:
            dpT = _dot(v, tl.trans(do), None, IEEE)
            if not (ATOMIC_DQ or offs_d.shape[0] <= 64):
                # loaded here, delta is not live across the S and dP GEMMs (sm_90, D=128 64x64
                # on descriptors: with delta above and the epilogue offsets before the loops,
                # 40 B spilled with triton 3.9, 52 B with 3.6); at D <= 64 it stays above: 4
                # fewer shared-memory loads a trip there (sm_90, 64x64 tile)
                delta = _row_values(DELTA + lse_off, rows, seqlen_q, 0.0, MASKED)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:  # d/dx [c * tanh(x / c)] = 1 - tanh^2
                dsT = dsT * (1.0 - tT * tT)
            dk = _dot(dsT.to(q.dtype), q, dk, IEEE)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(dsT).to(k.dtype), k, None, IEEE) * sm_scale
                dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=q_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K, KPM, ALIBI,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_lb, stride_lh, stride_mb, stride_ab,
    seqlen_q_dense, seqlen_k_dense, sm_scale, softcap, window_left, window_right, seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PACKED: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr, PART: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QD=None, DOD=None,
    USE_DESC: tl.constexpr = False,
):  # fmt: skip
    """One key block of one kv head: dK, dV summed over the GROUP q heads (+ dQ by atomics).

    Works on transposed score tiles `[BLOCK_N, BLOCK_M]` so dV = P^T dO and dK = dS^T Q are
    plain dots: dS = P * (dP - delta), dP = dO V^T, P = exp2(s - lse). PART 1 / 2 computes and
    stores dV / dK alone (two launches where one program cannot hold both [BLOCK_N, D] fp32
    accumulators in registers: head dim 256 on sm_90); 0 both.
    """
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    col0, seqlen_k = _seq_bounds(CU_K, batch, seqlen_k_dense, PACKED)
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen_k:
        return
    row0, seqlen_q = _seq_bounds(CU_Q, batch, seqlen_q_dense, PACKED)
    shift = seqlen_k - seqlen_q
    b64 = batch.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < seqlen_k
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_ptrs = K + b64 * stride_kb + (col0 + cols[:, None]) * stride_kt + kv_head * stride_kh
    v_ptrs = V + b64 * stride_vb + (col0 + cols[:, None]) * stride_vt + kv_head * stride_vh
    k = tl.load(k_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + b64 * stride_mb + cols, mask=col_ok, other=0) != 0)
    qk_scale = sm_scale * 1.4426950408889634
    cap_in = sm_scale / softcap
    cap_out = softcap * 1.4426950408889634

    # Query i (key position i + shift) sees key j iff j - shift - right <= i <= j - shift + left.
    n_last = tl.minimum(n_start + BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = _block_ranges(
        n_start - shift, n_last - shift, window_right, window_left, seqlen_q,
        n_start + BLOCK_N > seqlen_k, HAS_KPM, BLOCK_M,
    )  # fmt: skip
    if PACKED:  # the output offset uses col0, loaded from cu_seqlens: computed once, here
        out_off = b64 * stride_dkb + (col0 + n_start) * stride_dkt + kv_head * stride_dkh
    if PACKED:  # descriptor coordinates: the sequence's first query row (packed) or the batch
        d_row = row0.to(tl.int32)
    else:
        d_row = batch
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + b64 * stride_qb + row0 * stride_qt + head * stride_qh
        do_base = DO + b64 * stride_dob + row0 * stride_dot + head * stride_doh
        dq_base = DQ + b64 * stride_dqb + row0 * stride_dqt + head * stride_dqh
        # lse and delta share one layout: one offset, the two base pointers stay kernel
        # arguments (constant bank), not registers
        lse_off = b64 * stride_lb + head * stride_lh + row0
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + b64 * stride_ab + head) * 1.4426950408889634
        dk, dv = _bwd_kv_blocks(
            dk, dv, k, v, q_base, do_base, dq_base, LSE, DELTA, lse_off,
            stride_qt, stride_dot, stride_dqt, cols, col_ok, key_ok, lo,
            tl.minimum(full_lo, hi), seqlen_q, shift, sm_scale, qk_scale, cap_in, cap_out,
            slope2, window_left, window_right, offs_m, offs_d, d_ok,
            True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
            ATOMIC_DQ, PART, BLOCK_M, QD, DOD, d_row, head, USE_DESC, PACKED,
        )  # fmt: skip
        dk, dv = _bwd_kv_blocks(
            dk, dv, k, v, q_base, do_base, dq_base, LSE, DELTA, lse_off,
            stride_qt, stride_dot, stride_dqt, cols, col_ok, key_ok, full_lo, full_hi,
            seqlen_q, shift, sm_scale, qk_scale, cap_in, cap_out,
            slope2, window_left, window_right, offs_m, offs_d, d_ok,
            False, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
            ATOMIC_DQ, PART, BLOCK_M, QD, DOD, d_row, head, USE_DESC, PACKED,
        )  # fmt: skip
        dk, dv = _bwd_kv_blocks(
            dk, dv, k, v, q_base, do_base, dq_base, LSE, DELTA, lse_off,
            stride_qt, stride_dot, stride_dqt, cols, col_ok, key_ok, full_hi, hi,
            seqlen_q, shift, sm_scale, qk_scale, cap_in, cap_out,
            slope2, window_left, window_right, offs_m, offs_d, d_ok,
            True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE,
            ATOMIC_DQ, PART, BLOCK_M, QD, DOD, d_row, head, USE_DESC, PACKED,
        )  # fmt: skip
    # The stores' addresses and mask are rebuilt from scalars: per-thread pointers kept live
    # across the loops were spilled at D=256 (sm_90). A dense call's offset comes from program
    # ids only and is computed after the loops (computed before them, its 64-bit value spilled
    # at D=128 64x64 with triton 3.6); a packed call's before them (computed after, col0 stayed
    # live instead: 4 B spilled at D=256 16x64 with 3.6).
    dk = dk * sm_scale
    if not PACKED:
        out_off = b64 * stride_dkb + n_start * stride_dkt + kv_head * stride_dkh
    n_rem = seqlen_k - n_start
    offs_o = tl.arange(0, BLOCK_N)
    o_mask = (offs_o < n_rem)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_offs = out_off + offs_o[:, None] * stride_dkt + offs_d[None, :]
    if PART != 1:
        tl.store(DK + o_offs, dk.to(DK.dtype.element_ty), mask=o_mask)
    if PART != 2:
        tl.store(DV + o_offs, dv.to(DV.dtype.element_ty), mask=o_mask)


@triton.jit
def _bwd_q_blocks(
    dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kt, stride_vt,
    pos, start, end, seqlen_k, qk_scale, cap_in, cap_out, slope2, window_left, window_right,
    offs_n, offs_d, d_ok,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
    KD, VD, kd_row, kd_col, USE_DESC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """dQ contributions of key blocks [start, end) in a fixed order (deterministic mode).
    USE_DESC: K and V tiles through TMA descriptors, as in `_fwd_blocks` (packed edge blocks keep
    masked pointer loads: their rows past the sequence belong to the next one)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            col_ok = cols < seqlen_k
        if USE_DESC and not (MASKED and PACKED):
            k, v = _tma_tiles(KD, VD, kd_row, start_n, kd_col, BLOCK_N, offs_d.shape[0], PACKED)
        else:
            k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
            if MASKED:
                k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, t = _scores(
            _dot(q, tl.trans(k), None, IEEE), pos[:, None], cols[None, :], qk_scale, cap_in,
            cap_out, slope2, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI,
        )  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            valid = col_ok[None, :]
            if HAS_KPM:
                valid = valid & (tl.load(kpm_base + cols, mask=col_ok, other=0) != 0)[None, :]
            if WINDOWED:
                valid = valid & (cols[None, :] >= pos[:, None] - window_left)
                valid = valid & (cols[None, :] <= pos[:, None] + window_right)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), None, IEEE)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, KPM, ALIBI,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_mb, stride_ab,
    seqlen_q_dense, seqlen_k_dense, sm_scale, softcap, window_left, window_right, seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PACKED: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KD=None, VD=None, USE_DESC: tl.constexpr = False,
):  # fmt: skip
    """One query block of one q head: dQ = scale * sum_j dS[:, j] K[j] in a fixed key order."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    row0, seqlen_q = _seq_bounds(CU_Q, batch, seqlen_q_dense, PACKED)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return
    col0, seqlen_k = _seq_bounds(CU_K, batch, seqlen_k_dense, PACKED)
    shift = seqlen_k - seqlen_q
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_ptrs = Q + b64 * stride_qb + (row0 + offs_m[:, None]) * stride_qt + head * stride_qh
    do_ptrs = DO + b64 * stride_dob + (row0 + offs_m[:, None]) * stride_dot + head * stride_doh
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse_ptrs = LSE + b64 * stride_lb + head * stride_lh + row0 + offs_m
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
    delta = tl.load(
        DELTA + b64 * stride_lb + head * stride_lh + row0 + offs_m, mask=row_ok, other=0.0
    )
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = K + b64 * stride_kb + col0 * stride_kt + kv_head * stride_kh
    v_base = V + b64 * stride_vb + col0 * stride_vt + kv_head * stride_vh
    kpm_base = KPM + b64 * stride_mb
    qk_scale = sm_scale * 1.4426950408889634
    cap_in = sm_scale / softcap
    cap_out = softcap * 1.4426950408889634
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_ab + head) * 1.4426950408889634
    pos = offs_m + shift
    last = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _block_ranges(
        m_start + shift, last + shift, window_left, window_right, seqlen_k, pid_m < 0, HAS_KPM,
        BLOCK_N,
    )  # fmt: skip
    out_off = b64 * stride_dqb + (row0 + m_start) * stride_dqt + head * stride_dqh
    m_rem = seqlen_q - m_start
    if PACKED:  # descriptor coordinates: the sequence's first key row (packed) or the batch
        kd_row = col0.to(tl.int32)
    else:
        kd_row = batch
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_q_blocks(
        dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kt, stride_vt, pos, lo,
        tl.minimum(full_lo, hi), seqlen_k, qk_scale, cap_in, cap_out, slope2, window_left,
        window_right, offs_n, offs_d, d_ok,
        True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE, BLOCK_N,
        KD, VD, kd_row, kv_head, USE_DESC, PACKED,
    )  # fmt: skip
    dq = _bwd_q_blocks(
        dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kt, stride_vt, pos, full_lo,
        full_hi, seqlen_k, qk_scale, cap_in, cap_out, slope2, window_left, window_right,
        offs_n, offs_d, d_ok,
        False, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE, BLOCK_N,
        KD, VD, kd_row, kv_head, USE_DESC, PACKED,
    )  # fmt: skip
    dq = _bwd_q_blocks(
        dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kt, stride_vt, pos, full_hi, hi,
        seqlen_k, qk_scale, cap_in, cap_out, slope2, window_left, window_right,
        offs_n, offs_d, d_ok,
        True, EVEN_D, HAS_KPM, WINDOWED, HAS_SOFTCAP, FAST_TANH, HAS_ALIBI, UPCAST, IEEE, BLOCK_N,
        KD, VD, kd_row, kv_head, USE_DESC, PACKED,
    )  # fmt: skip
    dq = dq * sm_scale  # addresses rebuilt from scalars, as in the dK/dV kernel's epilogue
    offs_o = tl.arange(0, BLOCK_M)
    o_mask = (offs_o < m_rem)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_offs = out_off + offs_o[:, None] * stride_dqt + offs_d[None, :]
    tl.store(DQ + o_offs, dq.to(DQ.dtype.element_ty), mask=o_mask)


# --- launch configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel; `waves_per_eu` is AMD-only (0: unset)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    waves_per_eu: int = 0

    def launch_kwargs(self) -> dict[str, int]:
        kw = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.waves_per_eu:
            kw["waves_per_eu"] = self.waves_per_eu
        return kw


C = LaunchConfig
# (largest head dim, forward, dK/dV (+ atomic dQ), deterministic dQ) per family, first matching
# row wins. Rows of the tiles that feed the tensor cores set the warps: a Hopper warpgroup
# (4 warps) computes 64 rows per wgmma and Triton gives every warp of a chained-dot kernel its
# own rows (warpsPerCTA [num_warps, 1]), so more than rows/16 warps duplicate the work. The
# dK/dV kernel's dots have BLOCK_N rows (S^T, dP^T), the dQ kernel's BLOCK_M rows.
# Hopper (2026-12-07): 4-warp programs of at most ~240 registers so two programs share an SM (one
# program's MMAs overlap the other's softmax: the static model, bench/perf_model.py, predicts
# this; not yet measured); the hd128 backward keeps two stages in dK/dV and 64-key dQ blocks; at
# D=256 dK and dV come from two launches (FUSED_DKDV_MAX_D), each a 4-warp program of 64 keys
# x 16 queries (one [64, 256] fp32 accumulator = 128 registers a thread; a dense call's dK launch
# takes 32 on Q/dO descriptors: WIDE_DK_CONFIGS, as does a dense call's dK/dV at D=128), no
# duplicated work (an 8-warp program on a 64-row tile computes every score twice: each
# warpgroup owns all 64 rows); a dense call's dV launch takes 64 queries (SPLIT_DV_CONFIGS); dQ
# 64 queries x 32 keys on K/V tensor descriptors (DQ_TMA_HEAD_DIMS: with pointer loads it spilled
# 76 B with 3.6). Under the model of 2026-12-08 (shared-memory-fed wgmma at the feed rate) the
# 16-wide score GEMMs are feed-bound: wider query tiles are what the register budget limits.
# Heavier variants take VARIANT_CONFIGS.
# Hopper forward (2026-12-08): one 8-warp program per SM on K/V tensor descriptors
# (FWD_TMA_FAMILIES): hd64 128x256 (255 registers, no spill, 3 stages) with 1/8 of the exp2 on the
# FMA pipe, hd128 128x128 (226-230 registers, 2 stages) with the rescale exp2 on the FMA pipe
# (FWD_EXP2_SPLIT). The perf model of a2ebb0a charges co-resident programs their softmax in
# full, so the earlier two 4-warp programs per SM no longer helped (hd64 369 -> 390, hd128
# 409 -> 460 TFLOP/s predicted; not measured).
# AMD CDNA: no TMA or warp specialisation, no software pipelining on its LDS (num_stages=1),
# waves_per_eu sized so no kernel spills VGPRs, never more than 8 warps (wave64). Checked by
# compiling for sm_90, gfx942 and gfx90a (registers, spills, wgmma); not yet timed on hardware.
# CDNA hd128 dK/dV: 16-query tiles (32 spilled 12-132 B of VGPRs on gfx942 with a softcap or a
# window; 255-289 VGPRs with 16).
CONFIGS: dict[str, list[tuple[int, LaunchConfig, LaunchConfig, LaunchConfig]]] = {
    "hopper": [
        (64, C(128, 256, 8, 3), C(64, 64, 4, 2), C(64, 64, 4, 2)),
        (128, C(128, 128, 8, 2), C(32, 64, 4, 2), C(64, 64, 4, 2)),
        (256, C(64, 32, 4, 2), C(16, 64, 4, 2), C(64, 32, 4, 2)),
    ],
    "ampere": [
        (64, C(128, 128, 8, 2), C(64, 128, 8, 2), C(128, 64, 8, 2)),
        (128, C(128, 64, 8, 2), C(64, 128, 8, 1), C(128, 32, 8, 2)),
        (256, C(128, 32, 8, 1), C(32, 64, 4, 1), C(64, 16, 4, 1)),
    ],
    "cdna": [
        (64, C(128, 64, 8, 1, 2), C(32, 64, 4, 1, 1), C(128, 64, 8, 1, 1)),
        (128, C(128, 32, 8, 1, 1), C(16, 64, 4, 1, 1), C(64, 64, 4, 1, 1)),
        (256, C(64, 32, 4, 1, 1), C(16, 32, 4, 1, 1), C(32, 32, 4, 1, 1)),
    ],
    "interpreter": [
        (256, C(32, 32, 1, 1), C(32, 32, 1, 1), C(32, 32, 1, 1)),
    ],
}
# float32 inputs run IEEE dots (no tf32). Triton lowers those to FMA loops that keep whole
# K-slices of both operands in registers, so only small tiles fit: on sm_90 the forward and dQ
# compile without spills at D <= 128; dK/dV (two [BLOCK_N, D] accumulators plus K and V) and
# D=256 still spill. float32 attention on a GPU is a correctness path, not a fast one.
CONFIGS_FP32: dict[str, list[tuple[int, LaunchConfig, LaunchConfig, LaunchConfig]]] = {
    "nvidia": [
        (64, C(32, 32, 4, 1), C(16, 16, 1, 1), C(32, 32, 4, 1)),
        (128, C(16, 16, 1, 1), C(16, 16, 1, 1), C(16, 16, 1, 1)),
        (256, C(16, 16, 1, 1), C(16, 16, 1, 1), C(16, 16, 1, 1)),
    ],
    "cdna": [
        (64, C(64, 32, 4, 1, 1), C(32, 32, 4, 1, 1), C(32, 32, 4, 1, 1)),
        (128, C(32, 32, 4, 1, 1), C(16, 32, 4, 1, 1), C(32, 32, 4, 1, 1)),
        (256, C(32, 16, 4, 1, 1), C(16, 16, 4, 1, 1), C(32, 16, 4, 1, 1)),
    ],
}
del C
CONFIGS["nvidia"] = CONFIGS["ampere"]
CONFIGS["amd"] = CONFIGS["cdna"]
CONFIGS_FP32["hopper"] = CONFIGS_FP32["ampere"] = CONFIGS_FP32["nvidia"]
CONFIGS_FP32["amd"] = CONFIGS_FP32["cdna"]
CONFIGS_FP32["interpreter"] = CONFIGS["interpreter"]

_KERNEL_INDEX = {"fwd": 1, "dkdv": 2, "dq": 3}
# Largest head dim whose fast backward accumulates dQ by atomics inside the dK/dV kernel. On
# sm_90 the dK/dV tile at D=128 (K, V, dK, dV of 128 keys on chip) plus dQ's dot spills 50-640
# bytes per variant, while the two-kernel backward (dQ recomputes S and dP) compiles clean.
ATOMIC_DQ_MAX_D = {"hopper": 64, "ampere": 64, "nvidia": 64, "cdna": 128, "amd": 128}
# Largest head dim whose dK and dV come from one dK/dV program; above it two launches (dV, then
# dK) each hold one [BLOCK_N, D] fp32 accumulator. On sm_90 at D=256 the fused kernel spills
# 300 B - 5 KB in every tile shape that keeps 16-bit dots on wgmma (both triton versions).
FUSED_DKDV_MAX_D = {"hopper": 128}

# Per family: (largest head dim, {kernel: config}) replacing the CONFIGS entry for a 16-bit call
# with packed sequences, a window, softcap, ALiBi, a key padding mask or GQA/MQA (see
# `variant_overrides`). On sm_90 the dense configs above spill 4-364 B in those variants with
# triton 3.6 or 3.9 (GQA's head loop in dK/dV, the window and varlen index math); these compile
# without a spill in every quick-suite variant with both (docs/perf-log.md, 2026-12-07).
_C = LaunchConfig
VARIANT_CONFIGS: dict[str, list[tuple[int, dict[str, LaunchConfig]]]] = {
    "hopper": [
        (64, {"fwd": _C(128, 128, 8, 3), "dkdv": _C(32, 128, 8, 2)}),
        (128, {"fwd": _C(128, 64, 8, 2), "dkdv": _C(16, 128, 8, 2), "dq": _C(64, 32, 4, 2)}),
        (256, {"fwd": _C(128, 32, 8, 1), "dkdv": _C(16, 64, 4, 2), "dq": _C(64, 32, 4, 2)}),
    ],
}
# On top of VARIANT_CONFIGS for a call with packed sequences AND a window: at D=256 the 4-warp dK
# program spills 8 B with triton 3.6 there (255 registers; 0 with 3.9), so it keeps the 8-warp
# tile (every score computed by both warpgroups, one program per SM: slower, spill-free).
PACKED_WINDOW_CONFIGS: dict[str, list[tuple[int, dict[str, LaunchConfig]]]] = {
    "hopper": [(128, {}), (256, {"dkdv": _C(16, 64, 8, 3)})],
}
# On top of VARIANT_CONFIGS for a call with packed sequences: at D=256 the dQ program's packed
# edge blocks keep pointer loads (TMA rows past a sequence are the next one's), and 32-key
# blocks spill 4 B (16 B with a window) with triton 3.6 there: 16-key blocks.
PACKED_CONFIGS: dict[str, list[tuple[int, dict[str, LaunchConfig]]]] = {
    "hopper": [(128, {}), (256, {"dq": _C(64, 16, 4, 2)})],
}
# The dV launch of the split dK/dV (head dims above FUSED_DKDV_MAX_D) of a dense 16-bit call
# (no variant tiles), per family: (largest head dim, config); same BLOCK_N as the dK launch (one
# grid). On sm_90 at D=256 the dV program holds one fp32 accumulator and no dP: 64-query tiles
# fit (255 registers, no spill with triton 3.6 and 3.9) where the dK program's spill, and its
# `m64n64k16` score GEMMs need half the shared-memory bytes per MAC of the 16-query tiles'.
SPLIT_DV_CONFIGS: dict[str, list[tuple[int, LaunchConfig | None]]] = {
    "hopper": [(128, None), (256, _C(64, 64, 4, 2))],
}
# The dK/dV launch (the dK launch where dK and dV are split) of a dense 16-bit call, per family:
# {head dim: config}, exact head dims; such a launch reads Q and dO through TMA tensor
# descriptors (with pointer loads these tiles spill). On sm_90 (2026-12-08, after the query loop
# loads delta only where dS needs it and the epilogue builds its offsets after the loops):
# - D=128: 64 queries x 64 keys, 4 warps, 2 stages, 240 registers with triton 3.9 and 255 with
#   3.6, no spill (40 / 52 B before); `m64n64k16` score GEMMs instead of the shared-memory-feed-
#   bound `m64n32k16`: predicted hd128 bwd 307 -> 348 TFLOP/s (3.9 rows), 316 -> 345 (3.6).
# - D=256: 32 queries x 64 keys (dK launch), 216 registers with 3.9, 255 with 3.6, no spill (3.6
#   spilled 24 B before, so the tile was gated to triton >= 3.9): predicted hd256 bwd 264 (3.9
#   rows), 219 -> 268 (3.6 rows).
# (bench/perf_model.py, H100, B4, H = 2048/D, S4096; not measured.) Variant calls keep
# VARIANT_CONFIGS' tiles, except those of WIDE_DK_VARIANT_DIMS.
WIDE_DK_CONFIGS: dict[str, dict[int, LaunchConfig]] = {
    "hopper": {128: _C(64, 64, 4, 2), 256: _C(32, 64, 4, 2)},
}
# Head dims at which calls with a window, a key padding mask or ALiBi, or two of them (not packed,
# no softcap, no GQA/MQA) take the WIDE_DK_CONFIGS tile too, per family. sm_90 D=128: 64x64 on
# descriptors compiles without a spill there with both tritons (up to 255 registers with 3.6)
# where GQA/MQA (44-148 B), a softcap (48-212 B) and all three together (20 B, 3.6) spill; predicted
# (bench/perf_model.py, H100 bf16 B4 H16 S4096, not measured) window 209 -> 307, key padding
# 204 -> 295, ALiBi 201 -> 291 TFLOP/s with the 3.9 rows. At D=256 the 32-query dK spills 8 B
# with a window or ALiBi with 3.6.
WIDE_DK_VARIANT_DIMS: dict[str, tuple[int, ...]] = {"hopper": (128,)}
# The dQ launch of a dense 16-bit call at a head dim of DQ_TMA_HEAD_DIMS (K/V on descriptors),
# per family: (head dim, config). On sm_90 at D=128, 64 queries x 128 keys at 4 warps compile
# without a spill with triton 3.9 (226 registers) and 3.6 (236) on K/V descriptors: one program
# per SM, `m64n128k16` score GEMMs (no longer feed-bound) instead of 64x64 at two programs per
# SM; predicted dQ 1.752 -> 1.634 ms (3.9) and 1.725 -> 1.639 ms (3.6) (bench/perf_model.py,
# H100, B4 H16 S4096; not measured). Variant calls keep VARIANT_CONFIGS' dQ tile.
WIDE_DQ_CONFIGS: dict[str, dict[int, LaunchConfig]] = {"hopper": {128: _C(64, 128, 4, 2)}}
del _C

# Forward on TMA tensor descriptors (`_fwd_blocks`, USE_DESC): K and V tiles land in shared memory
# without per-thread addresses, which frees the registers that let sm_90 run 128x128 tiles at 8
# warps without a spill (the pointer version spilled 24-104 B at hd128).
FWD_TMA_FAMILIES = ("hopper",)
# (largest head dim, BLOCK_M, BLOCK_N, POLY_LOG, POLY_ALPHA, FIXED_LOG) per family, for that
# forward tile only: the last 2**-POLY_LOG of every interior block's score columns (and,
# POLY_ALPHA, the row rescale factors) take exp2 on the FMA pipe (`_exp2_mixed`), balancing the
# MUFU unit (16 exp2 a clock per SM) against instruction issue. FIXED_LOG (not None): bf16 calls
# without packing, a window or a key padding mask run the interior blocks after the first
# against fixed row maxima (FIXED_MAX, see FIXED_LIMIT), with the last 2**-FIXED_LOG of those
# blocks' columns on the FMA pipe. (fp16 keeps the online softmax: its P operand overflows at
# 65504, 16 log2 units above the maxima, so scores that far up would send programs to the
# fallback.) A tile whose main loop is issue-bound (the 128x64 and 128x128 variant tiles) keeps
# every exp2 on MUFU. Hopper, from the sm_90 SASS of the main loop (bench/perf_model.py), a warp
# per trip, triton 3.9.0:
# - hd64 128x256: online softmax 777 instructions / 130 MUFU, 904 / 114 with 1/8 of the columns
#   on the FMA pipe; FIXED_MAX with 1/4 of them (degree 3): 808 / 96 (predicted 390 -> 404
#   TFLOP/s, 3.6.0 rows 389 -> 407, the first block's trip charged at the online body);
# - hd128 128x128: 510 / 66, 527 / 64 with the rescale factors on the FMA pipe; FIXED_MAX with
#   1/8 of the columns: 416 / 56 (predicted 460 -> 477, 3.6.0: 462 -> 476).
# (H100 bf16 B4 S4096, not measured.)
FWD_EXP2_SPLIT: dict[str, list[tuple[int, int, int, int, bool, int | None]]] = {
    "hopper": [(64, 128, 256, 3, False, 2), (128, 128, 128, 0, True, 3)],
}


def variant_overrides(
    family: str, head_dim: int, packed_window: bool = False, packed: bool = False
) -> dict[str, LaunchConfig]:
    """Configs that replace `pick_config`'s for a 16-bit call with any of: packed sequences, a
    window, a softcap, ALiBi, a key padding mask or GQA/MQA (more index math, masks and per-head
    pointers live in registers than in the dense kernel); `packed` adds PACKED_CONFIGS and
    `packed_window` PACKED_WINDOW_CONFIGS (packed sequences and a window together)."""
    out: dict[str, LaunchConfig] = {}
    tables = (VARIANT_CONFIGS,) + ((PACKED_CONFIGS,) if packed or packed_window else ())
    tables += (PACKED_WINDOW_CONFIGS,) if packed_window else ()
    for table in tables:
        for max_d, overrides in table.get(family, ()):
            if head_dim <= max_d:
                out.update(overrides)
                break
    return out


def pick_config(
    family: str,
    head_dim: int,
    backward: bool,
    *,
    dtype: torch.dtype | None = None,
    kernel: str | None = None,
) -> LaunchConfig:
    """The fixed config of `family` for `head_dim` and `dtype` (16-bit when None).

    `kernel` is "fwd", "dkdv" or "dq"; without it, `backward` picks "dkdv" or "fwd".
    """
    table = CONFIGS_FP32 if dtype == torch.float32 else CONFIGS
    rows = table.get(family, table["ampere"])
    index = _KERNEL_INDEX[kernel or ("dkdv" if backward else "fwd")]
    for row in rows:
        if head_dim <= row[0]:
            return row[index]
    raise ValueError(f"head dim {head_dim} > 256 is not supported")


def autotune_configs(family: str, head_dim: int) -> list[triton.Config]:
    """The search space of BIDIRLM_AUTOTUNE=1 (GPU only)."""
    amd = family in ("cdna", "amd")
    configs = []
    for bm in (32, 64, 128):
        for bn in (32, 64, 128):
            if head_dim > 128 and bm * bn > 128 * 64:
                continue  # D=256 tiles beyond 128x64 exceed shared memory / registers
            for warps in (4, 8):
                if warps * 16 > max(bm, bn):
                    continue  # more warps than tile rows duplicate the tensor-core work
                for stages in (1,) if amd else (1, 2, 3):
                    # AMD options such as waves_per_eu travel in the kwargs dict: Config()
                    # itself has no such keyword (TypeError).
                    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn}
                    if amd:
                        kwargs["waves_per_eu"] = 1 if head_dim > 64 else 2
                    configs.append(triton.Config(kwargs, num_warps=warps, num_stages=stages))
    return configs


_TUNE_KEY = [
    "seq_bucket",
    "GROUP",
    "HEAD_DIM",
    "PACKED",
    "HAS_KPM",
    "WINDOWED",
    "HAS_SOFTCAP",
    "HAS_ALIBI",
    "UPCAST",
    "IEEE",
]


@functools.lru_cache(maxsize=64)
def _tuned(kernel_name: str, family: str, head_dim: int) -> triton.runtime.Autotuner:
    kernel = globals()[kernel_name]
    reset = ["DQ"] if kernel_name == "_attn_bwd_dkdv_kernel" else None
    key = _TUNE_KEY + (["ATOMIC_DQ", "PART"] if kernel_name == "_attn_bwd_dkdv_kernel" else [])
    return triton.autotune(autotune_configs(family, head_dim), key=key, reset_to_zero=reset)(kernel)


# --- host launchers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnShape:
    """Geometry of one call: batch (sequences), max lengths, heads, head dim, layout."""

    batch: int
    seqlen: int  # Sq (dense) or max_seqlen_q (packed)
    hq: int
    hkv: int
    head_dim: int
    packed: bool
    seqlen_k: int = -1  # Sk (dense) or max_seqlen_k (packed); -1: same as seqlen

    @property
    def kv_len(self) -> int:
        return self.seqlen if self.seqlen_k < 0 else self.seqlen_k


@dataclass(frozen=True)
class _Plan:
    """Everything about a launch that depends only on the cache key: computed once per key."""

    grid_fwd: tuple[int, int, int]
    grid_dkdv: tuple[int, int, int]
    grid_dq: tuple[int, int, int]
    grid_pre: tuple[int, int, int]
    meta: dict  # constexprs shared by the three kernels
    fwd: dict  # meta + tiles + launch options, per kernel
    dkdv: dict
    dq: dict
    pre: dict
    family: str
    dv: dict = dataclasses.field(default_factory=dict)  # the split dV launch (else dkdv's tiles)
    variant_configs: bool = False  # VARIANT_CONFIGS replaced some of the tiles
    wide_dk: bool = False  # a WIDE_DK_CONFIGS tile: its launches read Q/dO through descriptors


@functools.lru_cache(maxsize=256)
def _plan(
    family: str,
    interp: bool,
    dtype: torch.dtype,
    shape: AttnShape,
    windowed: bool,
    has_softcap: bool,
    has_kpm: bool,
    has_qpm: bool,
    has_alibi: bool,
) -> _Plan:
    block_d = max(16, triton.next_power_of_2(shape.head_dim))  # tl.dot needs K >= 16
    meta = {
        "GROUP": shape.hq // shape.hkv,
        "HEAD_DIM": shape.head_dim,
        "BLOCK_D": block_d,
        "EVEN_D": block_d == shape.head_dim,
        "PACKED": shape.packed,
        "HAS_KPM": has_kpm,
        "WINDOWED": windowed,
        "HAS_SOFTCAP": has_softcap,
        # tanh.approx.f32 (sm_75+): NVIDIA only, never in the interpreter, and only for 16-bit
        # inputs; float32 keeps the few-ulp exp2 form.
        "FAST_TANH": has_softcap and family in ("hopper", "ampere") and dtype != torch.float32,
        "HAS_ALIBI": has_alibi,
        # bf16 arithmetic is silently wrong in the interpreter; fp16 and fp32 are exact there.
        "UPCAST": interp and dtype == torch.bfloat16,
        "IEEE": dtype == torch.float32,
    }
    cfgs = {
        k: pick_config(family, shape.head_dim, False, dtype=dtype, kernel=k) for k in _KERNEL_INDEX
    }
    heavy = shape.packed or windowed or has_softcap or has_kpm or has_alibi or shape.hq != shape.hkv
    overrides = {}
    if heavy and dtype != torch.float32:
        overrides = variant_overrides(
            family, shape.head_dim, shape.packed and windowed, shape.packed
        )
    cfgs.update(overrides)
    dv_cfg = cfgs["dkdv"]
    if not heavy and dtype != torch.float32:
        for max_d, cfg in SPLIT_DV_CONFIGS.get(family, ()):
            if shape.head_dim <= max_d:
                if cfg is not None and cfg.block_n == dv_cfg.block_n:  # one grid for both
                    dv_cfg = cfg
                break

    wide_dk = WIDE_DK_CONFIGS.get(family, {}).get(shape.head_dim)
    light = not (shape.packed or has_softcap or shape.hq != shape.hkv)
    light = light and windowed + has_kpm + has_alibi < 3
    if (
        wide_dk is not None
        and (not heavy or (light and shape.head_dim in WIDE_DK_VARIANT_DIMS.get(family, ())))
        and (
            wide_dk.block_n == cfgs["dkdv"].block_n  # one grid for the split dV and dK launches
            or shape.head_dim <= FUSED_DKDV_MAX_D.get(family, 256)
        )
        and dtype != torch.float32
        and not autotune_enabled()
    ):
        cfgs["dkdv"] = wide_dk  # only with the Q/dO descriptors (`_kv_descriptors`)
    else:
        wide_dk = None

    wide_dq = WIDE_DQ_CONFIGS.get(family, {}).get(shape.head_dim)
    if (
        wide_dq is not None
        and not heavy
        and dtype != torch.float32
        and shape.head_dim in DQ_TMA_HEAD_DIMS.get(family, ())
        and not autotune_enabled()
    ):
        cfgs["dq"] = wide_dq  # only with the K/V descriptors: pointer loads need more registers

    def full(cfg: LaunchConfig, extra: dict) -> dict:
        return {
            **meta,
            **extra,
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            **cfg.launch_kwargs(),
        }

    bq, bk = shape.seqlen, shape.kv_len
    pre_rows = 64 if not interp else 32
    return _Plan(
        grid_fwd=(triton.cdiv(bq, cfgs["fwd"].block_m), shape.hq, shape.batch),
        grid_dkdv=(triton.cdiv(bk, cfgs["dkdv"].block_n), shape.hkv, shape.batch),
        grid_dq=(triton.cdiv(bq, cfgs["dq"].block_m), shape.hq, shape.batch),
        grid_pre=(triton.cdiv(bq, pre_rows), shape.hq, shape.batch),
        meta=meta,
        fwd=full(cfgs["fwd"], {"HAS_QPM": has_qpm}),
        dkdv=full(cfgs["dkdv"], {}),
        dq=full(cfgs["dq"], {}),
        dv=full(dv_cfg, {}),
        pre={
            "HEAD_DIM": shape.head_dim,
            "BLOCK_D": block_d,
            "PACKED": shape.packed,
            "BLOCK_M": pre_rows,
            "num_warps": 1 if interp else 4,
        },  # fmt: skip
        family=family,
        variant_configs=bool(overrides),
        wide_dk=wide_dk is not None,
    )


def _strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) element strides; the head dim must be unit-stride."""
    s = t.stride()
    if packed:
        return 0, s[0], s[1]
    return s[0], s[1], s[2]


def _lse_strides(shape: AttnShape, total_q: int) -> tuple[int, int]:
    # dense lse [B, Hq, Sq]; packed lse [Hq, Tq] (flash-attention's layouts)
    if shape.packed:
        return 0, total_q
    return shape.hq * shape.seqlen, shape.seqlen


@functools.lru_cache(maxsize=256)
def _scalars(shape: AttnShape, scale: float, window: tuple[int, int], softcap: float) -> tuple:
    left = window[0] if window[0] >= 0 else UNBOUNDED
    right = window[1] if window[1] >= 0 else UNBOUNDED
    bucket = triton.next_power_of_2(max(shape.seqlen, 1))
    return (shape.seqlen, shape.kv_len, float(scale), float(softcap) or 1.0, left, right, bucket)


def _geometry(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens, max_seqlen: int, cu_seqlens_k, max_seqlen_k
) -> AttnShape:
    if cu_seqlens is not None:
        kv = -1 if max_seqlen_k is None or cu_seqlens_k is None else int(max_seqlen_k)
        return AttnShape(
            cu_seqlens.shape[0] - 1, int(max_seqlen), q.shape[1], k.shape[1], q.shape[2], True, kv
        )
    b, s, hq, d = q.shape
    sk = k.shape[1]
    return AttnShape(b, s, hq, k.shape[2], d, False, -1 if sk == s else sk)


def _aux_args(
    key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None, dummy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(kpm, alibi, stride_mb, stride_ab); absent tensors are replaced by a never-read dummy."""
    kpm, stride_mb = dummy, 0
    if key_padding_mask is not None:
        kpm = key_padding_mask.contiguous().view(torch.uint8)  # bool -> uint8 without a copy
        stride_mb = kpm.stride(0)
    alibi, stride_ab = dummy, 0
    if alibi_slopes is not None:
        alibi = alibi_slopes.contiguous()
        stride_ab = alibi.shape[-1] if alibi.dim() == 2 else 0
    return kpm, alibi, stride_mb, stride_ab


_TILE_KW = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "waves_per_eu")


def _run(
    name: str, grid: tuple, extent: int, axis: str, args: tuple, kw: dict, family: str
) -> None:
    """Launch kernel `name` with its fixed config, or through triton.autotune when
    BIDIRLM_AUTOTUNE=1 (GPU only; the grid then follows the tuned tile along `axis`)."""
    if autotune_enabled():
        tuned = _tuned(name, family, kw["HEAD_DIM"])
        meta = {k: v for k, v in kw.items() if k not in _TILE_KW}
        tuned[lambda m: (triton.cdiv(extent, m[axis]), *grid[1:])](*args, **meta)
        return
    _KERNELS[name][grid](*args, **kw)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    max_seqlen: int,
    softmax_scale: float,
    window: tuple[int, int],
    softcap: float,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on validated inputs -> (out like q (contiguous), lse float32).

    Packed cross-attention takes `cu_seqlens_k` / `max_seqlen_k` for the keys (default: the
    query ones); dense cross-attention reads Sk from k. A key padding mask also zeroes the padded
    query rows when Sq == Sk. `alibi_slopes` is float32 `[Hq]` or `[B, Hq]`.
    """
    packed = cu_seqlens is not None
    shape = _geometry(q, k, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    total_q = q.shape[0] if packed else shape.seqlen
    lse_shape = (shape.hq, total_q) if packed else (shape.batch, shape.hq, shape.seqlen)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or shape.batch == 0 or shape.seqlen == 0:
        return out, lse.fill_(float("-inf"))
    if k.numel() == 0 or shape.kv_len == 0:  # no key anywhere: zeros, lse = -inf
        return out.zero_(), lse.fill_(float("-inf"))
    has_kpm = key_padding_mask is not None
    interp = interpreting()
    plan = _plan(
        arch_family(q.device), interp, q.dtype, shape, window != (-1, -1), softcap > 0,
        has_kpm, has_kpm and not packed and shape.kv_len == shape.seqlen,
        alibi_slopes is not None,
    )  # fmt: skip
    cu_q = cu_seqlens if packed else q
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_q
    kpm, alibi, stride_mb, stride_ab = _aux_args(key_padding_mask, alibi_slopes, q)
    k, v, kd, vd, fwd_kw = _fwd_operands(plan, k, v, packed)
    args = (
        q, k, v, out, lse, cu_q, cu_k, kpm, alibi, kd, vd,
        *_strides(q, packed), *_strides(k, packed), *_strides(v, packed),
        *_strides(out, packed), *_lse_strides(shape, total_q), stride_mb, stride_ab,
        *_scalars(shape, softmax_scale, window, softcap),
    )  # fmt: skip
    _run("_attn_fwd_kernel", plan.grid_fwd, shape.seqlen, "BLOCK_M", args, fwd_kw, plan.family)
    return out, lse


def _tma_ready(t: torch.Tensor) -> bool:
    """A TMA descriptor takes `t` as it is: 16-byte aligned base and strides, unit last stride."""
    size = t.element_size()
    strides = t.stride()
    return (
        t.data_ptr() % 16 == 0
        and strides[-1] == 1
        and all(st > 0 and st * size % 16 == 0 for st in strides[:-1])
    )


def _descriptor_pair(
    a: torch.Tensor, b: torch.Tensor, rows: int, block_d: int, packed: bool
) -> tuple[torch.Tensor, torch.Tensor, TensorDescriptor, TensorDescriptor]:
    """(a, b, their TMA descriptors) over one head's [rows, block_d] box: dense [B, S, H, D]
    with a [1, rows, 1, block_d] box, packed [T, H, D] with [rows, 1, block_d]; block_d > D
    (80, 96) reads zeros past D. Tensors whose layout TMA cannot take are copied once."""
    if not (_tma_ready(a) and _tma_ready(b)):
        a = a.clone(memory_format=torch.contiguous_format)
        b = b.clone(memory_format=torch.contiguous_format)
    box = [rows, 1, block_d] if packed else [1, rows, 1, block_d]
    da = TensorDescriptor(a, list(a.shape), list(a.stride()), box)
    db = TensorDescriptor(b, list(b.shape), list(b.stride()), box)
    return a, b, da, db


def _fwd_operands(
    plan: _Plan, k: torch.Tensor, v: torch.Tensor, packed: bool
) -> tuple[torch.Tensor, torch.Tensor, TensorDescriptor | None, TensorDescriptor | None, dict]:
    """(k, v, K descriptor, V descriptor, forward kwargs): descriptors (and their block shape)
    for the families of FWD_TMA_FAMILIES on 16-bit inputs, None elsewhere; FWD_EXP2_SPLIT's
    share of FMA-pipe exp2. K/V whose layout TMA cannot take are copied once (contiguous).
    Autotuning picks BLOCK_N after the descriptors exist, so it keeps pointer loads."""
    kw = dict(plan.fwd)
    d = kw["HEAD_DIM"]
    kw["POLY_LOG"], kw["POLY_ALPHA"], kw["FIXED_MAX"], kw["FIXED_LOG"] = 0, False, False, 0
    for max_d, bm, bn, log, alpha, fixed_log in FWD_EXP2_SPLIT.get(plan.family, ()):
        if d <= max_d:
            if (bm, bn) == (kw["BLOCK_M"], kw["BLOCK_N"]):
                kw["POLY_LOG"], kw["POLY_ALPHA"] = log, alpha
                variant = kw["PACKED"] or kw["WINDOWED"] or kw["HAS_KPM"]
                if fixed_log is not None and k.dtype == torch.bfloat16 and not variant:
                    kw["FIXED_MAX"], kw["FIXED_LOG"] = True, fixed_log
            break
    use_desc = (
        plan.family in FWD_TMA_FAMILIES
        and k.dtype in (torch.float16, torch.bfloat16)
        and not autotune_enabled()
    )
    kw["USE_DESC"] = use_desc
    if not use_desc:
        return k, v, None, None, kw
    k, v, kd, vd = _descriptor_pair(k, v, kw["BLOCK_N"], kw["BLOCK_D"], packed)
    return k, v, kd, vd, kw


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    max_seqlen: int,
    softmax_scale: float,
    window: tuple[int, int],
    softcap: float,
    deterministic: bool,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward -> (dq, dk, dv) shaped like q, k, v; scores are recomputed from lse."""
    packed = cu_seqlens is not None
    shape = _geometry(q, k, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or shape.batch == 0 or shape.seqlen == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    if shape.kv_len == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    has_kpm = key_padding_mask is not None
    interp = interpreting()
    plan = _plan(
        arch_family(q.device), interp, q.dtype, shape, window != (-1, -1), softcap > 0,
        has_kpm, has_kpm and not packed and shape.kv_len == shape.seqlen,
        alibi_slopes is not None,
    )  # fmt: skip
    total_q = q.shape[0] if packed else shape.seqlen
    cu_q = cu_seqlens if packed else q
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_q
    kpm, alibi, stride_mb, stride_ab = _aux_args(key_padding_mask, alibi_slopes, q)
    scalars = _scalars(shape, softmax_scale, window, softcap)
    lse_strides = _lse_strides(shape, total_q)
    strides_q, strides_k = _strides(q, packed), _strides(k, packed)
    strides_v, strides_do = _strides(v, packed), _strides(dout, packed)

    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[plan.grid_pre](
        out,
        dout,
        delta,
        cu_q,
        *_strides(out, packed),
        *strides_do,
        *lse_strides,
        shape.seqlen,
        **plan.pre,
    )

    # Fast mode: dQ accumulates in fp32 by atomics from every key block (order varies run to
    # run). Deterministic mode: a second kernel sums dQ over key blocks in a fixed order.
    # Above ATOMIC_DQ_MAX_D the dK/dV kernel cannot also hold dQ's operands in registers (it
    # spills), so dQ comes from its own kernel there (bitwise reproducible as a bonus).
    # The variant tiles of the dK/dV kernel leave no room for dQ's dot as well (too few query
    # rows for a wgmma, or spills): those calls take the two-kernel backward.
    atomic = (
        not deterministic
        and shape.head_dim <= ATOMIC_DQ_MAX_D.get(plan.family, 128)
        and not plan.variant_configs
    )
    if atomic:
        dq_buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_buf = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    strides_dq = _strides(dq_buf, packed)
    dkdv_args = (
        q, k, v, dout, lse, delta, dq_buf, dk, dv, cu_q, cu_k, kpm, alibi,
        *strides_q, *strides_k, *strides_v, *strides_do, *strides_dq,
        *_strides(dk, packed), *lse_strides, stride_mb, stride_ab, *scalars,
    )  # fmt: skip
    # Above FUSED_DKDV_MAX_D one program cannot hold both fp32 accumulators: dV, then dK, each
    # recomputing P (one more S = K Q^T per key block: 8 GEMMs per score instead of 7).
    split = shape.head_dim > FUSED_DKDV_MAX_D.get(plan.family, 256) and not atomic
    group = shape.hq // shape.hkv
    if split and group > 1:
        # GQA/MQA: a dK program looping over its group's q heads spills at D=256 (triton 3.9).
        # Run the dV / dK launches per q head on K, V repeated per q head (float32 dK, dV per q
        # head), then sum each group: the same MMAs, more programs, no loop over the group.
        _split_dkdv_per_q_head(
            plan, shape, dkdv_args, group, packed, interp, window, softcap, has_kpm, alibi_slopes
        )
    else:
        for part in (1, 2) if split else (0,):
            kw = {**(plan.dv if part == 1 else plan.dkdv), "ATOMIC_DQ": atomic, "PART": part}
            kw.update(_kv_descriptors(plan, q, dout, packed, kw))
            _run(
                "_attn_bwd_dkdv_kernel", plan.grid_dkdv, shape.kv_len, "BLOCK_N", dkdv_args, kw,
                plan.family,
            )  # fmt: skip
    if atomic:
        return dq_buf.to(q.dtype), dk, dv
    dq_args = (
        q, k, v, dout, lse, delta, dq_buf, cu_q, cu_k, kpm, alibi,
        *strides_q, *strides_k, *strides_v, *strides_do, *strides_dq,
        *lse_strides, stride_mb, stride_ab, *scalars,
    )  # fmt: skip
    dq_kw = {**plan.dq, **_dq_descriptors(plan, k, v, packed)}
    _run("_attn_bwd_dq_kernel", plan.grid_dq, shape.seqlen, "BLOCK_M", dq_args, dq_kw, plan.family)
    return dq_buf, dk, dv


# Head dims whose dQ kernel reads K and V through TMA descriptors (as the forward does), per
# family: on sm_90 at D=256 the freed address registers let the dQ program take 32-key blocks
# without a spill with triton 3.6 (64x32 spilled 76 B with pointer loads); at D=128 they let a
# dense call's dQ take 128-key blocks (WIDE_DQ_CONFIGS).
DQ_TMA_HEAD_DIMS: dict[str, tuple[int, ...]] = {"hopper": (128, 256)}


def _dq_descriptors(plan: _Plan, k: torch.Tensor, v: torch.Tensor, packed: bool) -> dict:
    """The dQ launch's K/V descriptor kwargs ({} where DQ_TMA_HEAD_DIMS does not apply, for
    float32 and under autotuning); K/V TMA cannot take as they are are copied once."""
    kw = plan.dq
    if (
        kw["HEAD_DIM"] not in DQ_TMA_HEAD_DIMS.get(plan.family, ())
        or k.dtype not in (torch.float16, torch.bfloat16)
        or autotune_enabled()
    ):
        return {}
    _k, _v, kd, vd = _descriptor_pair(k, v, kw["BLOCK_N"], kw["BLOCK_D"], packed)
    return {"KD": kd, "VD": vd, "USE_DESC": True}


# Head dims whose dK/dV kernel reads the Q and dO tiles through TMA descriptors in every
# non-packed 16-bit call, per family (the forward's layout and rules, as for dQ); the launches
# of a WIDE_DK_CONFIGS tile read them so at other head dims too. At D=128 the 16-query variant
# tiles (packed, softcap, GQA/MQA calls) stay on pointer loads: on descriptors their main loop
# took 16-53 more instructions a trip on sm_90 (TMA barrier waits for 16-row boxes).
KV_TMA_HEAD_DIMS: dict[str, tuple[int, ...]] = {"hopper": (256,)}


def _kv_descriptors(
    plan: _Plan, q: torch.Tensor, dout: torch.Tensor, packed: bool, kw: dict
) -> dict:
    """A dK/dV launch's Q/dO descriptor kwargs ({} where neither KV_TMA_HEAD_DIMS nor a
    WIDE_DK_CONFIGS tile applies, for float32, packed calls and under autotuning); Q/dO TMA
    cannot take as they are are copied once. Packed calls keep pointer loads: their edge blocks
    need them anyway, and both load paths in one program spilled 20 B at D=256 with triton 3.6."""
    if (
        packed
        or not (plan.wide_dk or kw["HEAD_DIM"] in KV_TMA_HEAD_DIMS.get(plan.family, ()))
        or q.dtype not in (torch.float16, torch.bfloat16)
        or autotune_enabled()
    ):
        return {}
    _q, _do, qd, dod = _descriptor_pair(q, dout, kw["BLOCK_M"], kw["BLOCK_D"], packed)
    return {"QD": qd, "DOD": dod, "USE_DESC": True}


def _split_dkdv_per_q_head(
    plan: _Plan, shape: AttnShape, dkdv_args: tuple, group: int, packed: bool, interp: bool,
    window: tuple[int, int], softcap: float, has_kpm: bool, alibi_slopes: torch.Tensor | None,
) -> None:  # fmt: skip
    """The split dV / dK launches of a GQA/MQA call on K, V repeated per q head; writes the
    group sums into the dk, dv of `dkdv_args` (positions 7, 8)."""
    q, k, v = dkdv_args[0], dkdv_args[1], dkdv_args[2]
    dk, dv = dkdv_args[7], dkdv_args[8]
    head_axis = 1 if packed else 2
    k_rep = k.repeat_interleave(group, dim=head_axis)
    v_rep = v.repeat_interleave(group, dim=head_axis)
    dk_rep = torch.empty(k_rep.shape, dtype=torch.float32, device=k.device)
    dv_rep = torch.empty(v_rep.shape, dtype=torch.float32, device=v.device)
    rep = dataclasses.replace(shape, hkv=shape.hq)
    rep_plan = _plan(
        plan.family, interp, q.dtype, rep, window != (-1, -1), softcap > 0, has_kpm,
        plan.fwd.get("HAS_QPM", False), alibi_slopes is not None,
    )  # fmt: skip
    n = 13 + 5 * 3  # tensors, then the q, k, v, dO, dQ strides
    args = (
        *dkdv_args[:1], k_rep, v_rep, *dkdv_args[3:7], dk_rep, dv_rep, *dkdv_args[9:13],
        *dkdv_args[13:16], *_strides(k_rep, packed), *_strides(v_rep, packed),
        *dkdv_args[22:n], *_strides(dk_rep, packed), *dkdv_args[n + 3 :],
    )  # fmt: skip
    for part in (1, 2):
        kw = {**rep_plan.dkdv, "ATOMIC_DQ": False, "PART": part}
        kw.update(_kv_descriptors(rep_plan, q, dkdv_args[3], packed, kw))
        _run(
            "_attn_bwd_dkdv_kernel", rep_plan.grid_dkdv, shape.kv_len, "BLOCK_N", args, kw,
            plan.family,
        )  # fmt: skip
    per_group = (*k.shape[:head_axis], shape.hkv, group, k.shape[-1])
    dk.copy_(dk_rep.view(per_group).sum(head_axis + 1))
    dv.copy_(dv_rep.view(per_group).sum(head_axis + 1))


_KERNELS = {
    "_attn_fwd_kernel": _attn_fwd_kernel,
    "_attn_bwd_dkdv_kernel": _attn_bwd_dkdv_kernel,
    "_attn_bwd_dq_kernel": _attn_bwd_dq_kernel,
}

__all__ = [
    "LaunchConfig",
    "CONFIGS",
    "CONFIGS_FP32",
    "pick_config",
    "attention_forward",
    "attention_backward",
]
