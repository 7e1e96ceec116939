"""Triton kernels and host launchers of bidirectional flash attention (forward and backward).

Layer 1 and 2 of the attention op (see `attention.py` for the autograd function, the
`torch.library` ops and the public API). One code path serves both layouts:

- dense: q `[B, S, Hq, D]`, k/v `[B, S, Hkv, D]`, optional key padding mask `[B, S]`;
  lse/delta `[B, Hq, S]` float32.
- packed: q `[T, Hq, D]`, k/v `[T, Hkv, D]`, int32 `cu_seqlens [N+1]`; lse/delta `[Hq, T]`.

A program owns one block of queries (forward, dQ) or keys (dK/dV) of one sequence and one head;
the sequence's start and length come from `cu_seqlens` (packed) or are `b * stride_b` and `S`
(dense). Key j is visible from query i iff `j >= i - left and j <= i + right` (the launcher turns
a negative side into 2**30, i.e. unbounded) and the key is a real token; blocks outside the
window's band are never visited. GQA: q head h reads kv head `h // GROUP`; the dK/dV program
loops over the GROUP q heads of its kv head, so dK/dV need no atomics. dQ comes either from a
separate kernel (deterministic) or from fp32 atomics inside the dK/dV kernel (fast).

Scores live in log2 units (`exp2` is one instruction, `exp` is `exp2` plus a multiply).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import arch_family, autotune_enabled
from .dispatch import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
UNBOUNDED = 1 << 30  # a window side of -1 becomes this: |i - j| never reaches it, i + it fits int32


@triton.jit
def _tanh(x):
    # libdevice tanh is neither in the interpreter nor portable to ROCm; exp2 is. e = exp(2x)
    # saturates to inf or 0, so the result saturates to +-1 instead of inf/inf.
    e = tl.exp2(x * 2.8853900817779268)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs would otherwise run in tf32 (10-bit mantissa) on NVIDIA tensor cores.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


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
def _scores(
    s_raw,
    softcap,
    sm_scale,
    HAS_SOFTCAP: tl.constexpr,
):
    """Raw q.k products -> scores in log2 units (and tanh for the softcap derivative)."""
    if HAS_SOFTCAP:
        t = _tanh(s_raw * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = s_raw  # unused
        s = s_raw * (sm_scale * 1.4426950408889634)
    return s, t


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, KPM,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh, stride_mb,
    seqlen_dense, sm_scale, softcap, window_left, window_right, seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    row0, seqlen = _seq_bounds(CU_SEQLENS, batch, seqlen_dense, PACKED)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:
        return
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # head dims that are not powers of two (80, 96) mask the tail
    row_ok = offs_m < seqlen

    q_ptrs = Q + b64 * stride_qb + row0 * stride_qt + head * stride_qh
    q_ptrs += offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # bf16 arithmetic is wrong in the interpreter: compute on fp32 tiles there
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + row0 * stride_kt + kv_head * stride_kh
    v_base = V + b64 * stride_vb + row0 * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOWED:  # only key blocks that intersect the band of this query block
        lo = tl.maximum(m_start - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(m_start + BLOCK_M + window_right, seqlen)
    else:
        lo = 0
        hi = seqlen
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen
        kT = tl.load(
            k_base + cols[None, :] * stride_kt + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s, _t = _scores(_dot(q, kT, IEEE), softcap, sm_scale, HAS_SOFTCAP)
        valid = col_ok[None, :]
        if HAS_KPM:
            key_ok = tl.load(KPM + b64 * stride_mb + cols, mask=col_ok, other=0) != 0
            valid = valid & key_ok[None, :]
        if WINDOWED:
            valid = valid & (cols[None, :] >= offs_m[:, None] - window_left)
            valid = valid & (cols[None, :] <= offs_m[:, None] + window_right)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 there, never -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    has_key = l_i > 0.0  # a query with no visible key outputs zeros and lse = -inf
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
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
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_SEQLENS, KPM,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_lb, stride_lh, stride_mb,
    seqlen_dense, sm_scale, softcap, window_left, window_right, seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key block of one kv head: dK, dV summed over the GROUP q heads (+ dQ by atomics).

    Works on transposed score tiles `[BLOCK_N, BLOCK_M]` so dV = P^T dO and dK = dS^T Q are
    plain dots: dS = P * (dP - delta), dP = dO V^T, P = exp2(s - lse).
    """
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    row0, seqlen = _seq_bounds(CU_SEQLENS, batch, seqlen_dense, PACKED)
    n_start = pid_n * BLOCK_N
    if n_start >= seqlen:
        return
    b64 = batch.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = cols < seqlen
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k_ptrs = K + b64 * stride_kb + (row0 + cols[:, None]) * stride_kt + kv_head * stride_kh
    v_ptrs = V + b64 * stride_vb + (row0 + cols[:, None]) * stride_vt + kv_head * stride_vh
    k = tl.load(k_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + b64 * stride_mb + cols, mask=col_ok, other=0) != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if WINDOWED:  # queries i that see key j satisfy j - right <= i <= j + left
        lo = tl.maximum(n_start - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        hi = tl.minimum(n_start + BLOCK_N + window_left, seqlen)
    else:
        lo = 0
        hi = seqlen
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + b64 * stride_qb + row0 * stride_qt + head * stride_qh
        do_base = DO + b64 * stride_dob + row0 * stride_dot + head * stride_doh
        dq_base = DQ + b64 * stride_dqb + row0 * stride_dqt + head * stride_dqh
        lse_base = LSE + b64 * stride_lb + head * stride_lh + row0
        delta_base = DELTA + b64 * stride_lb + head * stride_lh + row0
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(
                q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0
            )
            do = tl.load(
                do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0
            )
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            # lse = -inf marks a query without visible keys: its P row must be 0, and
            # exp2(-inf - -inf) would be NaN, so push lse to +inf instead.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            sT, tT = _scores(_dot(k, tl.trans(q), IEEE), softcap, sm_scale, HAS_SOFTCAP)
            valid = key_ok[:, None] & row_ok[None, :]
            if WINDOWED:
                valid = valid & (cols[:, None] >= rows[None, :] - window_left)
                valid = valid & (cols[:, None] <= rows[None, :] + window_right)
            pT = tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0)
            dv += _dot(pT.to(do.dtype), do, IEEE)
            dpT = _dot(v, tl.trans(do), IEEE)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:  # d/dx [c * tanh(x / c)] = 1 - tanh^2
                dsT = dsT * (1.0 - tT * tT)
            dk += _dot(dsT.to(q.dtype), q, IEEE)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(dsT).to(k.dtype), k, IEEE) * sm_scale
                dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=q_mask)
    dk = dk * sm_scale
    dk_ptrs = DK + b64 * stride_dkb + (row0 + cols[:, None]) * stride_dkt + kv_head * stride_dkh
    dv_ptrs = DV + b64 * stride_dkb + (row0 + cols[:, None]) * stride_dkt + kv_head * stride_dkh
    tl.store(dk_ptrs + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, KPM,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh, stride_mb,
    seqlen_dense, sm_scale, softcap, window_left, window_right, seq_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr, HAS_KPM: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One query block of one q head: dQ = scale * sum_j dS[:, j] K[j] in a fixed key order."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    row0, seqlen = _seq_bounds(CU_SEQLENS, batch, seqlen_dense, PACKED)
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen:
        return
    kv_head = head // GROUP
    b64 = batch.to(tl.int64)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_ptrs = Q + b64 * stride_qb + (row0 + offs_m[:, None]) * stride_qt + head * stride_qh
    do_ptrs = DO + b64 * stride_dob + (row0 + offs_m[:, None]) * stride_dot + head * stride_doh
    q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + b64 * stride_lb + head * stride_lh + row0 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(
        DELTA + b64 * stride_lb + head * stride_lh + row0 + offs_m, mask=row_ok, other=0.0
    )
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = K + b64 * stride_kb + row0 * stride_kt + kv_head * stride_kh
    v_base = V + b64 * stride_vb + row0 * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOWED:
        lo = tl.maximum(m_start - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(m_start + BLOCK_M + window_right, seqlen)
    else:
        lo = 0
        hi = seqlen
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seqlen
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, t = _scores(_dot(q, tl.trans(k), IEEE), softcap, sm_scale, HAS_SOFTCAP)
        valid = col_ok[None, :] & row_ok[:, None]
        if HAS_KPM:
            key_ok = tl.load(KPM + b64 * stride_mb + cols, mask=col_ok, other=0) != 0
            valid = valid & key_ok[None, :]
        if WINDOWED:
            valid = valid & (cols[None, :] >= offs_m[:, None] - window_left)
            valid = valid & (cols[None, :] <= offs_m[:, None] + window_right)
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    dq_ptrs = DQ + b64 * stride_dqb + (row0 + offs_m[:, None]) * stride_dqt + head * stride_dqh
    tl.store(dq_ptrs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


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


# (largest head dim, forward config, backward config) per family, first matching row wins.
# NVIDIA: large query tiles keep the tensor cores busy; D=256 halves them to fit shared memory
# (a 128x256 bf16 tile is 64 KiB per pipeline stage). The backward keeps K, V, dK, dV of a key
# block on chip, so its tiles are smaller. AMD CDNA: no TMA / warp specialization, software
# pipelining does not pay on its LDS (num_stages=1), waves_per_eu=2 trades registers for occupancy,
# and never more than 8 warps (wave64: 8 warps are already 512 threads).
# Interpreter: 32x32 tiles make tests cross block boundaries at small S.
# These NVIDIA/AMD rows are starting points that have not been tuned on hardware yet.
CONFIGS: dict[str, list[tuple[int, LaunchConfig, LaunchConfig]]] = {
    "hopper": [
        (64, LaunchConfig(128, 64, 4, 3), LaunchConfig(64, 64, 4, 2)),
        (128, LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 8, 2)),
        (256, LaunchConfig(64, 64, 8, 2), LaunchConfig(32, 64, 8, 1)),
    ],
    "ampere": [
        (64, LaunchConfig(128, 64, 4, 3), LaunchConfig(64, 64, 4, 2)),
        (128, LaunchConfig(128, 32, 8, 2), LaunchConfig(64, 32, 8, 2)),
        (256, LaunchConfig(64, 32, 8, 1), LaunchConfig(32, 32, 8, 1)),
    ],
    "cdna": [
        (64, LaunchConfig(128, 64, 4, 1, 2), LaunchConfig(64, 64, 4, 1, 2)),
        (128, LaunchConfig(128, 64, 8, 1, 2), LaunchConfig(64, 64, 8, 1, 2)),
        (256, LaunchConfig(64, 32, 8, 1, 2), LaunchConfig(32, 32, 8, 1, 2)),
    ],
    "interpreter": [
        (256, LaunchConfig(32, 32, 1, 1), LaunchConfig(32, 32, 1, 1)),
    ],
}
CONFIGS["nvidia"] = CONFIGS["ampere"]
CONFIGS["amd"] = CONFIGS["cdna"]


def pick_config(family: str, head_dim: int, backward: bool) -> LaunchConfig:
    """The fixed config of `family` for `head_dim` (the forward or the backward one)."""
    for max_d, fwd, bwd in CONFIGS.get(family, CONFIGS["ampere"]):
        if head_dim <= max_d:
            return bwd if backward else fwd
    raise ValueError(f"head dim {head_dim} > 256 is not supported")


def autotune_configs(family: str, head_dim: int) -> list[triton.Config]:
    """The search space of BIDIRLM_AUTOTUNE=1 (GPU only)."""
    amd = family in ("cdna", "amd")
    configs = []
    for bm in (32, 64, 128):
        for bn in (32, 64, 128):
            if head_dim > 128 and bm * bn > 64 * 64:
                continue  # D=256 tiles beyond 64x64 exceed shared memory / registers
            for warps in (4, 8):
                for stages in (1,) if amd else (1, 2, 3):
                    kw = {"waves_per_eu": 2} if amd else {}
                    configs.append(
                        triton.Config(
                            {"BLOCK_M": bm, "BLOCK_N": bn},
                            num_warps=warps,
                            num_stages=stages,
                            **kw,
                        )
                    )
    return configs


_TUNE_KEY = [
    "seq_bucket",
    "GROUP",
    "HEAD_DIM",
    "PACKED",
    "HAS_KPM",
    "WINDOWED",
    "HAS_SOFTCAP",
    "UPCAST",
    "IEEE",
]


@functools.lru_cache(maxsize=64)
def _tuned(kernel_name: str, family: str, head_dim: int) -> triton.runtime.Autotuner:
    kernel = globals()[kernel_name]
    reset = ["DQ"] if kernel_name == "_attn_bwd_dkdv_kernel" else None
    key = _TUNE_KEY + (["ATOMIC_DQ"] if kernel_name == "_attn_bwd_dkdv_kernel" else [])
    return triton.autotune(autotune_configs(family, head_dim), key=key, reset_to_zero=reset)(kernel)


def _launch(
    name: str,
    grid_axis: str,
    extent: int,
    rest: tuple[int, int],
    args: tuple,
    meta: dict,
    cfg: LaunchConfig,
    family: str,
) -> None:
    """Launch kernel `name` on a grid of cdiv(extent, grid_axis) x rest with the fixed config
    `cfg`, or through triton.autotune when BIDIRLM_AUTOTUNE=1 (GPU only)."""
    if autotune_enabled():
        tuned = _tuned(name, family, meta["HEAD_DIM"])
        grid = lambda m: (triton.cdiv(extent, m[grid_axis]), *rest)
        tuned[grid](*args, **meta)
        return
    block = cfg.block_m if grid_axis == "BLOCK_M" else cfg.block_n
    grid = (triton.cdiv(extent, block), *rest)
    globals()[name][grid](
        *args, **meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cfg.launch_kwargs()
    )


# --- host launchers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnShape:
    """Geometry of one call: batch (sequences), max length, heads, head dim, layout."""

    batch: int
    seqlen: int  # S (dense) or max_seqlen (packed)
    hq: int
    hkv: int
    head_dim: int
    packed: bool


def _strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, token, head) element strides; the head dim must be unit-stride."""
    if packed:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(shape: AttnShape, total: int) -> tuple[int, int]:
    # dense lse [B, Hq, S]; packed lse [Hq, T] (flash-attention's layouts)
    if shape.packed:
        return 0, total
    return shape.hq * shape.seqlen, shape.seqlen


def _common_meta(
    q: torch.Tensor, shape: AttnShape, window: tuple[int, int], softcap: float, has_kpm: bool
) -> dict:
    return {
        "GROUP": shape.hq // shape.hkv,
        "HEAD_DIM": shape.head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(shape.head_dim)),  # tl.dot needs K >= 16
        "PACKED": shape.packed,
        "HAS_KPM": has_kpm,
        "WINDOWED": window != (-1, -1),
        "HAS_SOFTCAP": softcap > 0,
        # bf16 arithmetic is silently wrong in the interpreter; fp16 and fp32 are exact there.
        "UPCAST": interpreting() and q.dtype == torch.bfloat16,
        "IEEE": q.dtype == torch.float32,
    }


def _scalars(shape: AttnShape, scale: float, window: tuple[int, int], softcap: float) -> tuple:
    left = window[0] if window[0] >= 0 else UNBOUNDED
    right = window[1] if window[1] >= 0 else UNBOUNDED
    bucket = triton.next_power_of_2(max(shape.seqlen, 1))
    return (shape.seqlen, float(scale), float(softcap) or 1.0, left, right, bucket)


def _geometry(q: torch.Tensor, k: torch.Tensor, cu_seqlens, max_seqlen: int) -> AttnShape:
    packed = cu_seqlens is not None
    if packed:
        batch, seqlen = cu_seqlens.numel() - 1, int(max_seqlen)
    else:
        batch, seqlen = q.shape[0], q.shape[1]
    return AttnShape(batch, seqlen, q.shape[-2], k.shape[-2], q.shape[-1], packed)


def _kpm_arg(kpm: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    if kpm is None:
        return dummy, 0
    kpm = kpm.contiguous().view(torch.uint8)  # bool -> uint8 without a copy
    return kpm, kpm.stride(0)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on validated inputs -> (out like q (contiguous), lse float32)."""
    shape = _geometry(q, k, cu_seqlens, max_seqlen)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    total = q.shape[0] if shape.packed else shape.seqlen
    lse_shape = (shape.hq, total) if shape.packed else (shape.batch, shape.hq, shape.seqlen)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or shape.batch == 0 or shape.seqlen == 0:
        return out, lse.fill_(float("-inf"))
    cu = cu_seqlens if shape.packed else q
    kpm, stride_mb = _kpm_arg(key_padding_mask, q)
    meta = _common_meta(q, shape, window, softcap, key_padding_mask is not None)
    args = (
        q, k, v, out, lse, cu, kpm,
        *_strides(q, shape.packed), *_strides(k, shape.packed), *_strides(v, shape.packed),
        *_strides(out, shape.packed), *_lse_strides(shape, total), stride_mb,
        *_scalars(shape, softmax_scale, window, softcap),
    )  # fmt: skip
    family = arch_family(q.device)
    cfg = pick_config(family, shape.head_dim, backward=False)
    grid_rest = (shape.hq, shape.batch)
    _launch("_attn_fwd_kernel", "BLOCK_M", shape.seqlen, grid_rest, args, meta, cfg, family)
    return out, lse


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward -> (dq, dk, dv) shaped like q, k, v; scores are recomputed from lse."""
    shape = _geometry(q, k, cu_seqlens, max_seqlen)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or shape.batch == 0 or shape.seqlen == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    total = q.shape[0] if shape.packed else shape.seqlen
    cu = cu_seqlens if shape.packed else q
    kpm, stride_mb = _kpm_arg(key_padding_mask, q)
    meta = _common_meta(q, shape, window, softcap, key_padding_mask is not None)
    family = arch_family(q.device)
    cfg = pick_config(family, shape.head_dim, backward=True)
    scalars = _scalars(shape, softmax_scale, window, softcap)
    lse_strides = _lse_strides(shape, total)
    strides_q, strides_k = _strides(q, shape.packed), _strides(k, shape.packed)
    strides_v, strides_do = _strides(v, shape.packed), _strides(dout, shape.packed)

    delta = torch.empty_like(lse)
    pre = LaunchConfig(cfg.block_m, cfg.block_n, 4 if family != "interpreter" else 1, 1)
    _attn_bwd_preprocess_kernel[(triton.cdiv(shape.seqlen, pre.block_m), shape.hq, shape.batch)](
        out, dout, delta, cu,
        *_strides(out, shape.packed), *strides_do, *lse_strides, shape.seqlen,
        HEAD_DIM=shape.head_dim, BLOCK_D=meta["BLOCK_D"], PACKED=shape.packed,
        BLOCK_M=pre.block_m, num_warps=pre.num_warps,
    )  # fmt: skip

    # Fast mode: dQ accumulates in fp32 by atomics from every key block (order varies run to
    # run). Deterministic mode: a second kernel sums dQ over key blocks in a fixed order.
    atomic = not deterministic
    if atomic:
        dq_buf = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_buf = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    strides_dq = _strides(dq_buf, shape.packed)
    dkdv_args = (
        q, k, v, dout, lse, delta, dq_buf, dk, dv, cu, kpm,
        *strides_q, *strides_k, *strides_v, *strides_do, *strides_dq,
        *_strides(dk, shape.packed), *lse_strides, stride_mb, *scalars,
    )  # fmt: skip
    _launch(
        "_attn_bwd_dkdv_kernel",
        "BLOCK_N",
        shape.seqlen,
        (shape.hkv, shape.batch),
        dkdv_args,
        {**meta, "ATOMIC_DQ": atomic},
        cfg,
        family,
    )
    if atomic:
        return dq_buf.to(q.dtype), dk, dv
    dq_args = (
        q, k, v, dout, lse, delta, dq_buf, cu, kpm,
        *strides_q, *strides_k, *strides_v, *strides_do, *strides_dq,
        *lse_strides, stride_mb, *scalars,
    )  # fmt: skip
    grid_rest = (shape.hq, shape.batch)
    _launch("_attn_bwd_dq_kernel", "BLOCK_M", shape.seqlen, grid_rest, dq_args, meta, cfg, family)
    return dq_buf, dk, dv


__all__ = ["LaunchConfig", "CONFIGS", "pick_config", "attention_forward", "attention_backward"]
