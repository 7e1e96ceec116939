"""Liger-Kernel's fused linear cross-entropy API on bidirlm's MNTP kernel (a drop-in).

    from bidirlm.kernels.liger_compat import (
        LigerFusedLinearCrossEntropyLoss, LigerFusedLinearCrossEntropyFunction,
        liger_fused_linear_cross_entropy, CrossEntropyOutput)

Same names, argument order, keyword names, defaults and return structure as liger-kernel 0.8
(`liger_kernel.transformers.fused_linear_cross_entropy`, `liger_kernel.ops`,
`liger_kernel.transformers.functional`): `LigerFusedLinearCrossEntropyLoss(ce_weight=None,
ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
return_z_loss=False, accum_dtype=None, use_token_scaling=False, return_token_accuracy=False,
return_predicted_tokens=False)(lin_weight, _input, target, bias=None)` returns the loss, or a
`CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens)` when a `return_*` flag is
set; `LigerFusedLinearCrossEntropyFunction.apply(_input, weight, target, bias, ce_weight,
ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss, accum_dtype,
use_token_scaling, return_token_accuracy, return_predicted_tokens)` always returns the 4-tuple.

With `x = softcap(_input @ weight.T + bias).float()` (never allocated `[BT, V]`), valid rows
`target != ignore_index`, `w = ce_weight` (1 without), `eps = label_smoothing / V`, the loss is
Liger's (= `F.cross_entropy(x, target, weight=ce_weight, label_smoothing=..., reduction=...)`
plus the z-loss):

    ce_i = logsumexp(x_i) - x_i[y_i]
    loss_i = (1 - label_smoothing) * w[y_i] * ce_i + eps * sum_j w_j * (lse_i - x_ij)
    z_i = lse_square_scale * lse_i ** 2
    "mean": sum_i loss_i / sum_valid w[y_i] + sum_i z_i / n_valid;  "sum": sums;  "none": per row
    use_token_scaling: loss_i and z_i are multiplied by softmax(x_i)[y_i] (detached)

The log-sum-exps, cross-entropies, label smoothing without class weights, the z-loss and the
token accuracy come from `bidirlm.kernels.mntp_loss` (one fused pass; dW accumulated in float32
whatever `accum_dtype` says, which is at least as precise as Liger's). The class-weighted
smoothing term `sum_j w_j x_ij` is `_input @ (weight.T @ w)` without softcap and a row-chunked
torch pass with softcap; this combination (ce_weight with label smoothing) runs in float32 and
rounds the gradients once. The token-scaling probabilities and the predicted tokens (first
argmax; -1 at ignored rows) come from a no-grad row-chunked pass whose logits chunk holds about
as many elements as `_input` (Liger's own memory bound). `ce_impl` / `ce_mode` (Liger's backend
choice) must be None; `chunk_mem_const` is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .mntp_loss import mntp_loss

__all__ = [
    "CrossEntropyOutput",
    "LigerFusedLinearCrossEntropyFunction",
    "LigerFusedLinearCrossEntropyLoss",
    "liger_fused_linear_cross_entropy",
]

_REDUCTIONS = ("mean", "sum", "none")


@dataclass
class CrossEntropyOutput:
    """Liger's structured result: `loss`, and the extras asked for (None otherwise)."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None
    predicted_tokens: Optional[torch.Tensor] = None


# --- argument checks -----------------------------------------------------------------------------


def _check(
    _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
    reduction, softcap, flags, accum_dtype, ce_impl, ce_mode, chunk_mem_const,
) -> None:  # fmt: skip
    for name, t in (("_input", _input), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    for name, value in (("lse_square_scale", lse_square_scale),
                        ("label_smoothing", label_smoothing)):  # fmt: skip
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0
    ):
        raise ValueError(f"softcap must be None or a float > 0, got {softcap!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if accum_dtype is not None and (
        not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point
    ):
        raise ValueError(f"accum_dtype must be None or a floating torch.dtype, got {accum_dtype!r}")
    for name, value in (("ce_impl", ce_impl), ("ce_mode", ce_mode)):
        if value is not None:
            raise ValueError(
                f"{name}={value!r} selects one of Liger's own backends; bidirlm runs its MNTP "
                f"kernel: pass {name}=None"
            )
    if (
        isinstance(chunk_mem_const, bool)
        or not isinstance(chunk_mem_const, int)
        or (chunk_mem_const < 1)
    ):
        raise ValueError(f"chunk_mem_const must be a positive int, got {chunk_mem_const!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if ce_weight is not None:
        if not isinstance(ce_weight, torch.Tensor) or not ce_weight.is_floating_point():
            raise ValueError("ce_weight must be a floating-point tensor of size V")
        if tuple(ce_weight.shape) != (weight.shape[0],):
            raise ValueError(
                f"ce_weight must be [V] = ({weight.shape[0]},), got {tuple(ce_weight.shape)}"
            )
        if ce_weight.device != _input.device:
            raise ValueError(f"ce_weight is on {ce_weight.device} but _input on {_input.device}")


# --- extra passes (row-chunked, bounded memory) --------------------------------------------------


def _row_chunk(rows: int, vocab: int, width: int) -> int:
    """Rows per chunk so that a `[chunk, V]` logits block holds about `rows * width` elements."""
    return max(1, min(rows, (rows * width + vocab - 1) // max(vocab, 1)))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias, softcap) -> torch.Tensor:
    z = h.float() @ weight.float().T
    if bias is not None:
        z = z + bias.float()
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@torch.no_grad()
def _row_stats(h, weight, bias, labels, ignore_index, softcap, need_prob, need_argmax):
    """(p_i = softmax(x_i)[y_i] or None, first argmax or None), 0 / -1 at ignored rows."""
    n = h.shape[0]
    valid = labels != ignore_index
    prob = torch.zeros(n, dtype=torch.float32, device=h.device) if need_prob else None
    arg = torch.full((n,), -1, dtype=torch.int64, device=h.device) if need_argmax else None
    step = _row_chunk(n, weight.shape[0], h.shape[1])
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        x = _logits(h[sl], weight, bias, softcap)
        ok = valid[sl]
        if need_prob:
            y = labels[sl].clamp(0, weight.shape[0] - 1)
            p = torch.exp(x.gather(1, y[:, None])[:, 0] - torch.logsumexp(x, dim=-1))
            prob[sl] = torch.where(ok, p, torch.zeros_like(p))
        if need_argmax:
            arg[sl] = torch.where(ok, x.argmax(dim=-1), torch.full_like(arg[sl], -1))
    return prob, arg


class _WeightedLogitSum(torch.autograd.Function):
    """`S_i = sum_j w_j * softcap(h_i @ W_j + b_j)` float32 `[N]`, row-chunked forward and
    backward (recomputes each `[chunk, V]` block; never the whole `[N, V]`)."""

    @staticmethod
    def forward(ctx, h, weight, bias, cw, softcap):  # noqa: ANN001, ANN205
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        step = _row_chunk(n, weight.shape[0], h.shape[1])
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            out[sl] = _logits(h[sl], weight, bias, softcap) @ cw.float()
        ctx.save_for_backward(h, weight, bias, cw)
        ctx.softcap = softcap
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        h, weight, bias, cw = ctx.saved_tensors
        softcap = ctx.softcap
        n = h.shape[0]
        w32 = weight.float()
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
        db = torch.zeros(weight.shape[0], device=h.device) if (
            bias is not None and ctx.needs_input_grad[2]
        ) else None  # fmt: skip
        step = _row_chunk(n, weight.shape[0], h.shape[1])
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            dz = grad[sl, None].float() * cw.float()[None, :]
            if softcap is not None:
                z = h[sl].float() @ w32.T
                if bias is not None:
                    z = z + bias.float()
                dz = dz * (1 - torch.tanh(z / softcap) ** 2)
            if dh is not None:
                dh[sl] = (dz @ w32).to(h.dtype)
            if dw is not None:
                dw += dz.T @ h[sl].float()
            if db is not None:
                db += dz.sum(0)
        return (
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None,
            None,
        )


def _weighted_logit_sum(h, weight, bias, cw, softcap) -> torch.Tensor:
    if softcap is None:  # linear: sum_j w_j (h W_j + b_j) = h @ (W.T w) + b . w
        s = h.float() @ (weight.float().T @ cw.float())
        return s + bias.float() @ cw.float() if bias is not None else s
    return _WeightedLogitSum.apply(h, weight, bias, cw, softcap)


# --- the loss ------------------------------------------------------------------------------------


def _flce(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype | None = None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    ce_impl=None,
    ce_mode=None,
    chunk_mem_const: int = 1,
):
    flags = {
        "return_z_loss": return_z_loss,
        "use_token_scaling": use_token_scaling,
        "return_token_accuracy": return_token_accuracy,
        "return_predicted_tokens": return_predicted_tokens,
    }
    _check(
        _input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        label_smoothing, reduction, softcap, flags, accum_dtype, ce_impl, ce_mode,
        chunk_mem_const,
    )  # fmt: skip
    softcap = None if softcap is None else float(softcap)
    shape = target.shape
    h = _input.reshape(-1, _input.shape[-1]) if _input.dim() != 2 else _input
    labels = target.reshape(-1)
    vocab = weight.shape[0]
    weighted = ce_weight is not None
    smooth_in_kernel = 0.0 if weighted else float(label_smoothing)
    if weighted and label_smoothing > 0 and h.dtype != torch.float32:
        # Three gradient paths reach the weight here (the kernel's cross-entropy, the target
        # logit and the weighted logit sum; the first two cancel in their e_y part), so they
        # run in float32 and meet in float32, then round once to the input dtype (in bf16 the
        # separately rounded paths measured 2.9x torch's dW error against float64).
        h, weight = h.float(), weight.float()
        bias = bias.float() if bias is not None else None
    with torch.autocast(h.device.type, enabled=False):  # float32 logits, as Liger's kernel
        out = mntp_loss(
            h, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
            reduction="none", label_smoothing=smooth_in_kernel,
            lse_square_scale=float(lse_square_scale), return_z_loss=True,
            return_token_accuracy=return_token_accuracy,
        )  # fmt: skip
    rows, z_rows = out.loss, out.z_loss  # rows include z_rows
    valid = labels != ignore_index
    n_valid = valid.sum()
    if weighted:
        cw = ce_weight.float()
        w_y = torch.where(valid, cw[labels.clamp(0, vocab - 1)], torch.zeros((), device=h.device))
        ce = rows - z_rows
        main = w_y * ce
        if label_smoothing > 0:
            # eps * sum_j w_j (lse - x_ij) with lse = ce + x_iy (both differentiable)
            y = labels.clamp(0, vocab - 1)
            x_y = (h.float() * weight.float()[y]).sum(-1)
            if bias is not None:
                x_y = x_y + bias.float()[y]
            if softcap is not None:
                x_y = softcap * torch.tanh(x_y / softcap)
            lse = ce + x_y
            s_w = _weighted_logit_sum(h, weight, bias, cw, softcap)
            smooth = (label_smoothing / vocab) * (cw.sum() * lse - s_w)
            main = (1 - label_smoothing) * main + torch.where(
                valid, smooth, torch.zeros_like(smooth)
            )
        denom = w_y.sum()
    else:
        main = rows - z_rows
        denom = n_valid
    if reduction == "mean":
        # Liger divides by the (possibly negative) sum of the valid rows' class weights; with no
        # valid row every term is 0 and so is the loss
        main = main / torch.where(denom == 0, torch.ones_like(denom), denom).to(main.dtype)
        z_rows = z_rows / n_valid.clamp_min(1).to(z_rows.dtype)
    loss_rows = main + z_rows
    prob, predicted = None, None
    if use_token_scaling or return_predicted_tokens:
        prob, predicted = _row_stats(
            h.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
            ignore_index, softcap, use_token_scaling, return_predicted_tokens,
        )  # fmt: skip
    if use_token_scaling:
        loss_rows = loss_rows * prob
        z_rows = z_rows * prob
    accuracy = None
    if reduction == "none":
        loss = loss_rows.reshape(shape)
        z_loss = z_rows.reshape(shape) if return_z_loss else None
        if return_token_accuracy:
            accuracy = out.token_accuracy.reshape(shape)
    else:
        loss = loss_rows.sum()
        z_loss = z_rows.sum() if return_z_loss else None
        if return_token_accuracy:
            accuracy = out.token_accuracy.sum() / n_valid.clamp_min(1).to(torch.float32)
    if predicted is not None:
        predicted = predicted.reshape(shape)
    return loss, z_loss, accuracy, predicted


class LigerFusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Liger's `LigerFusedLinearCrossEntropyFunction`: `.apply(_input [BT, H], weight [V, H],
    target [BT], bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
    label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None,
    use_token_scaling=False, return_token_accuracy=False, return_predicted_tokens=False,
    ce_impl=None, ce_mode=None, chunk_mem_const=1)` -> `(loss, z_loss, token_accuracy,
    predicted_tokens)` (None for the extras not asked for). Gradients flow to `_input`, `weight`
    and `bias` through bidirlm's kernels (their own autograd: `apply` composes differentiable
    ops rather than running a forward/backward pair of its own, so it subclasses
    `torch.autograd.Function` only for `issubclass` checks); see the module docstring."""

    @staticmethod
    def apply(*args, **kwargs):  # noqa: ANN205
        return _flce(*args, **kwargs)


def liger_fused_linear_cross_entropy(
    input: torch.Tensor,  # noqa: A002 (Liger's keyword name)
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    lse_square_scale: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype | None = None,
    use_token_scaling: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    """Liger's functional form: the loss, or `CrossEntropyOutput` when a `return_*` flag is set."""
    loss, z_loss, accuracy, predicted = _flce(
        input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing,
        reduction, softcap, return_z_loss, accum_dtype, use_token_scaling, return_token_accuracy,
        return_predicted_tokens,
    )  # fmt: skip
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    return CrossEntropyOutput(loss, z_loss, accuracy, predicted)


class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    """Liger's `LigerFusedLinearCrossEntropyLoss`; `forward(lin_weight, _input, target,
    bias=None)` (weight first, as Liger) -> the loss or a `CrossEntropyOutput`."""

    def __init__(
        self,
        ce_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: float | None = None,
        return_z_loss: bool = False,
        accum_dtype: torch.dtype | None = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
        self.ce_weight = ce_weight
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.accum_dtype = accum_dtype
        self.use_token_scaling = use_token_scaling
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | CrossEntropyOutput:
        loss, z_loss, accuracy, predicted = _flce(
            _input, lin_weight, target, bias, self.ce_weight, self.ignore_index,
            self.lse_square_scale, self.label_smoothing, self.reduction, self.softcap,
            self.return_z_loss, self.accum_dtype, self.use_token_scaling,
            self.return_token_accuracy, self.return_predicted_tokens,
        )  # fmt: skip
        if not (self.return_z_loss or self.return_token_accuracy or self.return_predicted_tokens):
            return loss
        return CrossEntropyOutput(loss, z_loss, accuracy, predicted)
