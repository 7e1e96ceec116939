"""Fused in-batch InfoNCE loss: tiled similarity with a streaming log-sum-exp, never `[B, M]`.

`infonce_loss(queries [B, d], documents [M, d])` computes, for the default settings,

    logits = F.normalize(queries) @ F.normalize(documents).T / temperature      # [B, M]
    loss = F.cross_entropy(logits.float(), torch.arange(B))

which is sentence-transformers' `MultipleNegativesRankingLoss(scale=1 / temperature)`, without
allocating the `[B, M]` logits or their gradient. Layers (one file, four of them):

1. `@triton.jit` kernels. `_infonce_fwd_kernel` tiles rows x columns, runs the K loop over `d`
   in fp32 accumulators, and keeps an online (max, sum-exp) per row; programs are also split over
   the column range (flash-decoding style) so that a small batch still fills the GPU, and the
   per-split log-sum-exps `[splits, R]` are merged on the host. `_infonce_bwd_kernel` recomputes a
   chunk of the similarity tiles and writes `E = d loss / d (row . col)` for that chunk only.
2. Host launchers: argument checks, per-vendor launch configs, and the backward chunk loop in
   which cuBLAS/hipBLAS GEMMs turn each `E` chunk into gradients accumulated in float32.
3. `torch.library` custom ops `bidirlm::infonce_lse` / `bidirlm::infonce_lse_backward` with
   `register_fake` and `register_autograd` (so `torch.compile(fullgraph=True)` traces through).
4. The functional `infonce_loss`, the `InfoNCELoss` module and the cross-device gather.

The op computed by the kernels is one *direction*: for `rows [R, d]`, `cols [N, d]`,
`lse_i = logsumexp_j(scale * sim(rows_i, cols_j))` and `pos_i = scale * sim(rows_i,
cols_{offset + i})`. The loss is `lse - pos`; the symmetric loss adds the direction
`(documents[:B], queries)`. Cosine similarity is computed as `(x . y) * rx * ry` with
`rx = 1 / max(|x|, 1e-12)` in float32, which is `F.normalize`'s definition without rounding the
normalized embeddings to bf16 first; the backward applies the normalization's Jacobian
`g - rx^2 (g . x) x` once per row, O((B + M) d).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import arch_family, autotune_enabled
from .dispatch import interpreting, use_triton
from .infonce_dist import gather_with_grad, world_size
from .reference import infonce_direction_reference

__all__ = ["InfoNCELoss", "infonce_loss"]

REDUCTIONS = ("mean", "sum", "none")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# F.normalize's eps: a row whose norm is below it is divided by eps instead (no NaN for zeros).
_NORM_EPS = 1e-12


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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
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

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m)
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
        # exp2 is the native instruction; exp would multiply by log2(e) anyway.
        s2 = tl.where(col_ok[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m_i = m_new
    # An empty split keeps m = -inf, l = 0, so its lse is -inf and drops out of the merge.
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
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
    hit = cols[None, :] == (rows + positive_offset)[:, None]
    e = g_lse[:, None] * p + tl.where(hit, g_pos[:, None], 0.0)
    e = e * row_scale[:, None] * col_scale[None, :]
    e_ptrs = e_ptr + local_r.to(tl.int64)[:, None] * stride_e + local_c[None, :]
    tl.store(e_ptrs, e.to(e_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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


CONFIGS: dict[str, InfoNCEConfig] = {
    # H100/H200 (sm90+): 128x128 tiles, BLOCK_K 64, 3 stages = 96 KB of shared memory of 228 KB.
    "hopper": InfoNCEConfig(128, 128, 64, 8, 3, 2048, 2048),
    # A100 (sm80): 164 KB of shared memory per SM, so BLOCK_K 32 keeps 3 stages at 48 KB.
    "ampere": InfoNCEConfig(128, 128, 32, 8, 3, 2048, 2048),
    # Older NVIDIA parts (Turing, Volta): smaller tiles fit their 64-96 KB shared memory.
    "nvidia": InfoNCEConfig(64, 64, 32, 4, 2, 1024, 2048),
    # MI200/MI300 (wave64): no async-copy pipeline, so one stage; never 32 warps on wave64.
    "cdna": InfoNCEConfig(128, 128, 64, 8, 1, 2048, 2048, extra=(("waves_per_eu", 2),)),
    "amd": InfoNCEConfig(64, 64, 32, 4, 1, 1024, 2048),
    # Interpreter: smallest tiles tl.dot accepts, small chunks so tests cover the chunk loop and
    # the column splits with a few programs (each inner step costs ~5 ms there).
    "interpreter": InfoNCEConfig(16, 32, 32, 1, 1, 16, 32, programs_per_sm=1),
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


def config_for(device: torch.device) -> InfoNCEConfig:
    """The fixed launch config of the device's architecture family."""
    return CONFIGS[arch_family(device)]


@functools.cache
def _autotuned(kernel_name: str) -> triton.runtime.Autotuner:
    """`BIDIRLM_AUTOTUNE=1`: the kernel wrapped in a full sweep, keyed on the width and dtype."""
    kernel = {"fwd": _infonce_fwd_kernel, "bwd": _infonce_bwd_kernel}[kernel_name]
    return triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["dim", "NORMALIZE", "DOT_PRECISION"])(
        kernel
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # tl.dot on fp32 defaults to tf32 (10-bit mantissa); torch's fp32 matmul is full precision
    # unless the user opted in with set_float32_matmul_precision("high"/"medium").
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
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
    """float32 `1 / max(|v_i|, 1e-12)` per row, in row chunks so no fp32 copy of `v` exists."""
    out = torch.empty(v.shape[0], dtype=torch.float32, device=v.device)
    step = max(1, (1 << 24) // max(1, v.shape[1]))
    for i in range(0, v.shape[0], step):
        out[i : i + step] = v[i : i + step].float().norm(dim=1).clamp_min(_NORM_EPS).reciprocal()
    return out


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with a float32 result: bf16/fp16 GEMM with fp32 output on a GPU (no fp32 copies
    of the operands); upcast operands elsewhere (the interpreter path already stores fp32 E)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _mm_out_dtype_ok[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch/backend without mm(..., out_dtype=)
            _mm_out_dtype_ok[0] = False
    return a.float() @ b.float()


_mm_out_dtype_ok = [True]


def _apply_norm_jacobian(
    acc: torch.Tensor, v: torch.Tensor, inv: torch.Tensor | None, out: torch.Tensor
) -> None:
    """`out = acc - inv^2 (acc . v) v` row-wise (the Jacobian of `v / |v|`, the `|v|` factor
    already in `acc`), cast to `out.dtype`; rows with `|v| < eps` are divided by eps, no projection.
    """
    step = max(1, (1 << 24) // max(1, v.shape[1]))
    for i in range(0, v.shape[0], step):
        a = acc[i : i + step]
        if inv is None:
            out[i : i + step] = a
            continue
        vv = v[i : i + step].float()
        r = inv[i : i + step]
        coef = torch.where(r < 1.0 / _NORM_EPS, r * r * (a * vv).sum(dim=1), 0.0)
        out[i : i + step] = a - coef[:, None] * vv


# --- host launchers ------------------------------------------------------------------------------


def _flags(x: torch.Tensor) -> dict[str, object]:
    return {"UPCAST": interpreting(), "DOT_PRECISION": _dot_precision(x.dtype)}


def _launch_forward(
    x: torch.Tensor, y: torch.Tensor, positive_offset: int, scale: float, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lse [R], pos [R])` float32 of one direction; see the module docstring."""
    x, y = x.contiguous(), y.contiguous()
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    cfg = config_for(x.device)
    rx = _inverse_norms(x) if normalize else x.new_empty(0, dtype=torch.float32)
    ry = _inverse_norms(y) if normalize else x.new_empty(0, dtype=torch.float32)
    splits = _num_splits(n_rows, n_cols, cfg, x.device)
    lse_parts = torch.empty(splits, n_rows, dtype=torch.float32, device=x.device)
    pos = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    args = (x, y, rx, ry, lse_parts, pos, n_rows, n_cols, dim, x.stride(0), y.stride(0))
    args += (positive_offset, scale)
    if autotune_enabled():
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), splits)
        _autotuned("fwd")[grid](*args, NORMALIZE=normalize, **_flags(x))
    else:
        grid = (triton.cdiv(n_rows, cfg.block_m), splits)
        _infonce_fwd_kernel[grid](
            *args,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            NORMALIZE=normalize,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **_flags(x),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients `(dx [R, d], dy [N, d])` in the inputs' dtypes, accumulated in float32.

    Loops over `chunk_rows x chunk_cols` chunks of the logit matrix (columns outer): the kernel
    writes the chunk's `E`, then `dx[r] += E @ y[c]` and `dy[c] += E.T @ x[r]` as GEMMs. `dy[c]`
    is finished after its column chunk; `dx` keeps one float32 `[R, d]` accumulator (R <= N).
    """
    x, y = x.contiguous(), y.contiguous()
    n_rows, dim = x.shape
    n_cols = y.shape[0]
    cfg = config_for(x.device)
    rx = _inverse_norms(x) if normalize else None
    ry = _inverse_norms(y) if normalize else None
    empty = x.new_empty(0, dtype=torch.float32)
    grad_lse = grad_lse.float().contiguous()
    grad_pos = grad_pos.float().contiguous()
    # The interpreter keeps E in fp32: its bf16 stores are not round-to-nearest.
    e_dtype = torch.float32 if interpreting() else x.dtype
    chunk_r, chunk_c = min(cfg.chunk_rows, n_rows), min(cfg.chunk_cols, n_cols)
    e_buf = torch.empty(chunk_r, chunk_c, dtype=e_dtype, device=x.device)
    acc_x = torch.zeros(n_rows, dim, dtype=torch.float32, device=x.device)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    for c0 in range(0, n_cols, chunk_c):
        nc = min(chunk_c, n_cols - c0)
        y_c = y[c0 : c0 + nc]
        acc_y = torch.zeros(nc, dim, dtype=torch.float32, device=x.device)
        for r0 in range(0, n_rows, chunk_r):
            nr = min(chunk_r, n_rows - r0)
            e = e_buf[:nr, :nc]
            args = (x, y, rx if normalize else empty, ry if normalize else empty, lse)
            args += (grad_lse, grad_pos, e, r0, nr, c0, nc, dim, x.stride(0), y.stride(0))
            args += (e_buf.stride(0), positive_offset, scale)
            if autotune_enabled():
                grid = lambda meta, nr=nr, nc=nc: (
                    triton.cdiv(nr, meta["BLOCK_M"]),
                    triton.cdiv(nc, meta["BLOCK_N"]),
                )
                _autotuned("bwd")[grid](*args, NORMALIZE=normalize, **_flags(x))
            else:
                grid = (triton.cdiv(nr, cfg.block_m), triton.cdiv(nc, cfg.block_n))
                _infonce_bwd_kernel[grid](
                    *args,
                    BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k,
                    NORMALIZE=normalize,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    **_flags(x),
                    **dict(cfg.extra),
                )
            acc_x[r0 : r0 + nr] += _mm_f32(e, y_c)
            acc_y += _mm_f32(e.T, x[r0 : r0 + nr])
        _apply_norm_jacobian(acc_y, y_c, None if ry is None else ry[c0 : c0 + nc], dy[c0 : c0 + nc])
    _apply_norm_jacobian(acc_x, x, rx, dx)
    return dx, dy


# --- torch.library registration ------------------------------------------------------------------


@torch.library.custom_op("bidirlm::infonce_lse", mutates_args=())
def _infonce_lse_op(
    rows: torch.Tensor, cols: torch.Tensor, positive_offset: int, scale: float, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward of one direction: `(lse [R], pos [R])` float32."""
    return _launch_forward(rows, cols, positive_offset, scale, normalize)


@_infonce_lse_op.register_fake
def _(rows, cols, positive_offset, scale, normalize):
    shape = (rows.shape[0],)
    return rows.new_empty(shape, dtype=torch.float32), rows.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("bidirlm::infonce_lse_backward", mutates_args=())
def _infonce_lse_backward_op(
    rows: torch.Tensor,
    cols: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_pos: torch.Tensor,
    positive_offset: int,
    scale: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward of one direction: `(d rows, d cols)` in the inputs' dtypes."""
    return _launch_backward(rows, cols, lse, grad_lse, grad_pos, positive_offset, scale, normalize)


@_infonce_lse_backward_op.register_fake
def _(rows, cols, lse, grad_lse, grad_pos, positive_offset, scale, normalize):
    return torch.empty_like(rows), torch.empty_like(cols)


def _setup_context(ctx, inputs, output) -> None:
    rows, cols, positive_offset, scale, normalize = inputs
    ctx.save_for_backward(rows, cols, output[0])
    ctx.options = (positive_offset, scale, normalize)


def _backward(ctx, grad_lse, grad_pos):
    rows, cols, lse = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
    d_rows, d_cols = _infonce_lse_backward_op(rows, cols, lse, grad_lse, grad_pos, *ctx.options)
    return d_rows, d_cols, None, None, None


_infonce_lse_op.register_autograd(_backward, setup_context=_setup_context)


def _direction(
    rows: torch.Tensor, cols: torch.Tensor, positive_offset: int, scale: float, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction through the Triton op, or the float32 torch reference (dispatch)."""
    if use_triton(rows, cols):
        return _infonce_lse_op(rows, cols, positive_offset, scale, normalize)
    return infonce_direction_reference(
        rows.float(),
        cols.float(),
        scale=scale,
        normalize=normalize,
        positive_offset=positive_offset,
    )


# --- functional API and module -------------------------------------------------------------------


def _check_options(temperature: float, reduction: str) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return float(temperature)


def _check_inputs(queries: torch.Tensor, documents: torch.Tensor) -> None:
    for name, t in (("queries", queries), ("documents", documents)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, width], got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if queries.shape[0] == 0:
        raise ValueError("queries must have at least one row")
    if queries.shape[1] == 0:
        raise ValueError("queries and documents must have a nonzero width")
    if documents.shape[1] != queries.shape[1]:
        raise ValueError(
            f"documents width {documents.shape[1]} != queries width {queries.shape[1]}"
        )
    if documents.shape[0] < queries.shape[0]:
        raise ValueError(
            f"documents must have at least as many rows as queries (the first B are the "
            f"positives): got {documents.shape[0]} documents for {queries.shape[0]} queries"
        )
    if documents.dtype != queries.dtype:
        raise ValueError(f"documents dtype {documents.dtype} != queries dtype {queries.dtype}")
    if documents.device != queries.device:
        raise ValueError(f"documents device {documents.device} != queries device {queries.device}")


def infonce_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    gather_across_devices: bool = False,
) -> torch.Tensor:
    """In-batch InfoNCE: `F.cross_entropy(sim(queries, documents).float() / temperature,
    torch.arange(B), reduction=reduction)` without ever allocating the `[B, M]` logits.

    Args:
        queries: `[B, d]` float32/float16/bfloat16.
        documents: `[M, d]`, `M >= B`, same dtype and device; `documents[i]` is the positive of
            query i and every other row a negative (e.g. B positives then B * k hard negatives).
        temperature: logits are `sim / temperature` (sentence-transformers' `scale = 1 / T`).
        symmetric: average, per query i, the query->document loss with the document->query loss
            of `documents[i]` against all B queries: `(lse_row_i + lse_col_i) / 2 - logit_ii`
            (sentence-transformers' `MultipleNegativesSymmetricRankingLoss`, i.e.
            `directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`).
        normalize: cosine similarity (True) or plain dot product (False).
        reduction: "mean" (over queries), "sum", or "none": the float32 per-query losses `[B]`
            (for `symmetric=True`, the average of the query's two directions as above).
        gather_across_devices: when torch.distributed is initialized with world size > 1, every
            rank's documents (and queries, when symmetric) become negatives of every rank's
            queries; gradients flow back to the owner rank (summed over the ranks' losses, like
            sentence-transformers' `all_gather_with_grad`). Ranks may hold different B and M.
            Each rank returns the loss of its own queries only (`mean` = mean over its B_r
            queries); a no-op without a process group or with one process.

    Returns a float32 scalar (`mean`, `sum`) or `[B]` (`none`).
    """
    temperature = _check_options(temperature, reduction)
    _check_inputs(queries, documents)
    scale = 1.0 / temperature
    n_queries = queries.shape[0]
    all_docs, doc_offset = documents, 0
    all_queries, query_offset = queries, 0
    if gather_across_devices and world_size() > 1:
        # This rank's documents start at doc_offset in the gathered matrix, so its positives are
        # rows doc_offset + i there (not i): the kernel takes the positive offset as an argument.
        all_docs, doc_offset = gather_with_grad(documents)
        if symmetric:
            all_queries, query_offset = gather_with_grad(queries)
    lse, pos = _direction(queries, all_docs, doc_offset, scale, normalize)
    per_query = lse - pos
    if symmetric:
        lse_c, pos_c = _direction(
            documents[:n_queries], all_queries, query_offset, scale, normalize
        )
        per_query = 0.5 * (per_query + (lse_c - pos_c))
    if reduction == "mean":
        return per_query.mean()
    if reduction == "sum":
        return per_query.sum()
    return per_query


class InfoNCELoss(torch.nn.Module):
    """`nn.Module` form of `infonce_loss`; `forward(queries [B, d], documents [M, d])`."""

    def __init__(
        self,
        temperature: float = 0.05,
        *,
        symmetric: bool = False,
        normalize: bool = True,
        reduction: str = "mean",
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = _check_options(temperature, reduction)
        self.symmetric = symmetric
        self.normalize = normalize
        self.reduction = reduction
        self.gather_across_devices = gather_across_devices

    def forward(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        return infonce_loss(
            queries,
            documents,
            temperature=self.temperature,
            symmetric=self.symmetric,
            normalize=self.normalize,
            reduction=self.reduction,
            gather_across_devices=self.gather_across_devices,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, symmetric={self.symmetric}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}, "
            f"gather_across_devices={self.gather_across_devices}"
        )
