"""Triton kernels and host launchers of the fused InfoNCE loss (see `infonce.py` for the op).

One *direction* of the loss, for `rows [R, d]` and `cols [N, d]`:
`lse_i = logsumexp_j(scale * sim(rows_i, cols_j))`, `pos_i = scale * sim(rows_i, cols_{offset+i})`,
with `sim` the dot product, times `rx_i * ry_j` (float32 inverse norms) for the cosine.

- `_launch_forward`: `_infonce_fwd_kernel` over (row blocks, column splits), online log-sum-exp
  in fp32, per-split results merged on the host.
- `_launch_backward`: chunks of the logit matrix; `_infonce_bwd_kernel` writes the chunk's
  `E = d loss / d (row . col)` and GEMMs accumulate `E @ cols` and `E.T @ rows` in float32; the
  normalization's Jacobian is applied once per row at the end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .config import arch_family, autotune_enabled
from .dispatch import interpreting

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
    # An empty split keeps m = -inf, l = 0: its lse is -inf and drops out of the host merge
    # (the clamp only avoids evaluating log2(0)).
    lse = (m_i + tl.log2(tl.maximum(l_i, 1e-30))) * 0.6931471805599453
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
    # Times a power of two chosen on the host so that max |E| is 2^14: fp16 E keeps its small
    # entries out of the subnormals (rx * ry * g is ~1e-7 for wide embeddings and big batches).
    e = e * row_scale[:, None] * col_scale[None, :] * tl.load(escale_ptr)
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
            args += (grad_lse, grad_pos, e, e_scale, r0, nr, c0, nc, dim, x.stride(0), y.stride(0))
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
        acc_y /= e_scale
        _apply_norm_jacobian(acc_y, y_c, None if ry is None else ry[c0 : c0 + nc], dy[c0 : c0 + nc])
    acc_x /= e_scale
    _apply_norm_jacobian(acc_x, x, rx, dx)
    return dx, dy
