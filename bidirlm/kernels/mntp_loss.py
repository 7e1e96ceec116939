"""Fused MNTP loss: lm_head + cross-entropy on labelled rows only, never a `[rows, V]` tensor.

`mntp_loss(hidden, weight, labels)` computes

    z = softcap(hidden @ weight.T + bias).float()                      # [rows, V], never built
    F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing)
      + lse_square_scale * reduce(torch.logsumexp(z, -1) ** 2 over labelled rows)

with `hidden [..., d]`, `weight [V, d]`, `bias [V]`, `labels [...]` (the shape of `hidden[..., 0]`)
and `softcap(x) = softcap * tanh(x / softcap)` (Gemma2 style; off when None). Masked next-token
prediction labels only 20-40% of positions, so the labelled rows are compacted first (a stable
partition of row indices, kept on the device: no host sync) and the kernels read hidden rows
through that index: ignored rows cost nothing, and no copy of the hidden states is made.

Kernels (`mntp_loss_triton.py`; logits exist only as register tiles and one bounded chunk):
- forward: a (labelled-row blocks x vocabulary splits) grid, each program an online log-sum-exp
  over its split (plus the target logit, the sum of logits for label smoothing, the max and
  first argmax for token accuracy); a second launch merges the splits exactly. Few labelled rows
  still fill the GPU. 2 n V d FLOPs.
- backward: per chunk of `Rc` labelled slots x `Vc` vocabulary entries, one kernel writes the
  chunk's dlogits (input dtype) and two GEMM kernels with float32 accumulators on chip turn it
  into dH (`dz @ W`) and dW (`dz.T @ H`); a float32 partial of one chunk is read and written once
  per chunk, never inside a K loop. When all rows fit one row chunk each dlogits chunk feeds both
  GEMMs (8 n V d FLOPs in all, as Cut Cross-Entropy); otherwise a dW pass (vocabulary-major) and
  a dH pass (row-major) recompute it (10 n V d), which keeps the working memory bounded by
  `_SCRATCH_BYTES` (56 MB): see `_bwd_plan_of`.
Every gradient element has one owner, so the results are deterministic (no atomics), and dW is
accumulated in float32 over all labelled rows before its one cast.

Layers: `@triton.jit` kernels -> launchers `_triton_forward`/`_triton_backward` (config, grid; both
in `mntp_loss_triton.py`, imported only when Triton runs, so importing this module is cheap) ->
`torch.library` custom ops `bidirlm::mntp_loss_fwd`/`bidirlm::mntp_loss_bwd` whose autograd is
registered with `register_autograd` (this is the autograd layer; torch.compile traces it without
graph breaks) -> `mntp_loss` / `MNTPLoss`. The custom ops run the Triton kernels or, when dispatch
says "torch", the chunked reference in `kernels/reference.py`, so both paths compile the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

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
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    return_z_loss: bool = False
    return_token_accuracy: bool = False
    num_labelled: Optional[int] = None
    filter_eps: Optional[float] = None

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}"
            )
        if self.softcap is not None and not (float(self.softcap) > 0.0):
            raise ValueError(f"softcap must be None or > 0, got {self.softcap!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        for name in ("label_smoothing", "lse_square_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a float, got {value!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing!r}")
        if not (self.lse_square_scale >= 0.0 and self.lse_square_scale < float("inf")):
            raise ValueError(
                f"lse_square_scale must be a finite float >= 0, got {self.lse_square_scale!r}"
            )
        for name in ("return_z_loss", "return_token_accuracy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        n = self.num_labelled
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"num_labelled must be None or an int >= 0, got {n!r}")
        eps = self.filter_eps
        if eps is not None and (
            isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0
        ):
            raise ValueError(f"filter_eps must be None or a float in (0, 1), got {eps!r}")


class MNTPOutput(NamedTuple):
    """`mntp_loss(..., return_z_loss=True or return_token_accuracy=True)` returns this.

    `loss` includes the z-loss; `z_loss` (None unless asked) is reduced like the loss;
    `token_accuracy` (None unless asked) is the fraction of labelled rows whose first argmax
    logit is the label (`"none"`: per row, 0.0 at ignored rows). Neither carries a gradient of
    its own beyond `z_loss`'s.
    """

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None


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
    label_smoothing: float = 0.0,
    with_accuracy: bool = False,
    num_labelled: int = -1,
    filter_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], lse [N], correct [N] or [0]) of `hidden [N, d]`, 0 at ignored rows; softcap
    0.0 = off. `correct` (1.0 where the first argmax is the label) only with `with_accuracy`.
    `num_labelled` (-1 = unknown) bounds the labelled rows, for the launch grids; `filter_eps`
    is the backward's (carried here for autograd)."""
    _check_label_range(labels, weight.shape[0], ignore_index)
    if use_triton(hidden):
        from .mntp_loss_triton import _triton_forward

        return _triton_forward(
            hidden, weight, bias, labels, ignore_index, softcap, label_smoothing, with_accuracy,
            num_labelled,
        )  # fmt: skip
    return reference.mntp_loss_reference_forward(
        hidden, weight, bias, labels, ignore_index=ignore_index, softcap=softcap or None,
        label_smoothing=label_smoothing, with_accuracy=with_accuracy,
    )  # fmt: skip


@_mntp_loss_fwd.register_fake
def _(  # noqa: ANN202
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    softcap,
    label_smoothing=0.0,
    with_accuracy=False,
    num_labelled=-1,
    filter_eps=0.0,
):  # noqa: ANN001
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    n = hidden.shape[0]
    return (
        hidden.new_empty(n, dtype=dtype),
        hidden.new_empty(n, dtype=dtype),
        hidden.new_empty(n if with_accuracy else 0, dtype=dtype),
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
    label_smoothing: float = 0.0,
    grad_lse: Optional[torch.Tensor] = None,
    num_labelled: int = -1,
    filter_eps: float = 0.0,
    row_loss: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden [N, d], dweight [V, d], dbias [V]) for the per-row gradients of the loss (`grad`)
    and of the lse (`grad_lse`, None = 0); an empty tensor for each one not needed (need_dh;
    need_dw covers weight and bias) or absent (bias None). `num_labelled` (-1 = unknown) sizes
    the chunks; `filter_eps > 0` turns on gradient filtering (Triton path only). `row_loss` (the
    forward's per-row loss, optional) gives the Triton path the target's softmax `exp(-loss)`
    without a per-logit compare when there is no smoothing, softcap or filtering."""
    if use_triton(hidden):
        from .mntp_loss_triton import _triton_backward

        dh, dw, db = _triton_backward(
            grad, hidden, weight, bias, labels, lse, ignore_index, softcap, need_dh, need_dw,
            label_smoothing, grad_lse, num_labelled, filter_eps, row_loss,
        )  # fmt: skip
    else:
        dh, dw, db = reference.mntp_loss_reference_backward(
            grad, hidden, weight, bias, labels, lse, ignore_index=ignore_index,
            softcap=softcap or None, need_dh=need_dh, need_dw=need_dw,
            label_smoothing=label_smoothing, grad_lse=grad_lse,
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
    need_dw,
    label_smoothing=0.0,
    grad_lse=None,  # noqa: ANN001
    num_labelled=-1,
    filter_eps=0.0,
    row_loss=None,
):
    empty = weight.new_empty(0)
    dh = torch.empty_like(hidden) if need_dh else empty
    dw = torch.empty_like(weight) if need_dw else empty.clone()
    db = torch.empty_like(bias) if bias is not None and need_dw else empty.clone()
    return dh, dw, db


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    hidden, weight, bias, labels, ignore_index, softcap, label_smoothing, _, *rest = inputs
    num_labelled, filter_eps = (*rest, -1, 0.0)[:2] if len(rest) != 1 else (rest[0], 0.0)
    loss, lse, correct = output
    # plain cross entropy: the backward takes the target's softmax from the per-row loss; a copy,
    # since the caller may change the returned loss in place (reduction="none" returns a view)
    plain = not label_smoothing and not softcap and not filter_eps
    ctx.save_for_backward(
        hidden, weight, bias, labels, lse, loss.detach().clone() if plain else None
    )
    ctx.options = (ignore_index, softcap, label_smoothing, num_labelled, filter_eps)
    ctx.mark_non_differentiable(correct)


def _backward(ctx, grad_loss, grad_lse, grad_correct):  # noqa: ANN001, ANN202
    hidden, weight, bias, labels, lse, row_loss = ctx.saved_tensors
    ignore_index, softcap, label_smoothing, num_labelled, filter_eps = ctx.options
    need_dh = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dh, dw, db = torch.ops.bidirlm.mntp_loss_bwd(
        grad_loss, hidden, weight, bias, labels, lse, ignore_index, softcap, need_dh, need_dw,
        label_smoothing, grad_lse, num_labelled, filter_eps, row_loss,
    )  # fmt: skip
    return (
        dh if need_dh else None,
        dw if ctx.needs_input_grad[1] else None,
        db if bias is not None and ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
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
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    num_labelled: int | None = None,
    filter_eps: float | None = None,
) -> torch.Tensor | MNTPOutput:
    """Masked next-token prediction loss, fused with the lm_head.

    Equals, with the logits `z = softcap(hidden @ weight.T + bias).float()` (labels and logits
    flattened over the leading dims, `valid = labels != ignore_index`):

        ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
        zl = lse_square_scale * torch.logsumexp(z, -1) ** 2 * valid
        loss = reduce(ce + zl)  # "mean": sum / valid.sum(); "sum"; "none": per row

    without allocating `[rows, V]` and spending compute only on labelled rows. This is
    Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (same option names, `loss` includes the
    z-loss) and, with the defaults, `F.cross_entropy(z, labels, ignore_index=..., reduction=...)`.

    Args:
        hidden: `[..., d]` final hidden states (fp16, bf16 or fp32; fp64 on the torch path).
        weight: `[V, d]` lm_head / tied embedding, same dtype as hidden.
        labels: `[...]` = `hidden.shape[:-1]`, int64/int32 token ids in [0, V) or ignore_index.
        bias: optional `[V]` lm_head bias.
        softcap: `softcap * tanh(logits / softcap)` on the logits when not None (must be > 0).
        reduction: "mean" over labelled rows, "sum", or "none" (loss per row shaped like labels,
            0 at ignored rows).
        label_smoothing: in [0, 1], torch's definition: `(1 - eps) * nll + eps * mean_j(-log p_j)`.
        lse_square_scale: z-loss weight (PaLM's 1e-4): adds `scale * lse^2` per labelled row.
        return_z_loss: also return the z-loss term `reduce(zl)` (differentiable).
        return_token_accuracy: also return the token accuracy: `mean(argmax(z) == labels)` over
            labelled rows (first argmax, as torch.argmax), a float32 scalar for "mean"/"sum"
            (0.0 over zero labelled rows), per row for "none" (0.0 at ignored rows).
        num_labelled: the number of labelled rows (or any upper bound of it) when the caller
            knows it without a host sync (an MNTP collator does): the Triton kernels size their
            grids and backward chunks from it (at 32k tokens and 30% labelled: ~135 launches
            instead of ~1,300 with the bound `rows`). A value below the true count is an error
            (ValueError on CPU; a device-side assert on a GPU). None: every row may be labelled.
        filter_eps: Cut Cross-Entropy's gradient filtering (off by default): the backward skips
            every dlogits tile whose entries are all at most `filter_eps * |g_row|` (the row's
            upstream gradient), so each gradient entry moves by at most `filter_eps * |g| *
            sum |other operand|` (e.g. 2**-12 for bf16 training). Triton path only; the torch
            path is exact.

    Returns the float32 loss (float64 for float64 inputs), or `MNTPOutput(loss, z_loss,
    token_accuracy)` when either `return_*` flag is set. Gradients flow to hidden, weight
    (accumulated in float32, then cast) and bias. Differences from torch: `mean` over zero
    labelled rows is 0.0 with zero gradients (torch gives NaN).
    """
    params = MNTPParams(
        ignore_index=ignore_index, softcap=softcap, reduction=reduction,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        num_labelled=num_labelled, filter_eps=filter_eps,
    )  # fmt: skip
    # a named range for profilers (`bidirlm profile` groups the trace by it)
    with torch.profiler.record_function("bidirlm.mntp_loss"):
        return _mntp_loss(hidden, weight, labels, bias, params)


def _mntp_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    params: MNTPParams,
) -> torch.Tensor | MNTPOutput:
    _validate(hidden, weight, labels, bias)
    d = hidden.shape[-1]
    h2 = hidden.reshape(-1, d)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    flat = labels.reshape(-1).to(torch.int64).contiguous()  # the kernels index labels[row]
    if params.num_labelled is not None and not use_triton(h2) and not torch.compiler.is_compiling():
        _check_num_labelled(flat, params.ignore_index, params.num_labelled)
    rows, lse, correct = torch.ops.bidirlm.mntp_loss_fwd(
        h2, w, b, flat, params.ignore_index, float(params.softcap or 0.0),
        float(params.label_smoothing), params.return_token_accuracy,
        -1 if params.num_labelled is None else params.num_labelled,
        float(params.filter_eps or 0.0),
    )  # fmt: skip
    z_rows = None
    if params.lse_square_scale > 0.0 or params.return_z_loss:
        # lse is 0 at ignored rows, so is their z-loss
        z_rows = params.lse_square_scale * lse * lse
        rows = rows + z_rows
    count = None
    if params.reduction != "none":
        count = (flat != params.ignore_index).sum().clamp_min(1)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if params.reduction == "none":
            return t.reshape(labels.shape)
        total = t.sum()
        return total if params.reduction == "sum" else total / count.to(total.dtype)

    loss = reduce(rows)
    if not (params.return_z_loss or params.return_token_accuracy):
        return loss
    z_loss = reduce(z_rows) if params.return_z_loss else None
    accuracy = None
    if params.return_token_accuracy:
        if params.reduction == "none":
            accuracy = correct.reshape(labels.shape)
        else:
            accuracy = correct.sum() / count.to(correct.dtype)
    return MNTPOutput(loss, z_loss, accuracy)


def _check_num_labelled(labels: torch.Tensor, ignore_index: int, num_labelled: int) -> None:
    """CPU (torch path): `num_labelled` below the labelled rows is a ValueError (no sync cost)."""
    count = int((labels != ignore_index).sum())
    if num_labelled < count:
        raise ValueError(f"num_labelled={num_labelled} is below the {count} labelled rows")


class MNTPLoss(torch.nn.Module):
    """`nn.Module` form of `mntp_loss`: `MNTPLoss(softcap=30.0)(hidden, weight, labels)`."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        softcap: float | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        filter_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.params = MNTPParams(
            ignore_index=ignore_index, softcap=softcap, reduction=reduction,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
            return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
            filter_eps=filter_eps,
        )  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_labelled: int | None = None,
    ) -> torch.Tensor | MNTPOutput:
        """`num_labelled` (per batch, as `mntp_loss`'s) sizes the kernels without a host sync."""
        p = self.params
        return mntp_loss(
            hidden, weight, labels, bias=bias, ignore_index=p.ignore_index, softcap=p.softcap,
            reduction=p.reduction, label_smoothing=p.label_smoothing,
            lse_square_scale=p.lse_square_scale, return_z_loss=p.return_z_loss,
            return_token_accuracy=p.return_token_accuracy, num_labelled=num_labelled,
            filter_eps=p.filter_eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        p = self.params
        out = f"ignore_index={p.ignore_index}, softcap={p.softcap}, reduction={p.reduction!r}"
        if p.label_smoothing:
            out += f", label_smoothing={p.label_smoothing}"
        if p.lse_square_scale:
            out += f", lse_square_scale={p.lse_square_scale}"
        return out
