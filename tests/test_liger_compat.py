"""bidirlm.kernels.liger_compat beyond Liger's own grid (tests/peers/test_liger_peer.py): float64
references for every option in bf16 (error at most 2x torch's own bf16 error, plus a floor),
leading batch dims, no labelled row, and one-line errors for what cannot be honoured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bidirlm.kernels
from bidirlm.kernels.liger_compat import (
    CrossEntropyOutput,
    LigerFusedLinearCrossEntropyFunction,
    LigerFusedLinearCrossEntropyLoss,
)
from tests.helpers import assert_close_to_ref


def reference(
    x, w, b, y, *, ce_weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
    reduction="mean", softcap=None, use_token_scaling=False,
):  # fmt: skip
    """Liger's definition in the inputs' precision (float64 in, float64 out)."""
    z = x @ w.T + (b if b is not None else 0)
    z = z.double() if x.dtype == torch.float64 else z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = y != ignore_index
    cw = ce_weight.to(z.dtype) if ce_weight is not None else None
    ce = F.cross_entropy(z, y, weight=cw, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)  # fmt: skip
    lse = torch.logsumexp(z, -1)
    zl = torch.where(valid, lse_square_scale * lse**2, 0.0)
    if reduction == "mean":
        wy = cw[y.clamp_min(0)] if cw is not None else torch.ones_like(ce)
        ce = ce / torch.where(valid, wy, 0.0).sum()
        zl = zl / valid.sum()
    rows = ce + zl
    if use_token_scaling:
        p = torch.softmax(z, -1).gather(1, y.clamp_min(0)[:, None])[:, 0].detach()
        rows = rows * torch.where(valid, p, 0.0)
    return rows if reduction == "none" else rows.sum()


OPTIONS = {
    "plain": {},
    "z-loss": {"lse_square_scale": 1e-3},
    "weights": {"ce_weight": True},
    "weights-smooth-softcap": {"ce_weight": True, "label_smoothing": 0.1, "softcap": 8.0},
    "smooth-softcap-scaling": {"label_smoothing": 0.2, "softcap": 5.0, "use_token_scaling": True},
    "sum-ignore": {"reduction": "sum", "ignore_index": 4},
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_bf16_within_twice_torch_error(case):
    """bf16 loss and d_input / d_weight / d_bias against float64: at most 2x the error of torch's
    own bf16 computation of the same formula (+ a bf16 floor)."""
    torch.manual_seed(11)
    n, h, v = 37, 24, 123
    opts = dict(OPTIONS[case])
    if opts.pop("ce_weight", False):
        opts["ce_weight"] = torch.rand(v) + 0.25
    x = torch.randn(n, h).bfloat16()
    w = (torch.randn(v, h) * 0.5).bfloat16()
    b = torch.randn(v).bfloat16()
    y = torch.randint(0, v, (n,))
    y[::4] = opts.get("ignore_index", -100)
    reduction = opts.get("reduction", "mean")
    g = torch.rand(n) + 0.5 if reduction == "none" else torch.tensor(1.0)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        loss = fn(*ins)
        return (loss, *torch.autograd.grad(loss, ins, g.to(loss.dtype)))

    mine = run(lambda x, w, b: LigerFusedLinearCrossEntropyLoss(**opts)(w, x, y, b),
               torch.bfloat16)  # fmt: skip
    ref64 = run(lambda x, w, b: reference(x, w, b, y, **opts), torch.float64)
    torch_bf16 = run(lambda x, w, b: reference(x, w, b, y, **opts), torch.bfloat16)
    for name, a, r, t in zip(("loss", "dinput", "dweight", "dbias"), mine, ref64, torch_bf16):
        assert a.dtype == (torch.float32 if name == "loss" else torch.bfloat16)
        assert_close_to_ref(a, r, t, factor=2.0, atol=1e-3 if name == "loss" else 2e-3,
                            name=f"{case} {name}")  # fmt: skip


def test_float32_options_against_float64():
    torch.manual_seed(2)
    n, h, v = 29, 16, 57
    x, w, b = torch.randn(n, h), torch.randn(v, h) * 0.4, torch.randn(v)
    y = torch.randint(0, v, (n,))
    y[3::5] = -100
    opts = dict(ce_weight=torch.rand(v) + 0.1, label_smoothing=0.3, softcap=4.0,
                lse_square_scale=1e-2, use_token_scaling=True)  # fmt: skip
    for reduction in ("mean", "sum", "none"):
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        loss, z, acc, pred = LigerFusedLinearCrossEntropyFunction.apply(
            ins[0], ins[1], y, ins[2], opts["ce_weight"], -100, 1e-2, 0.3, reduction, 4.0, True,
            torch.float32, True, True, True,
        )  # fmt: skip
        ins64 = [t.double().requires_grad_() for t in (x, w, b)]
        ref = reference(*ins64[:3], y, reduction=reduction, **opts)
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        gout = torch.rand_like(ref) + 0.5
        for a, r in zip(torch.autograd.grad(loss, ins, gout.float()),
                        torch.autograd.grad(ref, ins64, gout)):  # fmt: skip
            torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-4)
        assert z is not None and acc is not None and pred.dtype == torch.int64
        assert torch.all(pred[y == -100] == -1)


def test_leading_dims_and_no_labelled_row():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8)
    y = torch.randint(0, 11, (2, 5))
    out = LigerFusedLinearCrossEntropyLoss(reduction="none", return_predicted_tokens=True)(w, x, y)
    assert isinstance(out, CrossEntropyOutput)
    assert out.loss.shape == (2, 5) and out.predicted_tokens.shape == (2, 5)
    torch.testing.assert_close(
        out.loss, F.cross_entropy((x @ w.T).flatten(0, 1), y.flatten(), reduction="none").view(2, 5)
    )
    none = torch.full((2, 5), -100)
    loss = LigerFusedLinearCrossEntropyLoss(ce_weight=torch.rand(11))(w, x, none)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.all(g == 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reduction": "avg"}, "reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"softcap": 0.0}, "softcap"),
        ({"ce_weight": torch.ones(3)}, "ce_weight"),
        ({"ce_weight": torch.ones(11, dtype=torch.long)}, "ce_weight"),
        ({"accum_dtype": torch.int32}, "accum_dtype"),
        ({"ce_impl": "cute"}, "ce_impl"),
        ({"return_z_loss": 1}, "return_z_loss"),
        ({"ignore_index": 1.0}, "ignore_index"),
        ({"chunk_mem_const": 0}, "chunk_mem_const"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments(kwargs, match):
    x, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match=match):
        LigerFusedLinearCrossEntropyFunction.apply(x, w, y, **kwargs)


def test_package_exports():
    assert issubclass(LigerFusedLinearCrossEntropyFunction, torch.autograd.Function)
    assert bidirlm.kernels.LigerFusedLinearCrossEntropyLoss is LigerFusedLinearCrossEntropyLoss
    assert (
        bidirlm.kernels.LigerFusedLinearCrossEntropyFunction is LigerFusedLinearCrossEntropyFunction
    )
