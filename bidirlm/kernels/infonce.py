"""Fused in-batch InfoNCE loss: tiled similarity with a streaming log-sum-exp, never `[B, M]`.

`infonce_loss(queries [B, d], documents [M, d])` computes, for the default settings,

    logits = F.normalize(queries) @ F.normalize(documents).T / temperature      # [B, M]
    loss = F.cross_entropy(logits.float(), torch.arange(B))

which is sentence-transformers' `MultipleNegativesRankingLoss(scale=1 / temperature)`, without
allocating the `[B, M]` logits or their gradient. Four layers:

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

The kernels and launchers live in `infonce_triton.py`, the gather in `infonce_dist.py`.

The op computed by the kernels is one *direction*: for `rows [R, d]`, `cols [N, d]`,
`lse_i = logsumexp_j(scale * sim(rows_i, cols_j))` and `pos_i = scale * sim(rows_i,
cols_{offset + i})`. The loss is `lse - pos`; the symmetric loss adds the direction
`(documents[:B], queries)`. Cosine similarity is computed as `(x . y) * rx * ry` with
`rx = 1 / max(|x|, 1e-12)` in float32, which is `F.normalize`'s definition without rounding the
normalized embeddings to bf16 first; the backward applies the normalization's Jacobian
`g - rx^2 (g . x) x` once per row, O((B + M) d).
"""

from __future__ import annotations

import math

import torch

from .dispatch import use_triton
from .infonce_dist import gather_with_grad, world_size
from .infonce_triton import _launch_backward, _launch_forward
from .reference import infonce_direction_reference

__all__ = ["InfoNCELoss", "infonce_loss"]

REDUCTIONS = ("mean", "sum", "none")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- torch.library registration ------------------------------------------------------------------


@torch.library.custom_op("bidirlm::infonce_lse", mutates_args=())
def _infonce_lse_op(
    rows: torch.Tensor,
    cols: torch.Tensor,
    positive_offset: int,
    scale: float,
    normalize: bool,
    exclude_lo: int = 0,
    exclude_hi: int = 0,
    exclude_period: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward of one direction: `(lse [R], pos [R])` float32. `exclude_period > 0` drops
    columns `exclude_lo <= j < exclude_hi` with `(j - exclude_lo) % exclude_period == i` from row
    i's log-sum-exp (0 = none)."""
    return _launch_forward(
        rows, cols, positive_offset, scale, normalize,
        _exclusion(exclude_lo, exclude_hi, exclude_period),
    )  # fmt: skip


@_infonce_lse_op.register_fake
def _(rows, cols, positive_offset, scale, normalize, exclude_lo=0, exclude_hi=0, exclude_period=0):
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
    exclude_lo: int = 0,
    exclude_hi: int = 0,
    exclude_period: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward of one direction: `(d rows, d cols)` in the inputs' dtypes."""
    return _launch_backward(
        rows, cols, lse, grad_lse, grad_pos, positive_offset, scale, normalize,
        _exclusion(exclude_lo, exclude_hi, exclude_period),
    )  # fmt: skip


@_infonce_lse_backward_op.register_fake
def _(rows, cols, lse, grad_lse, grad_pos, positive_offset, scale, normalize, *exclude):
    return torch.empty_like(rows), torch.empty_like(cols)


def _exclusion(lo: int, hi: int, period: int) -> tuple[int, int, int] | None:
    return (lo, hi, period) if period > 0 else None


def _setup_context(ctx, inputs, output) -> None:
    rows, cols, positive_offset, scale, normalize, *exclude = inputs
    ctx.save_for_backward(rows, cols, output[0])
    ctx.options = (positive_offset, scale, normalize, *exclude)


def _backward(ctx, grad_lse, grad_pos):
    rows, cols, lse = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_pos = torch.zeros_like(lse) if grad_pos is None else grad_pos
    d_rows, d_cols = _infonce_lse_backward_op(rows, cols, lse, grad_lse, grad_pos, *ctx.options)
    return d_rows, d_cols, None, None, None, None, None, None


_infonce_lse_op.register_autograd(_backward, setup_context=_setup_context)


def _direction(
    rows: torch.Tensor,
    cols: torch.Tensor,
    positive_offset: int,
    scale: float,
    normalize: bool,
    exclude: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction through the Triton op, or the float32 torch reference (dispatch)."""
    lo, hi, period = exclude or (0, 0, 0)
    if use_triton(rows, cols):
        return _infonce_lse_op(rows, cols, positive_offset, scale, normalize, lo, hi, period)
    return infonce_direction_reference(
        rows.float(),
        cols.float(),
        scale=scale,
        normalize=normalize,
        positive_offset=positive_offset,
        exclude=exclude,
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
    query_to_query: bool = False,
    doc_to_doc: bool = False,
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
        query_to_query: add the other queries as negatives of query i: `sim(q_i, q_j)`, `j != i`.
        doc_to_doc: add `sim(d_i, d_k)` for the documents k of other queries as negatives:
            every `k` with `k % B != i` (rows i, i + B, i + 2B, ... are query i's positive and hard
            negatives in the B-positives-then-B-per-negative layout sentence-transformers uses).

    With `query_to_query` or `doc_to_doc` the loss is one joint softmax per query (GTE's improved
    contrastive loss; sentence-transformers' `MultipleNegativesRankingLoss(directions=...,
    partition_mode="joint")`): with `s = sim / temperature`,

        loss_i = logsumexp(cat([s(q_i, D)] + [s(q_i, Q \\ q_i)] if query_to_query
                                             + [s(Q, d_i)] if symmetric
                                             + [s(d_i, D \\ own docs)] if doc_to_doc)) - s(q_i, d_i)

    (`symmetric=True` then adds the "doc_to_query" direction to the joint softmax instead of
    averaging two). All four on (`symmetric`, both flags) is GTE's loss. `[B, M]` and `[B, B]` are
    never allocated either.

    Returns a float32 scalar (`mean`, `sum`) or `[B]` (`none`).
    """
    # a named range for profilers (`bidirlm profile` groups the trace by it)
    with torch.profiler.record_function("bidirlm.infonce_loss"):
        return _infonce_loss(
            queries, documents, temperature, symmetric, normalize, reduction,
            gather_across_devices, query_to_query, doc_to_doc,
        )  # fmt: skip


def _infonce_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    temperature: float,
    symmetric: bool,
    normalize: bool,
    reduction: str,
    gather_across_devices: bool,
    query_to_query: bool,
    doc_to_doc: bool,
) -> torch.Tensor:
    temperature = _check_options(temperature, reduction)
    _check_inputs(queries, documents)
    for name, flag in (("query_to_query", query_to_query), ("doc_to_doc", doc_to_doc)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    scale = 1.0 / temperature
    n_queries = queries.shape[0]
    joint = query_to_query or doc_to_doc
    all_docs, doc_offset = documents, 0
    all_queries, query_offset = queries, 0
    if gather_across_devices and world_size() > 1:
        # This rank's documents start at doc_offset in the gathered matrix, so its positives are
        # rows doc_offset + i there (not i): the kernel takes the positive offset as an argument.
        all_docs, doc_offset = gather_with_grad(documents)
        if symmetric or query_to_query:
            all_queries, query_offset = gather_with_grad(queries)
    lse, pos = _direction(queries, all_docs, doc_offset, scale, normalize)
    if joint:
        parts = [lse]
        positives = documents[:n_queries]
        if query_to_query:  # no positive among the queries: offset past the last column
            excl = (query_offset, query_offset + n_queries, n_queries)
            parts.append(_direction(queries, all_queries, all_queries.shape[0], scale,
                                    normalize, excl)[0])  # fmt: skip
        if symmetric:
            parts.append(_direction(positives, all_queries, query_offset, scale, normalize)[0])
        if doc_to_doc:
            excl = (doc_offset, doc_offset + documents.shape[0], n_queries)
            parts.append(_direction(positives, all_docs, all_docs.shape[0], scale, normalize,
                                    excl)[0])  # fmt: skip
        per_query = torch.logsumexp(torch.stack(parts), dim=0) - pos
    else:
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
        query_to_query: bool = False,
        doc_to_doc: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = _check_options(temperature, reduction)
        self.symmetric = symmetric
        self.normalize = normalize
        self.reduction = reduction
        self.gather_across_devices = gather_across_devices
        self.query_to_query = query_to_query
        self.doc_to_doc = doc_to_doc

    def forward(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        return infonce_loss(
            queries,
            documents,
            temperature=self.temperature,
            symmetric=self.symmetric,
            normalize=self.normalize,
            reduction=self.reduction,
            gather_across_devices=self.gather_across_devices,
            query_to_query=self.query_to_query,
            doc_to_doc=self.doc_to_doc,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, symmetric={self.symmetric}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}, "
            f"gather_across_devices={self.gather_across_devices}, "
            f"query_to_query={self.query_to_query}, doc_to_doc={self.doc_to_doc}"
        )
