"""Fused MNTP loss: lm_head + cross-entropy on labelled rows only, never a `[rows, V]` tensor.

`mntp_loss(hidden, weight, labels)` computes

    F.cross_entropy(softcap(hidden @ weight.T + bias).float(), labels,
                    ignore_index=ignore_index, reduction=reduction)

with `hidden [..., d]`, `weight [V, d]`, `bias [V]`, `labels [...]` (the shape of `hidden[..., 0]`)
and `softcap(x) = softcap * tanh(x / softcap)` (Gemma2 style; off when None). Masked next-token
prediction labels only 20-40% of positions, so the labelled rows are compacted first (a stable
partition of row indices, kept on the device: no host sync) and the kernels read hidden rows
through that index: ignored rows cost nothing, and no copy of the hidden states is made.

Kernels (all tile rows x vocabulary; logits exist only as one register tile at a time):
- forward: per row block, sweep the vocabulary with an online log-sum-exp and pick the target
  logit in the same pass; stores the per-row loss and float32 lse.
- backward dH: per row block, sweep the vocabulary again, recompute each logits tile and
  `dlogits = grad * (softmax - onehot) * softcap'`, accumulate `dlogits @ W` in float32.
- backward dW (and dBias): per vocabulary tile, sweep the labelled rows, accumulate
  `dlogits^T @ H` in float32.
Every gradient is owned by exactly one program, so the backward is deterministic (no atomics) and
exact (no tile is skipped). The float32 accumulators live in one scratch buffer of bounded size
(`_SCRATCH_BYTES`, launches are chunked to fit), then are cast to the parameter dtype. The price
of determinism is recomputing the logits twice in the backward: 10 * rows * V * d FLOPs in all
versus 6 for an unfused matmul + cross-entropy.

Layers: `@triton.jit` kernels -> launchers `_triton_forward`/`_triton_backward` (config, grid; both
in `mntp_loss_triton.py`, imported only when Triton runs, so importing this module is cheap) ->
`torch.library` custom ops `bidirlm::mntp_loss_fwd`/`bidirlm::mntp_loss_bwd` whose autograd is
registered with `register_autograd` (this is the autograd layer; torch.compile traces it without
graph breaks) -> `mntp_loss` / `MNTPLoss`. The custom ops run the Triton kernels or, when dispatch
says "torch", the chunked reference in `kernels/reference.py`, so both paths compile the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import reference
from .config import debug_checks
from .dispatch import use_triton

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class MNTPParams:
    """Non-tensor options of the MNTP loss."""

    ignore_index: int = -100
    softcap: Optional[float] = None
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}"
            )
        if self.softcap is not None and not (float(self.softcap) > 0.0):
            raise ValueError(f"softcap must be None or > 0, got {self.softcap!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")


# --- custom ops (torch.library) and autograd -----------------------------------------------------


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError for labels outside [0, V) other than ignore_index.

    On a GPU this needs a host sync, so it runs only under BIDIRLM_DEBUG=1 there; unchecked bad
    labels are never used as addresses (the kernels compare them with column indices), they
    just yield loss = lse for that row.
    """
    if labels.device.type == "cuda" and not debug_checks():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {value}"
        )


@torch.library.custom_op("bidirlm::mntp_loss_fwd", mutates_args=())
def _mntp_loss_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N], lse [N]) of `hidden [N, d]`, 0 at ignored rows; softcap 0.0 = off."""
    _check_label_range(labels, weight.shape[0], ignore_index)
    if use_triton(hidden):
        from .mntp_loss_triton import _triton_forward

        return _triton_forward(hidden, weight, bias, labels, ignore_index, softcap)
    return reference.mntp_loss_reference_forward(
        hidden, weight, bias, labels, ignore_index=ignore_index, softcap=softcap or None
    )


@_mntp_loss_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap):  # noqa: ANN001, ANN202
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return hidden.new_empty(hidden.shape[0], dtype=dtype), hidden.new_empty(
        hidden.shape[0], dtype=dtype
    )


@torch.library.custom_op("bidirlm::mntp_loss_bwd", mutates_args=())
def _mntp_loss_bwd(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    softcap: float,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden [N, d], dweight [V, d], dbias [V]); an empty tensor for each one not needed
    (need_dh; need_dw covers weight and bias) or absent (bias None)."""
    if use_triton(hidden):
        from .mntp_loss_triton import _triton_backward

        dh, dw, db = _triton_backward(
            grad, hidden, weight, bias, labels, lse, ignore_index, softcap, need_dh, need_dw
        )
    else:
        dh, dw, db = reference.mntp_loss_reference_backward(
            grad, hidden, weight, bias, labels, lse, ignore_index=ignore_index,
            softcap=softcap or None, need_dh=need_dh, need_dw=need_dw,
        )  # fmt: skip
    empty = lambda t: t if t is not None else weight.new_empty(0)
    return empty(dh), empty(dw), empty(db)


@_mntp_loss_bwd.register_fake
def _(  # noqa: ANN202
    grad,
    hidden,
    weight,
    bias,
    labels,
    lse,
    ignore_index,
    softcap,
    need_dh,
    need_dw,  # noqa: ANN001
):
    empty = weight.new_empty(0)
    dh = torch.empty_like(hidden) if need_dh else empty
    dw = torch.empty_like(weight) if need_dw else empty.clone()
    db = torch.empty_like(bias) if bias is not None and need_dw else empty.clone()
    return dh, dw, db


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    hidden, weight, bias, labels, ignore_index, softcap = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.ignore_index = ignore_index
    ctx.softcap = softcap
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss, grad_lse):  # noqa: ANN001, ANN202
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_dh = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    dh, dw, db = torch.ops.bidirlm.mntp_loss_bwd(
        grad_loss, hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.softcap, need_dh,
        need_dw,
    )  # fmt: skip
    return (
        dh if need_dh else None,
        dw if ctx.needs_input_grad[1] else None,
        db if bias is not None and ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
    )


_mntp_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public API ----------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None
) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., d], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight width {weight.shape[1]} != hidden width {hidden.shape[-1]} "
            f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    allowed = _FLOAT_DTYPES if use_triton(hidden) else (*_FLOAT_DTYPES, torch.float64)
    if hidden.dtype not in allowed:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported; use one of {allowed}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {shape}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def mntp_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Masked next-token prediction loss, fused with the lm_head.

    Equals `F.cross_entropy(softcap(hidden @ weight.T + bias).float(), labels,
    ignore_index=ignore_index, reduction=reduction)` (labels and logits flattened over the
    leading dims) without allocating `[rows, V]` and spending compute only on labelled rows.

    Args:
        hidden: `[..., d]` final hidden states (fp16, bf16 or fp32; fp64 on the torch path).
        weight: `[V, d]` lm_head / tied embedding, same dtype as hidden.
        labels: `[...]` = `hidden.shape[:-1]`, int64/int32 token ids in [0, V) or ignore_index.
        bias: optional `[V]` lm_head bias.
        softcap: `softcap * tanh(logits / softcap)` on the logits when not None (must be > 0).
        reduction: "mean" over labelled rows, "sum", or "none" (loss per row shaped like labels,
            0 at ignored rows).

    Returns the float32 loss (float64 for float64 inputs). Gradients flow to hidden, weight
    (accumulated in float32, then cast) and bias. Differences from torch: `mean` over zero
    labelled rows is 0.0 with zero gradients (torch gives NaN).
    """
    params = MNTPParams(ignore_index=ignore_index, softcap=softcap, reduction=reduction)
    _validate(hidden, weight, labels, bias)
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    flat = labels.reshape(-1).to(torch.int64).contiguous()  # the kernels index labels[row]
    rows, _ = torch.ops.bidirlm.mntp_loss_fwd(
        h2, w, b, flat, params.ignore_index, float(params.softcap or 0.0)
    )
    if params.reduction == "none":
        return rows.reshape(labels.shape)
    total = rows.sum()
    if params.reduction == "sum":
        return total
    count = (flat != params.ignore_index).sum()
    return total / count.clamp_min(1).to(total.dtype)


class MNTPLoss(torch.nn.Module):
    """`nn.Module` form of `mntp_loss`: `MNTPLoss(softcap=30.0)(hidden, weight, labels)`."""

    def __init__(
        self, *, ignore_index: int = -100, softcap: float | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.params = MNTPParams(ignore_index=ignore_index, softcap=softcap, reduction=reduction)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p = self.params
        return mntp_loss(
            hidden, weight, labels, bias=bias, ignore_index=p.ignore_index, softcap=p.softcap,
            reduction=p.reduction,
        )  # fmt: skip

    def extra_repr(self) -> str:
        p = self.params
        return f"ignore_index={p.ignore_index}, softcap={p.softcap}, reduction={p.reduction!r}"
