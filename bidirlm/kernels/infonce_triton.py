"""Triton kernels and host launchers of the fused InfoNCE loss (see `infonce.py` for the op).

One *direction* of the loss, for `rows [R, d]` and `cols [N, d]`:
`lse_i = logsumexp_j(scale * sim(rows_i, cols_j))`, `pos_i = scale * sim(rows_i, cols_{offset+i})`,
with `sim` the dot product, times `rx_i * ry_j` (float32 inverse norms) for the cosine. Columns
`j` with `lo <= j < hi` and `(j - lo) % period == i` can be excluded (the query itself among the
queries, the documents of the same query among the documents: `query_to_query`, `doc_to_doc`).

- `_launch_forward`: `_inv_norm_kernel` per input, `_infonce_fwd_kernel` over (row blocks, column
  splits) with an online log-sum-exp in fp32, one `logsumexp` merging the splits.
- `_launch_backward`: chunks of the logit matrix; `_infonce_bwd_kernel` writes the chunk's
  `E = d loss / d (row . col)` and two GEMM kernels accumulate `E @ cols` and `E.T @ rows` in
  float32 on chip (one read-modify-write of a chunk partial per chunk, in the epilogue);
  `_norm_grad_kernel` applies the normalization's Jacobian and the cast. Every per-chunk step is a
  Triton launch: the number of aten ops per direction is a constant, whatever B and M.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import config
from .config import arch_family, autotune_enabled
from .dispatch import interpreting

# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _similarity_tile(
    x_ptr,
    y_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    dim,
    stride_x,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 `[BLOCK_M, BLOCK_N]` tile of `x[rows] @ y[cols].T`, K loop over the width."""
    # rows * stride overflows int32 once M * d > 2^31 (512k documents x 4096 wide), so int64.
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    y_base = y_ptr + cols.to(tl.int64)[None, :] * stride_y
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        x = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Loaded as [BLOCK_K, BLOCK_N] so the dot needs no transpose.
        y = tl.load(y_base + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            # The interpreter computes bf16 on raw bits (silently wrong): upcast right away.
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _excluded(rows, cols, lo, hi, period):
    """[rows, cols] mask of excluded columns: `lo <= j < hi` and `(j - lo) % period == i`."""
    rel = cols[None, :] - lo
    return (rel >= 0) & (cols[None, :] < hi) & ((rel % period) == rows[:, None])


@triton.jit
def _infonce_fwd_kernel(
    x_ptr,
    y_ptr,
    rx_ptr,
    ry_ptr,
    lse_ptr,
    pos_ptr,
    n_rows,
    n_cols,
    dim,
    stride_x,
    stride_y,
    positive_offset,
    scale,
    excl_lo,
    excl_hi,
    excl_period,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    EXCLUDE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row block, column split): partial lse over its columns, and the positive logit.

    Writes `lse_ptr[split, row]` (natural log, -inf for an empty split) and `pos_ptr[row]` from
    the one split whose column range holds the row's positive.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    per_split = tl.cdiv(tl.cdiv(n_cols, BLOCK_N), n_splits) * BLOCK_N
    col_lo = pid_s * per_split
    col_hi = tl.minimum(col_lo + per_split, n_cols)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    if NORMALIZE:
        row_scale = tl.load(rx_ptr + rows, mask=row_ok, other=0.0) * scale
    else:
        row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
    target = rows + positive_offset

    # Running max in natural units and sum of exp(s - m): the exponent's argument is formed as
    # `(s - m) * log2(e)`, so its rounding error is relative to s - m (small for the terms that
    # matter), not to s; scaling s by log2(e) first would cost |s| * 2^-24 of absolute error per
    # logit, 1e-4 at |s| = 1000 (dot similarities of unnormalized embeddings at scale 100). A
    # row whose only column is its positive then gets lse = s exactly, and a loss of exactly 0.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        acc = _similarity_tile(
            x_ptr, y_ptr, rows, row_ok, cols, col_ok, dim, stride_x, stride_y,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        if NORMALIZE:
            col_scale = tl.load(ry_ptr + cols, mask=col_ok, other=0.0)
            s = acc * row_scale[:, None] * col_scale[None, :]
        else:
            s = acc * row_scale[:, None]
        hit = cols[None, :] == target[:, None]
        pos_i += tl.sum(tl.where(hit, s, 0.0), axis=1)
        keep = col_ok[None, :]
        if EXCLUDE:
            keep = keep & ~_excluded(rows, cols, excl_lo, excl_hi, excl_period)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all excluded so far: no NaN
        alpha = tl.exp2((m_i - m_ref) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(tl.exp2((s - m_ref[:, None]) * 1.4426950408889634), axis=1)
        m_i = m_new
    # An empty split keeps m = -inf, l = 0: its lse is -inf and drops out of the host merge
    # (the clamp only avoids evaluating log(0)).
    lse = m_i + tl.log2(tl.maximum(l_i, 1e-30)) * 0.6931471805599453
    tl.store(lse_ptr + pid_s * n_rows + rows, lse, mask=row_ok)
    owns = row_ok & (target >= col_lo) & (target < col_hi)
    tl.store(pos_ptr + rows, pos_i, mask=owns)


@triton.jit
def _infonce_bwd_kernel(
    x_ptr,
    y_ptr,
    rx_ptr,
    ry_ptr,
    lse_ptr,
    glse_ptr,
    gpos_ptr,
    e_ptr,
    escale_ptr,
    row0,
    n_rows,
    col0,
    n_cols,
    dim,
    stride_x,
    stride_y,
    stride_e,
    positive_offset,
    scale,
    excl_lo,
    excl_hi,
    excl_period,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    EXCLUDE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One tile of the chunk `E[rows row0:row0+n_rows, cols col0:col0+n_cols]`.

    `E_ij = d loss / d (x_i . y_j) = scale * rx_i * ry_j * (g_lse_i * softmax_ij + g_pos_i *
    [j == offset + i])`: the gradient with respect to the raw dot product, so that `E @ y` and
    `E.T @ x` are the gradients before the normalization's Jacobian.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = local_r < n_rows
    col_ok = local_c < n_cols
    rows = row0 + local_r
    cols = col0 + local_c
    acc = _similarity_tile(
        x_ptr, y_ptr, rows, row_ok, cols, col_ok, dim, stride_x, stride_y,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION,
    )  # fmt: skip
    if NORMALIZE:
        row_scale = tl.load(rx_ptr + rows, mask=row_ok, other=0.0) * scale
        col_scale = tl.load(ry_ptr + cols, mask=col_ok, other=0.0)
        s = acc * row_scale[:, None] * col_scale[None, :]
    else:
        row_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale
        col_scale = tl.zeros([BLOCK_N], dtype=tl.float32) + 1.0
        s = acc * row_scale[:, None]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lse = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
    g_pos = tl.load(gpos_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    if EXCLUDE:
        p = tl.where(_excluded(rows, cols, excl_lo, excl_hi, excl_period), 0.0, p)
    hit = cols[None, :] == (rows + positive_offset)[:, None]
    e = g_lse[:, None] * p + tl.where(hit, g_pos[:, None], 0.0)
    # Times a power of two chosen on the host so that max |E| is 2^14: fp16 E keeps its small
    # entries out of the subnormals (rx * ry * g is ~1e-7 for wide embeddings and big batches).
    e = e * row_scale[:, None] * col_scale[None, :] * tl.load(escale_ptr)
    e_ptrs = e_ptr + local_r.to(tl.int64)[:, None] * stride_e + local_c[None, :]
    tl.store(e_ptrs, e.to(e_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _inv_norm_kernel(v_ptr, out_ptr, n, dim, stride_v, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):  # fmt: skip
    """`out[i] = 1 / max(|v_i|, 1e-12)` in float32 (F.normalize's eps), no float32 copy of v."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            v_ptr + rows.to(tl.int64)[:, None] * stride_v + ds[None, :],
            mask=row_ok[:, None] & (ds < dim)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(acc), 1e-12), mask=row_ok)


@triton.jit
def _e_rows_gemm_kernel(
    e_ptr, y_ptr, acc_ptr, acc_row0, c0, n_rows, n_cols, dim, stride_e, stride_y, first,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`acc[acc_row0 + r] (+)= E[r, :n_cols] @ y[c0 : c0 + n_cols]`: float32 on chip over the
    chunk's columns; the partial is read (unless `first`) and written once, in the epilogue."""
    local_r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local_r < n_rows
    ds = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = ds < dim
    a_base = e_ptr + local_r.to(tl.int64)[:, None] * stride_e
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_cols
        a = tl.load(a_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(
            y_ptr + (c0 + ks).to(tl.int64)[:, None] * stride_y + ds[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    ptrs = acc_ptr + (acc_row0 + local_r).to(tl.int64)[:, None] * dim + ds[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    if first == 0:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _e_cols_gemm_kernel(
    e_ptr, x_ptr, acc_ptr, acc_row0, r0, n_rows, n_cols, dim, stride_e, stride_x, first,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`acc[acc_row0 + c] (+)= E[:n_rows, c].T @ x[r0 : r0 + n_rows]`, as `_e_rows_gemm_kernel`."""
    local_c = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = local_c < n_cols
    ds = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_ok = ds < dim
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_rows
        a = tl.load(
            e_ptr + ks.to(tl.int64)[:, None] * stride_e + local_c[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_M]
        b = tl.load(
            x_ptr + (r0 + ks).to(tl.int64)[:, None] * stride_x + ds[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    ptrs = acc_ptr + (acc_row0 + local_c).to(tl.int64)[:, None] * dim + ds[None, :]
    mask = col_ok[:, None] & d_ok[None, :]
    if first == 0:
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _norm_grad_kernel(
    acc_ptr, acc_row0, v_ptr, inv_ptr, out_ptr, row0, n, dim, stride_v, stride_out, escale_ptr,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """`out[row0 + r] = a - inv^2 (a . v) v` with `a = acc[acc_row0 + r] / escale` (the Jacobian
    of `v / |v|`, its `1 / |v|` factor already in `a`; rows with |v| < eps: no projection)."""
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = local < n
    rows = (row0 + local).to(tl.int64)
    a_base = acc_ptr + (acc_row0 + local).to(tl.int64)[:, None] * dim
    inv_scale = 1.0 / tl.load(escale_ptr)
    coef = tl.zeros([BLOCK_R], dtype=tl.float32)
    if NORMALIZE:
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (ds < dim)[None, :]
            a = tl.load(a_base + ds[None, :], mask=m, other=0.0)
            v = tl.load(v_ptr + rows[:, None] * stride_v + ds[None, :], mask=m, other=0.0)
            dot += tl.sum(a * v.to(tl.float32), axis=1)
        inv = tl.load(inv_ptr + rows, mask=ok, other=0.0)
        coef = tl.where(inv < 1.0 / 1e-12, inv * inv * dot, 0.0)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (ds < dim)[None, :]
        a = tl.load(a_base + ds[None, :], mask=m, other=0.0)
        if NORMALIZE:
            v = tl.load(v_ptr + rows[:, None] * stride_v + ds[None, :], mask=m, other=0.0)
            a = a - coef[:, None] * v.to(tl.float32)
        out = out_ptr + rows[:, None] * stride_out + ds[None, :]
        tl.store(out, (a * inv_scale).to(out_ptr.dtype.element_ty), mask=m)


# --- launch configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfoNCEConfig:
    """Tile sizes and launch parameters of one vendor/architecture family.

    `chunk_rows x chunk_cols` bounds the backward's `E` buffer (the only 2-D intermediate): it
    is the memory the loss needs beyond O((B + M) d), and large enough for efficient GEMMs.
    `programs_per_sm` sets how many column splits the forward uses for small batches.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    chunk_rows: int
    chunk_cols: int
    programs_per_sm: int = 4
    extra: tuple[tuple[str, int], ...] = ()  # vendor-only launch kwargs (AMD waves_per_eu)
    gemm: tuple[int, int, int] = (128, 128, 64)  # GEMM kernels: (rows, width, K) per tile


CONFIGS: dict[str, InfoNCEConfig] = {
    # H100/H200 (sm90+): 128x128 tiles, BLOCK_K 64, 3 stages = 96 KB of shared memory of 228 KB.
    "hopper": InfoNCEConfig(128, 128, 64, 8, 3, 2048, 2048),
    # A100 (sm80): 164 KB of shared memory per SM, so BLOCK_K 32 keeps 3 stages at 48 KB.
    "ampere": InfoNCEConfig(128, 128, 32, 8, 3, 2048, 2048),
    # Older NVIDIA parts (Turing, Volta): smaller tiles fit their 64-96 KB shared memory.
    "nvidia": InfoNCEConfig(64, 64, 32, 4, 2, 1024, 2048, gemm=(64, 64, 32)),
    # MI200/MI300 (wave64): no async-copy pipeline, so one stage; never 32 warps on wave64.
    "cdna": InfoNCEConfig(128, 128, 64, 8, 1, 2048, 2048, extra=(("waves_per_eu", 2),)),
    "amd": InfoNCEConfig(64, 64, 32, 4, 1, 1024, 2048, gemm=(64, 64, 32)),
    # Interpreter: smallest tiles tl.dot accepts, small chunks so tests cover the chunk loop and
    # the column splits with a few programs (each inner step costs ~5 ms there).
    "interpreter": InfoNCEConfig(16, 32, 32, 1, 1, 16, 32, programs_per_sm=1, gemm=(16, 64, 32)),
}

_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 256, 64, 8, 3),
    ]
]


def config_for(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> InfoNCEConfig:
    """The fixed launch config of the device's architecture family (and dtype).

    float32 IEEE dots run on the FP32 units: Triton keeps the operand slices in registers, and the
    forward's 128 x 128 x 64 tile spills on sm_90 (255 registers + 200 B); 64 rows and BLOCK_K 16
    fit (164 registers; BLOCK_K 32 still spills 12 B). The chunk sizes and GEMM tiles stay.
    """
    family = arch_family(device)
    cfg = CONFIGS[family]
    if dtype == torch.float32 and family in ("hopper", "ampere"):
        return dataclasses.replace(cfg, block_m=64, block_k=16, num_stages=2)
    return cfg


@functools.cache
def _autotuned(kernel_name: str) -> triton.runtime.Autotuner:
    """`BIDIRLM_AUTOTUNE=1`: the kernel wrapped in a full sweep, keyed on the width and dtype."""
    kernel = {"fwd": _infonce_fwd_kernel, "bwd": _infonce_bwd_kernel}[kernel_name]
    return triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["dim", "NORMALIZE", "DOT_PRECISION"])(
        kernel
    )


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str | None:
    """`input_precision` of the dots, valid on every target (chosen per target here).

    16-bit inputs: None, the backend default for 16-bit operands ("tf32" there fails to compile
    on gfx90a). float32: "ieee" when torch's float32 matmuls are full precision
    (`get_float32_matmul_precision() == "highest"`, its default) and on AMD other than gfx942
    (gfx90a allows ieee, bf16x3, bf16x6 only); else "tf32", as torch's own GEMMs then.
    """
    if dtype != torch.float32:
        return None
    if torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    key = config.arch_key(device)
    if key.startswith("amd") and key != "amd-gfx942":
        return "ieee"
    return "tf32"


def _num_splits(n_rows: int, n_cols: int, cfg: InfoNCEConfig, device: torch.device) -> int:
    """Column splits so that (row blocks x splits) covers `programs_per_sm` waves of the GPU."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # Interpreter: 4 "SMs" give the 17-query tests 2 splits and 9 queries x 150 documents
        # 4 splits of which the last is empty, so the tests exercise the merge and that case.
        sms = 4
    row_blocks = triton.cdiv(n_rows, cfg.block_m)
    wanted = triton.cdiv(cfg.programs_per_sm * sms, row_blocks)
    return max(1, min(wanted, triton.cdiv(n_cols, cfg.block_n)))


def _inverse_norms(v: torch.Tensor) -> torch.Tensor:
    """float32 `1 / max(|v_i|, 1e-12)` per row: one launch, no float32 copy of `v`."""
    out = torch.empty(v.shape[0], dtype=torch.float32, device=v.device)
    block_r, block_d = 16, min(256, triton.next_power_of_2(max(v.shape[1], 16)))
    _inv_norm_kernel[(triton.cdiv(v.shape[0], block_r),)](
        v, out, v.shape[0], v.shape[1], v.stride(0), BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    return out


# The float32 partial gradient sums of the backward stay below this (with the E chunk): a
# partial of all R rows when it fits, else one of a row / column chunk (two passes, see
# `_launch_backward`).
_SCRATCH_BYTES = 32 * 2**20


def working_memory(rows: int, cols: int, d: int, elem: int, *, family: str = "hopper") -> int:
    """Bytes one direction allocates beyond inputs, outputs and gradients in its backward (the
    larger pass), as `_launch_backward` sizes them: inverse norms, float32 lse/gradients of the
    rows, the E chunk, the float32 partial(s)."""
    cfg = CONFIGS[family]
    chunk_r, chunk_c = min(cfg.chunk_rows, rows), min(cfg.chunk_cols, cols)
    e_bytes = chunk_r * chunk_c * elem
    small = (rows + cols) * 4 + rows * 4 * 3 + 16
    if rows * d * 4 + chunk_c * d * 4 + e_bytes <= _SCRATCH_BYTES:
        return small + e_bytes + (rows + chunk_c) * d * 4
    return small + e_bytes + max(chunk_r, chunk_c) * d * 4


# --- host launchers ------------------------------------------------------------------------------


def _flags(x: torch.Tensor) -> dict[str, object]:
    return {"UPCAST": interpreting(), "DOT_PRECISION": _dot_precision(x.dtype, x.device)}


def _no_exclusion() -> tuple[int, int, int]:
    return (0, 0, 1)


def _launch_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    positive_offset: int,
    scale: float,
    normalize: bool,
    exclude: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lse [R], pos [R])` float32 of one direction; see the module docstring. `exclude =
    (lo, hi, period)` drops columns `lo <= j < hi` with `(j - lo) % period == i` from row i."""
    x, y = x.contiguous(), y.contiguous()
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    cfg = config_for(x.device, x.dtype)
    rx = _inverse_norms(x) if normalize else x.new_empty(0, dtype=torch.float32)
    ry = _inverse_norms(y) if normalize else x.new_empty(0, dtype=torch.float32)
    splits = _num_splits(n_rows, n_cols, cfg, x.device)
    lse_parts = torch.empty(splits, n_rows, dtype=torch.float32, device=x.device)
    pos = torch.zeros(n_rows, dtype=torch.float32, device=x.device)  # 0 without a positive
    args = (x, y, rx, ry, lse_parts, pos, n_rows, n_cols, dim, x.stride(0), y.stride(0))
    args += (positive_offset, scale, *(exclude or _no_exclusion()))
    flags = {**_flags(x), "NORMALIZE": normalize, "EXCLUDE": exclude is not None}
    if autotune_enabled():
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), splits)
        _autotuned("fwd")[grid](*args, **flags)
    else:
        grid = (triton.cdiv(n_rows, cfg.block_m), splits)
        _infonce_fwd_kernel[grid](
            *args,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **flags,
            **dict(cfg.extra),
        )
    lse = lse_parts[0] if splits == 1 else torch.logsumexp(lse_parts, dim=0)
    return lse, pos


def _launch_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_pos: torch.Tensor,
    positive_offset: int,
    scale: float,
    normalize: bool,
    exclude: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients `(dx [R, d], dy [N, d])` in the inputs' dtypes, accumulated in float32.

    Chunks of `chunk_rows x chunk_cols` logits: `_infonce_bwd_kernel` writes the chunk's `E`,
    `_e_rows_gemm_kernel` adds `E @ y[chunk]` to dx's float32 partial and `_e_cols_gemm_kernel`
    `E.T @ x[chunk]` to dy's. When dx's partial of all R rows fits `_SCRATCH_BYTES`, one pass
    (columns outer) feeds both GEMMs from each `E` (6 R N d FLOPs with the forward's 2, as eager);
    otherwise a dy pass (columns outer) and a dx pass (rows outer) each recompute `E`, so the
    partials stay one chunk wide (10 R N d FLOPs, working memory `E` + one `[chunk, d]` float32
    partial). `_norm_grad_kernel` applies the normalization's Jacobian, the E scale and the cast.
    All per-chunk work is Triton launches: the aten op count does not depend on R or N.
    """
    x, y = x.contiguous(), y.contiguous()
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    dev = x.device
    cfg = config_for(dev, x.dtype)
    empty = x.new_empty(0, dtype=torch.float32)
    rx = _inverse_norms(x) if normalize else empty
    ry = _inverse_norms(y) if normalize else empty
    lse = lse.float().contiguous()
    grad_lse = grad_lse.float().contiguous()
    grad_pos = grad_pos.float().contiguous()
    # |E| <= scale * max rx * max ry * max(|g_lse| + |g_pos|) since softmax <= 1; E is stored
    # times 2^14 / that bound (a power of two, so exact) and the accumulators divided back. Kept
    # on the device: no host sync.
    bound = (grad_lse.abs() + grad_pos.abs()).max() * scale
    if normalize:
        bound = bound * rx.max() * ry.max()
    e_scale = torch.exp2(14.0 - torch.ceil(torch.log2(bound.clamp_min(1e-30)))).reshape(1)
    # The interpreter keeps E in fp32: its bf16 stores are not round-to-nearest.
    e_dtype = torch.float32 if interpreting() else x.dtype
    chunk_r, chunk_c = min(cfg.chunk_rows, n_rows), min(cfg.chunk_cols, n_cols)
    e_buf = torch.empty(chunk_r, chunk_c, dtype=e_dtype, device=dev)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    flags = _flags(x)
    e_flags = {**flags, "NORMALIZE": normalize, "EXCLUDE": exclude is not None}
    excl = exclude or _no_exclusion()
    gm, gn, gk = cfg.gemm
    gemm_kw = {**flags, "BLOCK_M": gm, "BLOCK_N": gn, "BLOCK_K": gk, "num_warps": cfg.num_warps,
               "num_stages": cfg.num_stages, **dict(cfg.extra)}  # fmt: skip

    def make_e(r0: int, nr: int, c0: int, nc: int) -> None:
        args = (x, y, rx, ry, lse, grad_lse, grad_pos, e_buf, e_scale, r0, nr, c0, nc, dim,
                x.stride(0), y.stride(0), e_buf.stride(0), positive_offset, scale,
                *excl)  # fmt: skip
        if autotune_enabled():
            grid = lambda meta: (triton.cdiv(nr, meta["BLOCK_M"]), triton.cdiv(nc, meta["BLOCK_N"]))
            _autotuned("bwd")[grid](*args, **e_flags)
            return
        _infonce_bwd_kernel[(triton.cdiv(nr, cfg.block_m), triton.cdiv(nc, cfg.block_n))](
            *args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **e_flags, **dict(cfg.extra),
        )  # fmt: skip

    def rows_gemm(acc: torch.Tensor, acc_row0: int, nr: int, c0: int, nc: int, first: bool):
        _e_rows_gemm_kernel[(triton.cdiv(nr, gm), triton.cdiv(dim, gn))](
            e_buf, y, acc, acc_row0, c0, nr, nc, dim, e_buf.stride(0), y.stride(0), int(first),
            **gemm_kw,
        )  # fmt: skip

    def cols_gemm(acc: torch.Tensor, acc_row0: int, r0: int, nr: int, nc: int, first: bool):
        _e_cols_gemm_kernel[(triton.cdiv(nc, gm), triton.cdiv(dim, gn))](
            e_buf, x, acc, acc_row0, r0, nr, nc, dim, e_buf.stride(0), x.stride(0), int(first),
            **gemm_kw,
        )  # fmt: skip

    def finish(acc, acc_row0, v, inv, out, row0, n) -> None:  # noqa: ANN001
        block_r, block_d = 16, min(256, triton.next_power_of_2(max(dim, 16)))
        _norm_grad_kernel[(triton.cdiv(n, block_r),)](
            acc, acc_row0, v, inv, out, row0, n, dim, v.stride(0), out.stride(0), e_scale,
            NORMALIZE=normalize, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip

    row_chunks = [(r0, min(chunk_r, n_rows - r0)) for r0 in range(0, n_rows, chunk_r)]
    col_chunks = [(c0, min(chunk_c, n_cols - c0)) for c0 in range(0, n_cols, chunk_c)]
    e_bytes = e_buf.numel() * e_buf.element_size()
    if n_rows * dim * 4 + chunk_c * dim * 4 + e_bytes <= _SCRATCH_BYTES:
        acc_x = torch.empty(n_rows, dim, dtype=torch.float32, device=dev)
        acc_y = torch.empty(chunk_c, dim, dtype=torch.float32, device=dev)
        for c0, nc in col_chunks:
            for r0, nr in row_chunks:
                make_e(r0, nr, c0, nc)
                rows_gemm(acc_x, r0, nr, c0, nc, first=c0 == 0)
                cols_gemm(acc_y, 0, r0, nr, nc, first=r0 == 0)
            finish(acc_y, 0, y, ry, dy, c0, nc)
        finish(acc_x, 0, x, rx, dx, 0, n_rows)
        return dx, dy
    acc = torch.empty(max(chunk_r, chunk_c), dim, dtype=torch.float32, device=dev)
    for c0, nc in col_chunks:  # dy pass: dy's partial covers one column chunk
        for r0, nr in row_chunks:
            make_e(r0, nr, c0, nc)
            cols_gemm(acc, 0, r0, nr, nc, first=r0 == 0)
        finish(acc, 0, y, ry, dy, c0, nc)
    for r0, nr in row_chunks:  # dx pass: dx's partial covers one row chunk
        for c0, nc in col_chunks:
            make_e(r0, nr, c0, nc)
            rows_gemm(acc, 0, nr, c0, nc, first=c0 == 0)
        finish(acc, 0, x, rx, dx, r0, nr)
    return dx, dy
