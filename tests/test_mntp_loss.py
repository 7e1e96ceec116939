"""Fused MNTP loss against a float64 reference, torch, Liger-Kernel; memory, compile, errors.

Kernels run on the GPU when present, else in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1). Shapes are odd on purpose: V = 1003 (not a multiple of the vocabulary
tile), d = 96 (not a power of two), 257 rows.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bidirlm.kernels.exp2_triton import exp2_poly, row_sum_exp2
from bidirlm.kernels.reference import mntp_loss_reference
from tests.helpers import ATOL, DTYPES, assert_close_to_ref

# The module shares its name with the function it exports, so `from bidirlm.kernels import
# mntp_loss` can yield the (callable) module when the module was imported first; take the
# function from the module itself. test_module_name_collision_is_harmless covers the package path.
mntp_module = importlib.import_module("bidirlm.kernels.mntp_loss")
mntp_triton = importlib.import_module("bidirlm.kernels.mntp_loss_triton")
mntp_loss, MNTPLoss = mntp_module.mntp_loss, mntp_module.MNTPLoss

V, D, ROWS = 1003, 96, 257


def _inputs(
    device: torch.device,
    dtype: torch.dtype,
    *,
    shape: tuple[int, ...] = (ROWS,),
    d: int = D,
    vocab: int = V,
    labelled: float = 0.4,
    bias: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.15  # logits ~ N(0, 1.5^2)
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) >= labelled] = -100
    to = lambda t: t.to(device=device, dtype=dtype).requires_grad_()
    return to(hidden), to(weight), (to(b) if b is not None else None), labels.to(device)


def _torch_formula(hidden, weight, labels, bias, softcap, reduction):  # noqa: ANN001, ANN202
    """The contract, literally: F.cross_entropy(softcap(h @ W.T + b).float(), labels)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    out = F.cross_entropy(logits.float(), labels.reshape(-1), reduction=reduction)
    return out.reshape(labels.shape) if reduction == "none" else out


def _run(fn, tensors, upstream):  # noqa: ANN001, ANN202
    """Loss and gradients of (hidden, weight, bias) for `(loss * upstream).sum()`."""
    loss = fn(*tensors)
    (loss * upstream).sum().backward()
    grads = [t.grad for t in tensors if t is not None]
    return loss.detach(), grads


def _leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_()


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_()


CASES = {
    # name: (dtype, leading shape, labelled fraction, bias, softcap, reduction)
    "fp32-sum-all-bias-softcap": (torch.float32, (1, ROWS), 1.0, True, 2.0, "sum"),
    "fp32-mean-some": (torch.float32, (ROWS,), 0.4, False, None, "mean"),
    "fp32-none-some-softcap": (torch.float32, (ROWS,), 0.3, True, 2.0, "none"),
    "fp16-mean-some": (torch.float16, (ROWS,), 0.4, False, None, "mean"),
    "fp16-none-some-bias-softcap": (torch.float16, (ROWS,), 0.3, True, 2.0, "none"),
    "bf16-mean-some": (torch.bfloat16, (ROWS,), 0.4, False, None, "mean"),
    "bf16-sum-some-bias-softcap": (torch.bfloat16, (ROWS,), 0.3, True, 2.0, "sum"),
}
assert {c[0] for c in CASES.values()} == set(DTYPES)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(device: torch.device, case: str) -> None:
    dtype, shape, labelled, has_bias, softcap, reduction = CASES[case]
    h, w, b, y = _inputs(device, dtype, shape=shape, labelled=labelled, bias=has_bias)
    # an arbitrary upstream gradient for "none" (not the constant of mean/sum)
    upstream = torch.randn(shape, device=device) if reduction == "none" else torch.tensor(1.0)
    upstream = upstream.to(device)
    kw = {"softcap": softcap, "reduction": reduction}

    ours, ours_g = _run(lambda h_, w_, b_: mntp_loss(h_, w_, y, bias=b_, **kw), (h, w, b), upstream)
    t64 = [_leaf64(t) for t in (h, w, b)]
    ref, ref_g = _run(
        lambda h_, w_, b_: mntp_loss_reference(h_, w_, y, bias=b_, **kw), t64, upstream.double()
    )
    tt = [_leaf(t) for t in (h, w, b)]
    pt, pt_g = _run(
        lambda h_, w_, b_: _torch_formula(h_, w_, y, b_, softcap, reduction), tt, upstream
    )

    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    if reduction == "none":
        assert (ours[y == -100] == 0).all(), "ignored rows have loss 0"
    assert_close_to_ref(
        ours, ref, pt, name="loss", atol=ATOL[dtype] * max(1.0, ref.abs().max().item())
    )
    for name, g, g64, gpt in zip(("dhidden", "dweight", "dbias"), ours_g, ref_g, pt_g):
        assert g.dtype == dtype, name
        # gradients are small (1/rows): scale the absolute floor to their magnitude
        atol = ATOL[dtype] * g64.abs().max().item()
        assert_close_to_ref(g, g64, gpt, name=name, atol=atol)
    assert (ours_g[0].reshape(-1, D)[y.reshape(-1) == -100] == 0).all(), "ignored rows: dH = 0"


@pytest.mark.parametrize("seed", [0, 1])
def test_softcap_float32_error_within_2x_torch(device: torch.device, seed: int) -> None:
    """softcap=30 in float32: per-row loss error vs float64 <= 2x torch's own float32 error.

    logit / softcap is ~0.02 here, where `(1 - e) / (1 + e)` (e = exp(-2|x|)) cancelled: the
    old tanh put ~1e-6 on every capped logit, 3-4x torch's error (issue 13, item 18)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(64, 32, generator=g).to(device)
    w = (torch.randn(64, 32, generator=g) * 0.1).to(device)
    y = torch.randint(0, 64, (64,), generator=g).to(device)
    for reduction in ("none", "mean"):
        ours = mntp_loss(h, w, y, softcap=30.0, reduction=reduction)
        ref = mntp_loss_reference(h.double(), w.double(), y, softcap=30.0, reduction=reduction)
        pt = _torch_formula(h, w, y, None, 30.0, reduction)
        ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()  # rounding of the output
        assert_close_to_ref(ours, ref, pt, factor=2.0, atol=ulp, name=f"loss ({reduction})")


def test_softcap_tanh_is_accurate() -> None:
    """The kernels' tanh is within 2 ulp of float64 tanh from 1e-8 to 10 (both signs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _apply(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, mntp_triton._tanh(tl.load(x_ptr + offs)))

    if not torch.cuda.is_available():
        assert mntp_triton.interpreting()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mag = torch.cat([torch.logspace(-8, 1, 2048), torch.linspace(0.01, 3.0, 2048)])
    x = torch.cat([mag, -mag]).to(dev)
    out = torch.empty_like(x)
    _apply[(1,)](x, out, N=x.numel())
    ref = torch.tanh(x.double())
    ulps = (out.double() - ref).abs() / (torch.finfo(torch.float32).eps * ref.abs())
    assert ulps.max().item() <= 2.0, f"tanh off by {ulps.max().item():.1f} ulp"


def _options_float64(h, w, y, b, softcap, reduction, eps, zs):  # noqa: ANN001, ANN202
    """The documented PyTorch equivalent of the options, in float64: (loss, z_loss, accuracy)."""
    logits = h.reshape(-1, h.shape[-1]).double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat = y.reshape(-1)
    valid = flat != -100
    ce = F.cross_entropy(logits, flat, reduction="none", label_smoothing=eps)
    zl = zs * torch.logsumexp(logits, -1) ** 2 * valid
    correct = ((logits.argmax(-1) == flat) & valid).double()

    def reduce(t):  # noqa: ANN001, ANN202
        if reduction == "none":
            return t.reshape(y.shape)
        return t.sum() if reduction == "sum" else t.sum() / valid.sum().clamp_min(1)

    acc = correct.reshape(y.shape) if reduction == "none" else correct.sum() / valid.sum()
    return reduce(ce + zl), reduce(zl), acc


OPTION_CASES = {
    # name: (dtype, reduction, bias, softcap, label_smoothing, lse_square_scale)
    "fp32-mean-smooth-z": (torch.float32, "mean", False, None, 0.1, 1e-3),
    "fp32-none-bias-softcap-smooth-z": (torch.float32, "none", True, 2.0, 0.2, 1e-2),
    "bf16-sum-smooth-z": (torch.bfloat16, "sum", True, None, 0.1, 1e-3),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_smoothing_z_loss_accuracy_match_float64(device: torch.device, case: str) -> None:
    """label_smoothing, z-loss (returned and differentiable) and token accuracy vs float64."""
    dtype, reduction, has_bias, softcap, eps, zs = OPTION_CASES[case]
    h, w, b, y = _inputs(device, dtype, shape=(123,), vocab=517, labelled=0.5, bias=has_bias)
    kw = {"softcap": softcap, "reduction": reduction, "label_smoothing": eps,
          "lse_square_scale": zs}  # fmt: skip
    out = mntp_loss(h, w, y, bias=b, return_z_loss=True, return_token_accuracy=True, **kw)
    assert isinstance(out, mntp_module.MNTPOutput)
    t64 = [_leaf64(t) for t in (h, w, b)]
    ref_loss, ref_z, ref_acc = _options_float64(t64[0], t64[1], y, t64[2], softcap, reduction,
                                                eps, zs)  # fmt: skip
    tt = [_leaf(t) for t in (h, w, b)]
    pt_loss, pt_z, _ = _options_float64(tt[0], tt[1], y, tt[2], softcap, reduction, eps, zs)
    scale = max(1.0, ref_loss.abs().max().item())
    assert_close_to_ref(out.loss, ref_loss.float(), atol=ATOL[dtype] * scale, name="loss")
    assert_close_to_ref(out.z_loss, ref_z.float(), atol=ATOL[dtype] * scale, name="z_loss")
    torch.testing.assert_close(out.token_accuracy, ref_acc.float(), rtol=0, atol=1e-6)
    # gradients of loss + 3 * z_loss: the z-loss output carries its own gradient
    up = torch.rand(y.shape, device=device) + 0.5 if reduction == "none" else torch.tensor(1.0)
    up = up.to(device)
    total = lambda o: ((o[0] + 3 * o[1]) * up.to(o[0].dtype)).sum()  # noqa: E731
    ours_g = torch.autograd.grad(total(out), [t for t in (h, w, b) if t is not None])
    ref_g = torch.autograd.grad(total((ref_loss, ref_z)), [t for t in t64 if t is not None])
    pt_g = torch.autograd.grad(total((pt_loss, pt_z)), [t for t in tt if t is not None])
    for name, g, g64, gpt in zip(("dhidden", "dweight", "dbias"), ours_g, ref_g, pt_g):
        assert g.dtype == dtype, name
        atol = ATOL[dtype] * g64.abs().max().item()
        assert_close_to_ref(g, g64, gpt.to(g.dtype), name=name, atol=atol)


def test_options_match_liger(device: torch.device) -> None:
    """Same option names and values as Liger's LigerFusedLinearCrossEntropyLoss (loss with the
    z-loss, z-loss, token accuracy, gradients)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, b, y = _inputs(device, torch.float32, shape=(64,), d=64, vocab=517, bias=True)
    kw = {"label_smoothing": 0.1, "lse_square_scale": 1e-3, "return_z_loss": True,
          "return_token_accuracy": True}  # fmt: skip
    for reduction in ("mean", "sum"):
        ours = mntp_loss(h, w, y, bias=b, reduction=reduction, **kw)
        tl_ = [_leaf(t) for t in (h, w, b)]
        liger_fn = LigerFusedLinearCrossEntropyLoss(reduction=reduction, **kw)
        liger = liger_fn(tl_[1], tl_[0], y, bias=tl_[2])  # Liger takes (weight, input, target)
        torch.testing.assert_close(ours.loss, liger.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.z_loss, liger.z_loss.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.token_accuracy, liger.token_accuracy, rtol=0, atol=1e-6)
        ours_g = torch.autograd.grad(ours.loss, (h, w, b))
        liger_g = torch.autograd.grad(liger.loss, tl_)
        for g, gl in zip(ours_g, liger_g):
            torch.testing.assert_close(g, gl, rtol=1e-4, atol=1e-6)


def test_accuracy_and_z_loss_edge_cases(device: torch.device) -> None:
    """Ties take the first argmax (torch.argmax); zero labelled rows give 0.0, not NaN; the
    default call still returns a plain tensor."""
    h = torch.zeros(4, 8, device=device)
    w = torch.zeros(5, 8, device=device)  # all logits 0: argmax is column 0
    y = torch.tensor([0, 3, -100, 0], device=device)
    out = mntp_loss(h, w, y, return_token_accuracy=True, reduction="none")
    torch.testing.assert_close(
        out.token_accuracy, torch.tensor([1.0, 0.0, 0.0, 1.0], device=device)
    )
    assert out.z_loss is None
    none = torch.full((4,), -100, device=device)
    out = mntp_loss(h, w, none, lse_square_scale=1.0, return_z_loss=True,
                    return_token_accuracy=True)  # fmt: skip
    assert out.loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.token_accuracy.item() == 0.0
    assert isinstance(mntp_loss(h, w, y), torch.Tensor)


def _plans(monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    family = mntp_triton._CONFIGS["interpreter"]
    monkeypatch.setitem(mntp_triton._CONFIGS, "interpreter", dataclasses.replace(family, **changes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_deterministic_and_every_backward_plan(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Bitwise reproducible; every backward plan agrees with the one-chunk backward: several
    vocabulary chunks with dH's partial in a buffer, in dH itself (float32) or in dH's ignored
    rows (16-bit, `num_labelled` <= rows / 3), and the two-pass plan (tiny scratch budget)."""
    if device.type != "cpu":
        pytest.skip("the plans are forced through the interpreter's launch family")
    h, w, b, y = _inputs(device, dtype, labelled=0.25, bias=True, d=256, vocab=300)
    n_lab = int((y != -100).sum())
    assert 3 * n_lab <= ROWS

    def grads(**kw: object) -> list[torch.Tensor]:
        tt = [_leaf(t) for t in (h, w, b)]
        loss = mntp_loss(tt[0], tt[1], y, bias=tt[2], softcap=3.0, reduction="sum", **kw)
        loss.backward()
        return [loss.detach()] + [t.grad for t in tt]

    one = grads()
    assert all(torch.equal(a, b_) for a, b_ in zip(one, grads())), "not reproducible"
    fam = mntp_triton._CONFIGS["interpreter"]
    elem = 4 if dtype == torch.float32 else 2
    plan = mntp_triton._bwd_plan_of(fam, ROWS, n_lab, 300, 256, 4, elem, True, True)
    assert plan.vocab >= 300 and not plan.two_pass, "one chunk by default at these sizes"
    _plans(monkeypatch, vocab_cap=128)  # 3 vocabulary chunks of 128
    fam = mntp_triton._CONFIGS["interpreter"]
    results = {}
    for name, kw in (("all rows", {}), ("num_labelled", {"num_labelled": n_lab})):
        plan = mntp_triton._bwd_plan_of(
            fam, ROWS, kw.get("num_labelled", ROWS), 300, 256, 4, elem, True, True
        )
        assert plan.vocab == 128 and not plan.two_pass
        results[(name, plan.acc_mode)] = grads(**kw)
    modes = {mode for _, mode in results}
    assert modes == ({1} if dtype == torch.float32 else {0, 2}), modes
    monkeypatch.setattr(mntp_triton, "_SCRATCH_BYTES", 1)
    plan = mntp_triton._bwd_plan_of(fam, ROWS, ROWS, 300, 256, 4, elem, True, True)
    assert plan.two_pass and plan.rows < ROWS and plan.vocab < 300
    results[("two-pass", 0)] = grads()
    assert all(torch.equal(a, b_) for a, b_ in zip(results[("two-pass", 0)], grads()))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    for key, got in results.items():
        for name, a, b_ in zip(("loss", "dhidden", "dweight", "dbias"), one, got):
            if dtype != torch.float32 and name != "loss" and key[0] == "two-pass":
                # the two-pass plan casts dH per row chunk in another order: one 16-bit ulp
                torch.testing.assert_close(a, b_, rtol=1e-3, atol=1e-3, msg=f"{key} {name}")
                continue
            torch.testing.assert_close(a, b_, **tol, msg=f"{key} {name} changed")
    # dH's ignored rows (the spare partial) are zero again
    ignored = y == -100
    assert torch.equal(results[("num_labelled", max(modes))][1][ignored],
                       torch.zeros_like(h[ignored]))  # fmt: skip


def test_num_labelled_bound(device: torch.device) -> None:
    """`num_labelled` is an upper bound: larger is fine, smaller is refused, bad types too."""
    h, w, _, y = _inputs(device, torch.float32, shape=(40,), d=24, vocab=101, labelled=0.5)
    n_lab = int((y != -100).sum())
    want = mntp_loss(h, w, y)
    for bound in (n_lab, n_lab + 3, 40, 1000):
        torch.testing.assert_close(mntp_loss(h, w, y, num_labelled=bound), want)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="num_labelled"):
            mntp_loss(h, w, y, num_labelled=n_lab - 1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_labelled"):
            mntp_loss(h, w, y, num_labelled=bad)
    for bad in (0.0, 1.0, -1e-3, True):
        with pytest.raises(ValueError, match="filter_eps"):
            mntp_loss(h, w, y, filter_eps=bad)


def test_plans_at_the_target_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """V = 151,936, 32k tokens, 30% labelled, bf16, H100 tiles: with `num_labelled` the backward
    is one row chunk (8 n V d), <= 200 launches in all and < 64 MB of working memory at d = 1024
    and 2048; the forward is one persistent launch whose last wave is > 90% full. Without the
    count (any labelled fraction) the memory stays bounded as well."""
    n, v = 32768, 151936
    n_lab = int(0.3 * n)
    for d in (1024, 2048):
        mem = mntp_triton.working_memory(n, v, d, 2, num_labelled=n_lab)
        assert not mem["two_pass"] and mem["chunk_rows"] >= n_lab
        assert mem["fwd_launches"] + mem["bwd_launches"] <= 200, mem
        assert max(mem["fwd"], mem["bwd"]) < 64 * 2**20, mem
        waves = mem["fwd_waves"]
        assert waves / -(-waves // 1) > 0.9, mem
        blind = mntp_triton.working_memory(n, v, d, 2)
        assert max(blind["fwd"], blind["bwd"]) < 64 * 2**20, blind


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_labelled_rows(device: torch.device, reduction: str) -> None:
    h, w, b, y = _inputs(device, torch.float32, labelled=0.0, bias=True)
    loss = mntp_loss(h, w, y, bias=b, reduction=reduction)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss == 0).all(), "mean over nothing is 0.0, not NaN"
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t)), "zero gradients"


def test_tied_weight_gets_both_gradients(device: torch.device) -> None:
    """A tied lm_head is the input embedding too: its gradient is the sum of both uses."""
    ids = torch.randint(0, V, (2, 33), device=device)
    _, w, _, y = _inputs(device, torch.float32, shape=(2, 33), labelled=0.5)

    def model(weight: torch.Tensor, loss_fn) -> torch.Tensor:  # noqa: ANN001
        hidden = torch.tanh(F.embedding(ids, weight) * 3.0)
        return loss_fn(hidden, weight, y)

    model(w, mntp_loss).backward()
    w64 = _leaf64(w)
    model(w64, mntp_loss_reference).backward()
    assert_close_to_ref(w.grad, w64.grad, atol=1e-5 * w64.grad.abs().max().item(), name="dW")
    # both paths contribute: the embedding rows that were looked up differ from lm_head-only
    w2 = _leaf(w)
    mntp_loss(torch.tanh(F.embedding(ids, w.detach()) * 3.0), w2, y).backward()
    assert not torch.allclose(w2.grad, w.grad)


def test_matches_liger_and_torch(device: torch.device) -> None:
    """Same inputs through Liger-Kernel's fused linear CE, F.linear_cross_entropy and ours."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    h, w, b, y = _inputs(
        device, torch.float32, shape=(64,), labelled=0.4, bias=True, d=64, vocab=517
    )
    # no softcap here: Liger's softcap path fails in the interpreter (it calls .to() on a Python
    # float); the GPU test below covers it
    ours, ours_g = _run(lambda h_, w_, b_: mntp_loss(h_, w_, y, bias=b_), (h, w, b), 1)
    tl = [_leaf(t) for t in (h, w, b)]
    liger, liger_g = _run(
        lambda h_, w_, b_: LigerFusedLinearCrossEntropyFunction.apply(h_, w_, y, b_, None, -100,
                                                                      0.0, 0.0, "mean")[0],
        tl,
        1,
    )  # fmt: skip
    torch.testing.assert_close(ours, liger, rtol=1e-5, atol=1e-5)
    for g, gl in zip(ours_g, liger_g):
        torch.testing.assert_close(g, gl, rtol=1e-4, atol=1e-6)
    for reduction in ("mean", "sum", "none"):
        got = mntp_loss(h.detach(), w.detach(), y, bias=b.detach(), reduction=reduction)
        want = F.cross_entropy(h.detach() @ w.detach().T + b.detach(), y, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if hasattr(F, "linear_cross_entropy"):
        want = F.linear_cross_entropy(
            h.detach(), w.detach(), y, linear_bias=b.detach(), ignore_index=-100
        )
        got = mntp_loss(h.detach(), w.detach(), y, bias=b.detach())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_liger_gpu_low_precision(device: torch.device, dtype: torch.dtype) -> None:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    h, w, _, y = _inputs(device, dtype, shape=(4096,), d=1024, vocab=32003, labelled=0.3)
    ours, ours_g = _run(lambda h_, w_: mntp_loss(h_, w_, y, softcap=30.0), (h, w), 1)
    tl = [_leaf(t) for t in (h, w)]
    liger, liger_g = _run(
        lambda h_, w_: LigerFusedLinearCrossEntropyFunction.apply(h_, w_, y, None, None, -100,
                                                                  0.0, 0.0, "mean", 30.0)[0],
        tl,
        1,
    )  # fmt: skip
    ref, ref_g = _run(
        lambda h_, w_: mntp_loss_reference(h_, w_, y, softcap=30.0), [_leaf64(h), _leaf64(w)], 1
    )
    assert_close_to_ref(ours, ref, liger, name="loss")
    for name, g, g64, gl in zip(("dhidden", "dweight"), ours_g, ref_g, liger_g):
        assert_close_to_ref(g, g64, gl, name=name, atol=ATOL[dtype] * g64.abs().max().item())


@pytest.mark.gpu
def test_gpu_memory_target(device: torch.device) -> None:
    """V = 151,936, 32k tokens, 30% labelled, d = 1024, bf16: < 64 MB beyond inputs and grads."""
    h, w, _, y = _inputs(device, torch.bfloat16, shape=(32768,), d=1024, vocab=151936,
                         labelled=0.3)  # fmt: skip
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dh, dw = torch.autograd.grad(mntp_loss(h, w, y), (h, w))
    torch.cuda.synchronize()
    beyond = torch.cuda.max_memory_allocated() - base - dh.nbytes - dw.nbytes
    assert beyond < 64 * 2**20, f"{beyond / 2**20:.1f} MB beyond inputs and gradients"


def _largest_allocation(fn) -> int:  # noqa: ANN001
    """Bytes of the largest single allocation any op makes while `fn()` runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    return max(
        max(e.self_cpu_memory_usage, getattr(e, "self_device_memory_usage", 0))
        for e in prof.events()
    )


def test_never_allocates_rows_by_vocab(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    # d = 16 keeps [V, d] (weight, its gradient) far below rows x V; a 64 KB scratch budget makes
    # the dlogits chunk (the backward's largest buffer) 128 x 128 at these toy sizes
    monkeypatch.setattr(mntp_triton, "_SCRATCH_BYTES", 2**16)
    h, w, b, y = _inputs(device, torch.float32, d=16, labelled=0.5, bias=True)
    rows_by_v = ROWS * V * 4
    naive = _largest_allocation(lambda: _torch_formula(h, w, y, b, None, "mean").backward())
    assert naive >= rows_by_v, "the detector must see the unfused [rows, V] logits"
    h.grad = w.grad = b.grad = None
    ours = _largest_allocation(lambda: mntp_loss(h, w, y, bias=b, softcap=5.0).backward())
    assert ours < rows_by_v / 4, f"largest allocation {ours} B is close to rows x V"


def test_frozen_inputs_skip_their_gradients(device: torch.device) -> None:
    """A frozen lm_head (or frozen hidden states) gets no gradient and its kernel is skipped."""
    h, w, b, y = _inputs(device, torch.float32, shape=(40,), d=24, vocab=101, bias=True)
    full, full_g = _run(lambda *a: mntp_loss(a[0], a[1], y, bias=a[2]), (h, w, b), 1)
    hf = _leaf(h)
    mntp_loss(hf, w.detach(), y, bias=b.detach()).backward()
    torch.testing.assert_close(hf.grad, full_g[0])
    wf, bf = _leaf(w), _leaf(b)
    mntp_loss(h.detach(), wf, y, bias=bf).backward()
    torch.testing.assert_close(wf.grad, full_g[1])
    torch.testing.assert_close(bf.grad, full_g[2])
    grads = torch.ops.bidirlm.mntp_loss_bwd(
        torch.ones(40, device=device), h.detach(), w.detach(), None, y,
        torch.zeros(40, device=device), -100, 0.0, False, True,
    )  # fmt: skip
    assert [g.numel() for g in grads] == [0, w.numel(), 0]


def test_launch_configs_fit_the_chunks() -> None:
    """Every fixed and autotune tile divides its family's chunk alignment (a launch never indexes
    past the `[Rc, Vc]` dlogits buffer); tl.dot needs every dimension >= 16; AMD: one stage."""
    families = mntp_triton._CONFIGS
    assert set(families) == {"hopper", "ampere", "nvidia", "cdna", "amd", "interpreter"}
    for fam in families.values():
        assert fam.max_chunk % fam.align == 0
        for cfg in (fam.fwd, fam.gemm):
            assert fam.align % cfg.block_m == 0
            for size in (cfg.block_m, cfg.block_n, cfg.block_k):
                assert size >= 16 and size & (size - 1) == 0
        assert fam.align % fam.fwd.block_n == 0
    for name, cfg in mntp_triton._FP32_TILES.items():  # float32 (FMA dots) tiles
        assert families[name].align % cfg.block_m == 0 and families[name].align % cfg.block_n == 0
    for cfg in mntp_triton._autotune_configs():
        assert 256 % cfg.kwargs["BLOCK_M"] == 0 and 256 % cfg.kwargs["BLOCK_V"] == 0
    for name in ("cdna", "amd"):
        for cfg in (families[name].fwd, families[name].gemm):
            assert cfg.num_stages == 1 and cfg.num_warps <= 8


def test_compile_fullgraph(device: torch.device) -> None:
    """torch.compile traces the custom ops (fake impls + registered autograd) without breaks."""
    h, w, b, y = _inputs(device, torch.float32, shape=(3, 11), d=16, vocab=50, bias=True)

    def step(h_, w_, b_):  # noqa: ANN001, ANN202
        return mntp_loss(h_, w_, y, bias=b_, softcap=4.0) * 2.0

    def step_options(h_, w_, b_):  # noqa: ANN001, ANN202
        out = mntp_loss(h_, w_, y, bias=b_, label_smoothing=0.1, lse_square_scale=1e-2,
                        return_z_loss=True, return_token_accuracy=True)  # fmt: skip
        return out.loss + out.z_loss + 0.0 * out.token_accuracy

    for fn in (step, step_options):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got, got_g = _run(compiled, [_leaf(t) for t in (h, w, b)], 1)
        want, want_g = _run(fn, [_leaf(t) for t in (h, w, b)], 1)
        torch.testing.assert_close(got, want)
        for g, gw in zip(got_g, want_g):
            torch.testing.assert_close(g, gw)


def test_opcheck(device: torch.device) -> None:
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    h, w, b, y = _inputs(device, torch.float32, shape=(20,), d=16, vocab=50, bias=True)
    y = y.reshape(-1)
    torch.library.opcheck(
        torch.ops.bidirlm.mntp_loss_fwd, (h.reshape(-1, 16), w, b, y, -100, 2.0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip


def test_torch_path_same_op(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    """BIDIRLM_KERNELS=torch runs the chunked reference through the same custom op."""
    h, w, b, y = _inputs(device, torch.float32, shape=(5, 13), d=24, vocab=101, bias=True)
    args = {"bias": b, "softcap": 3.0, "reduction": "none"}
    upstream = torch.randn(5, 13, device=device)
    got, got_g = _run(lambda h_, w_, b_: mntp_loss(h_, w_, y, **{**args, "bias": b_}),
                      (h, w, b), upstream)  # fmt: skip
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    tt = [_leaf(t) for t in (h, w, b)]
    ref, ref_g = _run(lambda h_, w_, b_: mntp_loss(h_, w_, y, **{**args, "bias": b_}), tt, upstream)
    torch.testing.assert_close(got, ref)
    for g, gr in zip(got_g, ref_g):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-6)
    # float64 is allowed on the torch path and is the reference itself
    t64 = [_leaf64(t) for t in (h, w, b)]
    f64 = mntp_loss(t64[0], t64[1], y, bias=t64[2], softcap=3.0)
    assert f64.dtype == torch.float64
    torch.testing.assert_close(f64, mntp_loss_reference(*t64[:2], y, bias=t64[2], softcap=3.0))


def test_module_and_non_contiguous(device: torch.device) -> None:
    h, w, _, y = _inputs(device, torch.float32, shape=(7, 9), d=24, vocab=101)
    loss_fn = MNTPLoss(reduction="sum", softcap=5.0)
    assert "softcap=5.0" in repr(loss_fn)
    hn = h.detach().transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided
    assert not hn.is_contiguous()
    yn = torch.stack([y, y], dim=-1)[..., 0]  # strided labels
    assert not yn.is_contiguous()
    got = loss_fn(hn, w.detach(), yn.int())
    want = mntp_loss(h.detach(), w.detach(), y, reduction="sum", softcap=5.0)
    torch.testing.assert_close(got, want)


def test_module_name_collision_is_harmless() -> None:
    # The submodule bidirlm.kernels.mntp_loss was imported above; the package attribute must
    # still be the function, whatever the import order.
    import bidirlm.kernels as kernels
    from bidirlm.kernels import mntp_loss as public

    assert public is mntp_module.mntp_loss and kernels.mntp_loss is mntp_module.mntp_loss
    h, w = torch.randn(3, 8), torch.randn(11, 8)
    y = torch.tensor([1, -100, 4])
    want = mntp_loss_reference(h, w, y)
    for fn in (public, kernels.mntp_loss):
        torch.testing.assert_close(fn(h, w, y), want)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"weight": torch.randn(50, 15)}, "width"),
        ({"weight": torch.randn(50)}, "weight"),
        ({"labels": torch.zeros(4, dtype=torch.long)}, "labels shape"),
        ({"labels": torch.zeros(2, 3)}, "labels must be int"),
        ({"hidden": torch.zeros(2, 3, 16, dtype=torch.long)}, "hidden dtype"),
        ({"weight": torch.randn(50, 16, dtype=torch.float16)}, "weight dtype"),
        ({"bias": torch.randn(49)}, "bias"),
        ({"bias": torch.randn(50, dtype=torch.float16)}, "bias dtype"),
        ({"reduction": "avg"}, "reduction"),
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": -1.0}, "softcap"),
        ({"labels": torch.full((2, 3), 50)}, r"labels must be in \[0, 50\)"),
        ({"labels": torch.full((2, 3), -5)}, "found -5"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"lse_square_scale": -1.0}, "lse_square_scale"),
        ({"return_z_loss": "yes"}, "return_z_loss"),
        ({"return_token_accuracy": 1}, "return_token_accuracy"),
    ],
)
def test_errors(change: dict, match: str) -> None:
    args = {
        "hidden": torch.randn(2, 3, 16),
        "weight": torch.randn(50, 16),
        "labels": torch.zeros(2, 3, dtype=torch.long),
    }
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        mntp_loss(hidden, weight, labels, **args)


def test_gradient_filtering_error_bound(device: torch.device) -> None:
    """filter_eps (off by default) skips dlogits tiles whose entries are all <= eps * |g|: the
    gradients move by at most eps * |g| * sum |other operand| per entry, and tiles are skipped
    (the result differs from the exact one). Logits concentrated on the first vocabulary tile
    (as a trained model's are on a few tokens) leave the other tiles below eps."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 70, 32, 600
    u = torch.randn(d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.05
    w[:128] += u * 0.4
    h = u[None, :] * 2.0 + torch.randn(n, d, generator=g) * 0.3
    b = torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, 128, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    leaves = lambda: [t.to(device).clone().requires_grad_() for t in (h, w, b)]  # noqa: E731
    exact, filtered = leaves(), leaves()
    mntp_loss(exact[0], exact[1], y.to(device), bias=exact[2], reduction="sum").backward()
    eps = 1e-3
    loss = mntp_loss(filtered[0], filtered[1], y.to(device), bias=filtered[2], reduction="sum",
                     filter_eps=eps)  # fmt: skip
    loss.backward()
    labelled = (y != -100).to(device).float()  # |g| = 1 per labelled row ("sum")
    bound_dh = eps * labelled[:, None] * w.abs().sum(0).to(device)[None, :]
    bound_dw = eps * (labelled[:, None] * h.to(device).abs()).sum(0)[None, :]
    delta = [(f.grad - e.grad).abs() for f, e in zip(filtered, exact)]
    assert (delta[0] <= bound_dh + 1e-6).all(), (delta[0] - bound_dh).max()
    assert (delta[1] <= bound_dw + 1e-6).all(), (delta[1] - bound_dw).max()
    assert (delta[2] <= eps * labelled.sum() + 1e-6).all()
    assert delta[1].max() > 0, "no tile was filtered"
    torch.testing.assert_close(loss, mntp_loss(h.to(device), w.to(device), y.to(device),
                                               bias=b.to(device), reduction="sum"))  # fmt: skip


class _CountLaunches:
    """Counts real Triton launches: the `run` of compiled and interpreted kernels wrapped (the
    kernel still runs; `kernel[grid](...)` goes through `run` in both)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.names: list[str] = []
        for cls in (JITFunction, InterpretedFunction):
            monkeypatch.setattr(cls, "run", self._counting(cls.run))

    def _counting(self, original):  # noqa: ANN001, ANN202
        def run(fn, *args, **kwargs):  # noqa: ANN001, ANN202
            self.names.append(fn.fn.__name__)
            return original(fn, *args, **kwargs)

        return run

    def take(self) -> list[str]:
        out, self.names[:] = list(self.names), []
        return out


@pytest.mark.parametrize("give_count", [True, False], ids=["num_labelled", "no-count"])
def test_launches_do_not_grow_with_the_batch(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, give_count: bool
) -> None:
    """Triton launches of the forward and of the backward, counted as they run, at 64 and 1100
    rows, 30% labelled (1100 is past the interpreter's 512-row chunk of the former plan): the
    forward is 2 launches whatever the rows; the backward 2 per vocabulary chunk, the chunks set
    by the vocabulary, not the rows."""
    if device.type != "cpu":
        pytest.skip("counts the interpreter's launches (same launchers on a GPU)")
    counter = _CountLaunches(monkeypatch)
    counts = []
    for n in (64, 1100):
        h, w, _, y = _inputs(device, torch.float16, shape=(n,), d=32, vocab=700, labelled=0.3)
        kw = {"num_labelled": int((y != -100).sum())} if give_count else {}
        loss = mntp_loss(h, w, y, **kw)
        fwd = counter.take()
        loss.backward()
        bwd = counter.take()
        assert fwd == ["_mntp_fwd_kernel", "_mntp_merge_kernel"], fwd
        counts.append((len(fwd), len(bwd)))
    assert counts[0] == counts[1], f"launches grow with the batch: {counts}"
    assert counts[0][1] == 2 * 2, counts  # V = 700 is 2 chunks of 512 in the interpreter


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_bf16_grad_error_within_2x_torch(device: torch.device, softcap: float | None) -> None:
    """bf16 on a seeded grid (6 seeds): the dW and dH errors against float64 are at most 2x
    torch's own bf16 error (`F.cross_entropy` on the bf16 logits, the same formula in bf16).
    In the interpreter the kernels keep dlogits in float32 (its bf16 stores do not round to
    nearest); on a GPU they are bf16, as torch's."""
    worst = 0.0
    for seed in range(6):
        h, w, _, y = _inputs(device, torch.bfloat16, shape=(48,), d=32, vocab=300,
                             labelled=0.4, seed=seed)  # fmt: skip
        ours = _run(lambda h_, w_, y=y: mntp_loss(h_, w_, y, softcap=softcap),
                    [_leaf(h), _leaf(w)], 1)  # fmt: skip
        theirs = _run(lambda h_, w_, y=y: _torch_formula(h_, w_, y, None, softcap, "mean"),
                      [_leaf(h), _leaf(w)], 1)  # fmt: skip
        ref = _run(lambda h_, w_, y=y: mntp_loss_reference(h_, w_, y, softcap=softcap),
                   [_leaf64(h), _leaf64(w)], 1)  # fmt: skip
        for g, gt, g64 in zip(ours[1], theirs[1], ref[1]):
            err = (g.double() - g64).abs().max().item()
            err_torch = (gt.double() - g64).abs().max().item()
            assert err <= 2 * err_torch + 1e-6, (seed, err, err_torch)
            worst = max(worst, err / max(err_torch, 1e-30))
    assert worst > 0.0


def test_profiler_range_and_compile_with_count(device: torch.device) -> None:
    """The op runs inside `record_function("bidirlm.mntp_loss")` (eager and compiled), and
    torch.compile(fullgraph=True) traces the new options (num_labelled, filter_eps)."""
    h, w, _, y = _inputs(device, torch.float32, shape=(30,), d=16, vocab=50, labelled=0.4)
    n_lab = int((y != -100).sum())
    with torch.profiler.profile() as prof:
        mntp_loss(h.detach(), w.detach(), y)
    assert any(e.name == "bidirlm.mntp_loss" for e in prof.events())

    def step(h_, w_):  # noqa: ANN001, ANN202
        return mntp_loss(h_, w_, y, num_labelled=n_lab, filter_eps=1e-6, softcap=5.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_g = _run(compiled, [_leaf(h), _leaf(w)], 1)
    want, want_g = _run(step, [_leaf(h), _leaf(w)], 1)
    torch.testing.assert_close(got, want)
    for g, gw in zip(got_g, want_g):
        torch.testing.assert_close(g, gw)


@pytest.mark.parametrize("vocab", [50, 256, 384, 1003])
def test_vocab_tail_tile(device: torch.device, vocab: int) -> None:
    """The forward runs full vocabulary tiles unmasked and masks only a split's partial last
    tile: V smaller than one tile (a tail only), exact multiples (no tail) and V = 1003 (a
    tail after full tiles), with smoothing, z-loss and accuracy (their masked and unmasked
    sums and argmax) and without (plain cross entropy: the backward's target overwrite)."""
    h, w, _, y = _inputs(device, torch.float32, shape=(67,), d=40, vocab=vocab, labelled=0.6)
    y[:3] = torch.tensor([0, vocab - 1, vocab // 2], device=y.device)  # first, last, middle
    up = (torch.rand(y.shape) + 0.5).to(device)
    ours, ours_g = _run(lambda h_, w_: mntp_loss(h_, w_, y, reduction="none"), (h, w), up)
    t64 = [_leaf64(t) for t in (h, w)]
    ref, ref_g = _run(lambda h_, w_: mntp_loss_reference(h_, w_, y, reduction="none"), t64,
                      up.double())  # fmt: skip
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    for g, g64 in zip(ours_g, ref_g):
        torch.testing.assert_close(g, g64.float(), rtol=1e-5, atol=1e-6 * g64.abs().max().item())
    kw = {"reduction": "none", "label_smoothing": 0.1, "lse_square_scale": 1e-3}
    hs, ws = _leaf(h), _leaf(w)
    out = mntp_loss(hs, ws, y, return_z_loss=True, return_token_accuracy=True, **kw)
    t64 = [_leaf64(t) for t in (h, w)]
    ref_loss, ref_z, ref_acc = _options_float64(t64[0], t64[1], y, None, None, "none", 0.1, 1e-3)
    torch.testing.assert_close(out.loss, ref_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.z_loss, ref_z.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_accuracy, ref_acc.float(), rtol=0, atol=1e-6)
    ours_g = torch.autograd.grad((out.loss * up).sum(), (hs, ws))
    ref_g = torch.autograd.grad((ref_loss * up.double()).sum(), t64)
    for g, g64 in zip(ours_g, ref_g):
        torch.testing.assert_close(g, g64.float(), rtol=1e-5, atol=1e-6 * g64.abs().max().item())


def test_target_overwrite_matches_the_compare_path(device: torch.device) -> None:
    """Plain cross entropy's dlogits take the target entry from the forward's per-row loss
    (`row_loss`, FIX_TARGET) instead of a compare per logit: both paths give the same
    gradients, with and without the z-loss's lse gradient, labels in every chunk."""
    h, w, _, y = _inputs(device, torch.float32, shape=(90,), d=48, vocab=700, labelled=0.5)
    loss, lse, _ = mntp_triton._triton_forward(h.detach(), w.detach(), None, y, -100, 0.0)
    grad = torch.rand(90, device=device) + 0.5
    for glse in (None, torch.rand(90, device=device)):
        fixed = mntp_triton._triton_backward(grad, h.detach(), w.detach(), None, y, lse, -100,
                                             0.0, grad_lse=glse, row_loss=loss)  # fmt: skip
        compared = mntp_triton._triton_backward(grad, h.detach(), w.detach(), None, y, lse, -100,
                                                0.0, grad_lse=glse)  # fmt: skip
        for a, b in zip(fixed[:2], compared[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_perf_model_counts_sass_by_pipe() -> None:
    """bench/perf_model_losses.py charges SASS per pipe: a synthetic listing with an entry
    branch, a K loop (HGMMA) nested in a tile loop and two exits; loop bodies are counted once
    per iteration without their nested loops, the code outside loops along its longest path."""
    pm = pytest.importorskip("bench.perf_model_losses")
    body = [
        "S2R R0, SR_TID.X",  # 0x00
        "@P0 BRA 0x0060",  # 0x10: skips the two below
        "IMAD R1, R0, R0, RZ",  # 0x20
        "IMAD R2, R0, R1, RZ",  # 0x30
        "@P1 EXIT",  # 0x40
        "NOP",  # 0x50
        "FMNMX R3, R3, R4, !PT",  # 0x60: tile loop starts
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",  # 0x70: K loop
        "IADD3 R5, R5, 0x1, RZ",  # 0x80
        "@P2 BRA 0x0070",  # 0x90: K loop back edge
        "FFMA R6, R3, 1.44, -R7",  # 0xa0
        "MUFU.EX2 R6, R6",  # 0xb0
        "FADD R8, R8, R6",  # 0xc0
        "@P3 BRA 0x0060",  # 0xd0: tile loop back edge
        "EXIT",  # 0xe0
    ]
    sass = "\n".join(f"        /*{16 * i:04x}*/  {t} ;  /* 0x0 */" for i, t in enumerate(body))
    k = pm.analyze_kernel_sass("synthetic", sass)
    assert [(lp.lo, lp.hi) for lp in k.loops] == [(0x60, 0xD0), (0x70, 0x90)]
    (kl,) = k.k_loops()
    assert k.loops[kl].own == pm.Ops(total=3, alu=1)  # HGMMA, IADD3, BRA
    tile = k.loops[k.loops[kl].parent].own  # FMNMX, FFMA, MUFU, FADD, BRA
    assert tile == pm.Ops(total=5, fp32=2, alu=1, xu=1)
    assert tile.binding(2) == "xu" and tile.clocks(2) == 2 * 8
    # outside the loops: the longest path takes the two IMADs (S2R BRA IMAD IMAD EXIT NOP EXIT)
    assert k.outside == pm.Ops(total=7, imad=2)
    assert k.outside.pipe_clocks(1.0)["imad"] == 4


def test_per_row_loss_changed_in_place_keeps_gradients(device: torch.device) -> None:
    """The backward of plain cross entropy reads the forward's per-row loss; a caller who
    scales the returned per-row loss in place (reduction="none") still gets the gradients of
    what it computed, as with torch's own cross entropy."""
    h, w, _, y = _inputs(device, torch.float32, shape=(50,), d=32, vocab=300, labelled=0.6)
    scale = (torch.rand(50) + 0.5).to(device)
    hs, ws = _leaf(h), _leaf(w)
    loss = mntp_loss(hs, ws, y, reduction="none")
    loss.mul_(scale)  # in place on the op's output view
    loss.sum().backward()
    ref_g = torch.autograd.grad((mntp_loss(h, w, y, reduction="none") * scale).sum(), (h, w))
    for g, r in zip((hs.grad, ws.grad), ref_g):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("splits", [2, 4])
def test_forward_with_an_empty_vocabulary_split(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, splits: int
) -> None:
    """V = 600 is 5 vocabulary tiles of 128 (interpreter) and 4 splits of 2 tiles leave the last
    split empty (its log-sum-exp -inf, no tail tile run); 2 splits put the partial tile in the
    second. Loss, accuracy and gradients match float64 either way."""
    if device.type == "cuda":
        pytest.skip("the interpreter's 128-wide vocabulary tiles make the split layout")
    plan_of = mntp_triton._fwd_plan_of
    monkeypatch.setattr(
        mntp_triton,
        "_fwd_plan_of",
        lambda *a: dataclasses.replace(plan_of(*a), splits=splits),
    )
    h, w, _, y = _inputs(device, torch.float32, shape=(70,), d=40, vocab=600, labelled=0.5)
    y[:2] = torch.tensor([599, 0], device=y.device)
    out = mntp_loss(h, w, y, reduction="none", label_smoothing=0.1, return_token_accuracy=True)
    t64 = [_leaf64(t) for t in (h, w)]
    ref_loss, _, ref_acc = _options_float64(t64[0], t64[1], y, None, None, "none", 0.1, 0.0)
    torch.testing.assert_close(out.loss, ref_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.token_accuracy, ref_acc.float(), rtol=0, atol=1e-6)
    g = torch.autograd.grad(out.loss.sum(), (h, w))
    g64 = torch.autograd.grad(ref_loss.sum(), t64)
    for a, b in zip(g, g64):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6 * b.abs().max().item())


@triton.jit
def _poly(x_ptr, y_ptr, s_ptr, N: tl.constexpr, LOG: tl.constexpr):
    r = tl.arange(0, 8)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + r)
    tl.store(y_ptr + r, exp2_poly(x))
    tl.store(s_ptr + tl.arange(0, 8), row_sum_exp2(x, LOG, False))


def test_exp2_poly_matches_float64() -> None:
    """The FMA-pipe exp2 of `exp2_triton` (the forward's share of exponentials on Hopper): within
    3e-7 relative of float64 over [-126, 0] (as `ex2.approx`), about 2**-126 below (where the
    FTZ hardware exp2 gives 0); `row_sum_exp2` with every column split sums the same."""
    if not mntp_triton.interpreting():
        pytest.skip("runs the helper in the interpreter (the GPU path is the forward's own test)")
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(8, 128, generator=g, dtype=torch.float64) * 126.0
    x[0, :64] = torch.linspace(-1.0, 0.0, 64, dtype=torch.float64)  # small f, both rounding ways
    x[1, :4] = torch.tensor([-126.0, -125.5, -0.5, 0.0], dtype=torch.float64)
    x32 = x.float()
    want = torch.exp2(x32.double())
    for log in range(4):
        y, s = torch.empty_like(x32), torch.empty(8)
        _poly[(1,)](x32, y, s, N=128, LOG=log)
        rel = ((y.double() - want) / want).abs().max().item()
        assert rel < 3e-7, rel
        torch.testing.assert_close(s.double(), want.sum(1), rtol=3e-7, atol=0)
    below = torch.tensor([[-126.9, -200.0, -1e30, float("-inf")] * 32] * 8)
    y = torch.empty_like(below)
    _poly[(1,)](below, y, torch.empty(8), N=128, LOG=0)
    torch.testing.assert_close(y, torch.full_like(y, 2.0**-126), rtol=1e-6, atol=0)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_forward_with_fma_pipe_exp2(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, softcap: float | None
) -> None:
    """The forward's full vocabulary tiles with 1/8, 1/4 and 1/2 of their exp2 on the FMA pipe
    (`fwd_poly_log`, 3 on Hopper): loss, lse-based options and gradients match float64 as with
    every exp2 on MUFU (V = 1003: full tiles and a masked tail, which stays on MUFU)."""
    if device.type == "cuda":
        pytest.skip("sets the interpreter family's split (the GPU runs its own)")
    h, w, b, y = _inputs(device, torch.float32, shape=(70,), d=40, labelled=0.6, bias=True)
    t64 = [_leaf64(t) for t in (h, w, b)]
    ref_loss, ref_z, ref_acc = _options_float64(t64[0], t64[1], y, t64[2], softcap, "none", 0.1,
                                                1e-3)  # fmt: skip
    ref_g = torch.autograd.grad(ref_loss.sum(), t64)
    fam = mntp_triton._CONFIGS["interpreter"]
    assert fam.fwd_poly_log == 0
    mufu = mntp_loss(h, w, y, bias=b, softcap=softcap, reduction="none").detach()
    for log in (1, 2, 3):
        monkeypatch.setitem(
            mntp_triton._CONFIGS, "interpreter", dataclasses.replace(fam, fwd_poly_log=log)
        )
        hs, ws, bs = _leaf(h), _leaf(w), _leaf(b)
        out = mntp_loss(hs, ws, y, bias=bs, softcap=softcap, reduction="none",
                        label_smoothing=0.1, lse_square_scale=1e-3, return_z_loss=True,
                        return_token_accuracy=True)  # fmt: skip
        torch.testing.assert_close(out.loss, ref_loss.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.z_loss, ref_z.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.token_accuracy, ref_acc.float(), rtol=0, atol=1e-6)
        # as close to the all-MUFU forward as float32 allows (the polynomial's error is ex2's)
        plain = mntp_loss(h, w, y, bias=b, softcap=softcap, reduction="none").detach()
        torch.testing.assert_close(plain, mufu, rtol=0, atol=2e-6)
        g = torch.autograd.grad(out.loss.sum(), (hs, ws, bs))
        for a, r in zip(g, ref_g):
            torch.testing.assert_close(a, r.float(), rtol=1e-5, atol=1e-6 * r.abs().max().item())
