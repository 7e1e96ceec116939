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
def _infonce_grad_kernel(
    own_ptr, oth_ptr, r_own_ptr, r_oth_ptr, lse_ptr, glse_ptr, gpos_ptr, escale_ptr, e_ptr,
    acc_ptr, out_ptr, n_own, n_oth, dim, stride_own, stride_oth, stride_out, positive_offset,
    scale, excl_lo, excl_hi, excl_period, chunk,
    OWN_COLS: tl.constexpr, NORMALIZE: tl.constexpr, EXCLUDE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Persistent: each program owns blocks of `BLOCK_O` rows of one gradient (`OWN_COLS`
    False: the rows' `dx = E @ y`; True: the columns' `dy = E.T @ x`) and loops over the other
    side in chunks of `chunk`, all on the device (the launches do not depend on R or N):

    1. the chunk's `E` entries of its rows, `E_ij = scale rx_i ry_j (g_lse_i softmax_ij +
       g_pos_i [j == offset + i])` (times the host's power-of-two `escale`), recomputed from the
       similarity tiles into the program's own `[BLOCK_O, chunk]` slice of `e_ptr`;
    2. after a CTA barrier (the slice was written by the other warps of this program), the GEMM
       `E_slice @ other[chunk]` per `BLOCK_D` columns of the width, added to the program's own
       float32 `[BLOCK_O, dim]` partial in `acc_ptr` (read and written once per chunk, in the
       GEMM's epilogue, never inside its K loop);
    3. after the last chunk, the normalization's Jacobian `a - r^2 (a . v) v` (its `1 / |v|`
       factor already in `a`), `1 / escale` and the cast into `out[own]`.

    Every output row has one owner: deterministic, no atomics. Working memory is per program,
    so it does not grow with the batch either.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    e_base = e_ptr + pid.to(tl.int64) * BLOCK_O * chunk
    a_base = acc_ptr + pid.to(tl.int64) * BLOCK_O * dim
    inv_escale = 1.0 / tl.load(escale_ptr)
    e_scale = tl.load(escale_ptr)
    o_loc = tl.arange(0, BLOCK_O)
    for ob in range(pid, tl.cdiv(n_own, BLOCK_O), n_prog):
        own = ob * BLOCK_O + o_loc
        own_ok = own < n_own
        if NORMALIZE:
            r_o = tl.load(r_own_ptr + own, mask=own_ok, other=0.0)
        else:
            r_o = tl.zeros([BLOCK_O], dtype=tl.float32) + 1.0
        if not OWN_COLS:
            lse_o = tl.load(lse_ptr + own, mask=own_ok, other=0.0)
            gl_o = tl.load(glse_ptr + own, mask=own_ok, other=0.0)
            gp_o = tl.load(gpos_ptr + own, mask=own_ok, other=0.0)
        for c0 in range(0, n_oth, chunk):
            for t0 in range(0, chunk, BLOCK_T):
                t_loc = t0 + tl.arange(0, BLOCK_T)
                oth = c0 + t_loc
                oth_ok = oth < n_oth
                # The similarities are recomputed exactly as the forward computed them (same
                # operand order, K step and scaling order), so they match its lse bit for bit:
                # a row whose softmax is ~one-hot then gets `p - 1` without the rounding error
                # of |s| (the E of sentence-transformers' autograd comes from one logit matrix).
                if NORMALIZE:
                    r_t = tl.load(r_oth_ptr + oth, mask=oth_ok, other=0.0)
                else:
                    r_t = tl.zeros([BLOCK_T], dtype=tl.float32) + 1.0
                if OWN_COLS:  # the forward's tile is [row i (other), column j (own)]
                    acc = _similarity_tile(
                        oth_ptr, own_ptr, oth, oth_ok, own, own_ok, dim, stride_oth, stride_own,
                        BLOCK_T, BLOCK_O, BLOCK_K, UPCAST, DOT_PRECISION,
                    )  # fmt: skip
                    if NORMALIZE:
                        acc = acc * (r_t * scale)[:, None] * r_o[None, :]
                    else:
                        acc = acc * scale
                    s = tl.trans(acc)
                else:
                    acc = _similarity_tile(
                        own_ptr, oth_ptr, own, own_ok, oth, oth_ok, dim, stride_own, stride_oth,
                        BLOCK_O, BLOCK_T, BLOCK_K, UPCAST, DOT_PRECISION,
                    )  # fmt: skip
                    if NORMALIZE:
                        s = acc * (r_o * scale)[:, None] * r_t[None, :]
                    else:
                        s = acc * scale
                norms = r_o[:, None] * r_t[None, :]
                if OWN_COLS:  # the tile is [own column j, other row i]: row values from `oth`
                    lse_t = tl.load(lse_ptr + oth, mask=oth_ok, other=0.0)
                    gl_t = tl.load(glse_ptr + oth, mask=oth_ok, other=0.0)
                    gp_t = tl.load(gpos_ptr + oth, mask=oth_ok, other=0.0)
                    p = tl.exp2((s - lse_t[None, :]) * 1.4426950408889634)
                    if EXCLUDE:
                        rel = own[:, None] - excl_lo
                        ex = (rel >= 0) & (own[:, None] < excl_hi)
                        p = tl.where(ex & ((rel % excl_period) == oth[None, :]), 0.0, p)
                    hit = own[:, None] == (oth + positive_offset)[None, :]
                    e = gl_t[None, :] * p + tl.where(hit, gp_t[None, :], 0.0)
                else:
                    p = tl.exp2((s - lse_o[:, None]) * 1.4426950408889634)
                    if EXCLUDE:
                        p = tl.where(_excluded(own, oth, excl_lo, excl_hi, excl_period), 0.0, p)
                    hit = oth[None, :] == (own + positive_offset)[:, None]
                    e = gl_o[:, None] * p + tl.where(hit, gp_o[:, None], 0.0)
                e = e * (norms * (scale * e_scale))
                e = tl.where(own_ok[:, None] & oth_ok[None, :], e, 0.0)
                ptrs = e_base + o_loc[:, None] * chunk + t_loc[None, :]
                tl.store(ptrs, e.to(e_ptr.dtype.element_ty))
            tl.debug_barrier()  # the slice is complete before any warp reads it
            for d0 in range(0, dim, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < dim
                acc2 = tl.zeros([BLOCK_O, BLOCK_D], dtype=tl.float32)
                for k0 in range(0, chunk, BLOCK_C):
                    ks = k0 + tl.arange(0, BLOCK_C)
                    a = tl.load(e_base + o_loc[:, None] * chunk + ks[None, :])
                    k_ok = c0 + ks < n_oth
                    b = tl.load(
                        oth_ptr + (c0 + ks).to(tl.int64)[:, None] * stride_oth + ds[None, :],
                        mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    if UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc2 = tl.dot(a, b, acc2, input_precision=DOT_PRECISION)
                part = a_base + o_loc[:, None] * dim + ds[None, :]
                if c0 > 0:
                    acc2 += tl.load(part, mask=d_ok[None, :], other=0.0)
                tl.store(part, acc2, mask=d_ok[None, :])
            tl.debug_barrier()  # the slice is read by every warp before the next chunk's E
        rows = own.to(tl.int64)
        coef = tl.zeros([BLOCK_O], dtype=tl.float32)
        if NORMALIZE:
            dot = tl.zeros([BLOCK_O], dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                m = own_ok[:, None] & (ds < dim)[None, :]
                a = tl.load(a_base + o_loc[:, None] * dim + ds[None, :], mask=m, other=0.0)
                v = tl.load(own_ptr + rows[:, None] * stride_own + ds[None, :], mask=m, other=0.0)
                dot += tl.sum(a * v.to(tl.float32), axis=1)
            coef = tl.where(r_o < 1.0 / 1e-12, r_o * r_o * dot, 0.0)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = own_ok[:, None] & (ds < dim)[None, :]
            a = tl.load(a_base + o_loc[:, None] * dim + ds[None, :], mask=m, other=0.0)
            if NORMALIZE:
                v = tl.load(own_ptr + rows[:, None] * stride_own + ds[None, :], mask=m, other=0.0)
                a = a - coef[:, None] * v.to(tl.float32)
            out = out_ptr + rows[:, None] * stride_out + ds[None, :]
            tl.store(out, (a * inv_escale).to(out_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()  # the partial is read before the next block's first chunk writes it


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


# --- launch configs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradConfig:
    """The persistent backward's tiles: `block_o` owned rows per program, `block_t`-wide
    similarity tiles (their K step is the forward's `block_k`), GEMM steps of `block_c` x
    `block_d` width, `chunk` entries of the other side per E slice; `programs_per_sm` resident
    programs. Working memory = programs x block_o x (chunk x elem + d x 4 float32 partial)."""

    block_o: int
    block_t: int
    block_c: int
    block_d: int
    chunk: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 1


@dataclass(frozen=True)
class InfoNCEConfig:
    """Tile sizes and launch parameters of one vendor/architecture family.

    `programs_per_sm` sets how many column splits the forward uses for small batches; `grad`
    is the persistent backward's configuration.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    grad: GradConfig
    programs_per_sm: int = 4
    extra: tuple[tuple[str, int], ...] = ()  # vendor-only launch kwargs (AMD waves_per_eu)


G = GradConfig
CONFIGS: dict[str, InfoNCEConfig] = {
    # H100/H200 (sm90+): 128x128 tiles, BLOCK_K 64, 3 stages = 96 KB of shared memory of 228 KB.
    # The backward: one program per SM owning 64 rows, 8 warps, 64-wide GEMM tiles (4 warps
    # spill 400-500 B on sm_90; 8 warps with 128-wide GEMM tiles still 12 B on triton 3.6: the
    # E tile, its exponentials and the GEMM accumulator are live together); its float32
    # [64, d] partial per SM is the memory that bounds the resident programs (69 MB, d = 2048).
    "hopper": InfoNCEConfig(128, 128, 64, 8, 3, G(64, 128, 64, 64, 512, 8, 3)),
    # A100 (sm80): 164 KB of shared memory per SM, so BLOCK_K 32 keeps 3 stages at 48 KB.
    "ampere": InfoNCEConfig(128, 128, 32, 8, 3, G(64, 128, 32, 128, 512, 8, 3)),
    # Older NVIDIA parts (Turing, Volta): smaller tiles fit their 64-96 KB shared memory.
    "nvidia": InfoNCEConfig(64, 64, 32, 4, 2, G(64, 64, 32, 64, 512, 4, 2)),
    # MI200/MI300 (wave64): no async-copy pipeline, so one stage; never 32 warps on wave64.
    "cdna": InfoNCEConfig(
        128, 128, 64, 8, 1, G(64, 128, 64, 128, 512, 8, 1), extra=(("waves_per_eu", 2),)
    ),  # fmt: skip
    "amd": InfoNCEConfig(64, 64, 32, 4, 1, G(64, 64, 32, 64, 512, 4, 1)),
    # Interpreter: smallest tiles tl.dot accepts, small slices so tests cover the chunk loop,
    # several owned blocks per program and the column splits (each step costs ~5 ms there).
    # The forward's and the backward's similarity tiles have one shape (16 x 16): numpy's
    # matmul, the interpreter's tl.dot, may round differently for other shapes.
    "interpreter": InfoNCEConfig(
        16, 16, 32, 1, 1, G(16, 16, 16, 32, 32, 1, 1), programs_per_sm=1
    ),  # fmt: skip
}
del G

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
    fit (164 registers; BLOCK_K 32 still spills 12 B); the backward takes 64-wide tiles too.
    """
    family = arch_family(device)
    cfg = CONFIGS[family]
    if dtype == torch.float32 and family in ("hopper", "ampere"):
        grad = GradConfig(64, 64, 16, 64, 256, 8, 2)  # FMA dots: small operand slices
        return dataclasses.replace(cfg, block_m=64, block_k=16, num_stages=2, grad=grad)
    if dtype == torch.float32 and family == "cdna":
        return dataclasses.replace(cfg, grad=GradConfig(64, 64, 16, 64, 256, 8, 1))
    return cfg


@functools.cache
def _autotuned(kernel_name: str) -> triton.runtime.Autotuner:
    """`BIDIRLM_AUTOTUNE=1`: the forward wrapped in a full sweep, keyed on the width and dtype
    (the persistent backward keeps its fixed config: its memory is sized by it)."""
    kernel = {"fwd": _infonce_fwd_kernel}[kernel_name]
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


def _grad_programs(n_own: int, cfg: InfoNCEConfig, sms: int) -> int:
    return max(1, min(sms * cfg.grad.programs_per_sm, triton.cdiv(n_own, cfg.grad.block_o)))


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few "SMs" so each program owns several blocks in the tests


def working_memory(
    rows: int, cols: int, d: int, elem: int, *, family: str = "hopper", sms: int = 132
) -> int:
    """Bytes one direction allocates beyond inputs, outputs and gradients in its backward, as
    `_launch_backward` sizes them: inverse norms, float32 lse/gradients of the rows, and per
    resident program its E slice and float32 partial (independent of the batch)."""
    g = CONFIGS[family].grad
    programs = _grad_programs(max(rows, cols), CONFIGS[family], sms)
    small = (rows + cols) * 4 + rows * 4 * 3 + 16
    return small + programs * g.block_o * (g.chunk * elem + d * 4)


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

    Two launches of the persistent `_infonce_grad_kernel` (plus the two inverse norms): one whose
    programs own blocks of rows (`dx = E @ y`), one whose programs own blocks of columns
    (`dy = E.T @ x`); each recomputes its E slices, so the backward executes 8 R N d FLOPs (10
    with the forward), and its launches and working memory do not depend on R or N.
    """
    x, y = x.contiguous(), y.contiguous()
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    dev = x.device
    cfg = config_for(dev, x.dtype)
    g = cfg.grad
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
    sms = _sms(dev)
    programs = max(_grad_programs(n_rows, cfg, sms), _grad_programs(n_cols, cfg, sms))
    e_buf = torch.empty(programs * g.block_o * g.chunk, dtype=e_dtype, device=dev)
    acc = torch.empty(programs * g.block_o * dim, dtype=torch.float32, device=dev)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    flags = {**_flags(x), "NORMALIZE": normalize, "EXCLUDE": exclude is not None}
    excl = exclude or _no_exclusion()
    tiles = {"BLOCK_O": g.block_o, "BLOCK_T": g.block_t, "BLOCK_K": cfg.block_k,
             "BLOCK_C": g.block_c, "BLOCK_D": g.block_d, "num_warps": g.num_warps,
             "num_stages": g.num_stages, **dict(cfg.extra)}  # fmt: skip
    for own, oth, r_own, r_oth, out, cols in ((x, y, rx, ry, dx, False), (y, x, ry, rx, dy, True)):
        n_own = own.shape[0]
        _infonce_grad_kernel[(_grad_programs(n_own, cfg, sms),)](
            own, oth, r_own, r_oth, lse, grad_lse, grad_pos, e_scale, e_buf, acc, out, n_own,
            oth.shape[0], dim, own.stride(0), oth.stride(0), out.stride(0), positive_offset,
            scale, *excl, g.chunk, OWN_COLS=cols, **flags, **tiles,
        )  # fmt: skip
    return dx, dy
