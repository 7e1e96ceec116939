"""bidirlm.kernels.flash_attn_compat against a float64 reference of flash-attn's documented rules.

flash-attn does not install on a CPU machine, so the reference below is written from its
docstrings (flash_attn_interface.py): query i sits at key position `i + Sk - Sq` (bottom-right
alignment), sees key j iff `i + Sk - Sq - window[0] <= j <= i + Sk - Sq + window[1]` (negative:
unbounded; causal sets window[1] = 0), softcap caps the scaled scores, ALiBi adds
`-slope * |i + Sk - Sq - j|`. Kernels run in the Triton interpreter without a GPU (32x32 tiles).
"""

from __future__ import annotations

import pytest
import torch

from bidirlm.kernels import flash_attn_func as bidirlm_flash_attn_func
from bidirlm.kernels.flash_attn_compat import (
    alibi_slopes_for,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from tests.helpers import assert_close_to_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def fa_reference(q, k, v, *, scale=None, causal=False, window=(-1, -1), softcap=0.0,
                 alibi=None, kpm=None):  # fmt: skip
    """flash-attn's documented semantics, dense, in the inputs' dtype -> (out, lse)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    left, right = window
    if causal:
        right = 0
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        vis &= j >= pos - left
    if right >= 0:
        vis &= j <= pos + right
    vis = vis.expand(b, h, sq, sk).clone()
    if alibi is not None:
        slopes = alibi.to(s.dtype).expand(b, h) if alibi.dim() == 1 else alibi.to(s.dtype)
        s = s - slopes[:, :, None, None] * (pos - j).abs().to(s.dtype)
    if kpm is not None:
        vis &= kpm[:, None, None, :]
        if sq == sk:  # padded queries output zeros, as after flash-attn's pad_input
            vis &= kpm[:, None, :, None]
    any_key = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, float("-inf"))
    s = torch.where(any_key, s, torch.zeros((), dtype=s.dtype))
    p = torch.softmax(s, -1) * any_key
    lse = torch.logsumexp(s, -1).masked_fill(~any_key[..., 0], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def varlen_reference(q, k, v, cu_q, cu_k, **kw):
    outs, lses = [], []
    for n in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[n]), int(cu_q[n + 1]), int(cu_k[n]), int(cu_k[n + 1])
        kw_n = dict(kw)
        if kw.get("alibi") is not None and kw["alibi"].dim() == 2:
            kw_n["alibi"] = kw["alibi"][n : n + 1]
        o, lse = fa_reference(q[None, a:b], k[None, c:e], v[None, c:e], **kw_n)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def _inputs(shape_q, shape_kv, dtype, scale=1.0):
    q = (torch.randn(shape_q) * scale).to(dtype).requires_grad_()
    k = (torch.randn(shape_kv) * scale).to(dtype).requires_grad_()
    v = torch.randn(shape_kv).to(dtype).requires_grad_()
    return q, k, v


def check(call, ref_call, inputs, factor=2.0):
    """out, lse and the grads of every input vs float64; bound from the reference in q.dtype."""
    out, lse, none = call(*inputs)
    assert none is None
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    out64, lse64 = ref_call(*x64)
    grads64 = torch.autograd.grad(out64, x64, dout.double())
    low = [t.detach().clone().requires_grad_() for t in inputs]
    out_pt, _ = ref_call(*low)
    grads_pt = torch.autograd.grad(out_pt, low, dout)
    assert_close_to_ref(out, out64, out_pt, factor=factor, name="out")
    for name, g, g64, gpt in zip("qkv", grads, grads64, grads_pt):
        assert_close_to_ref(g, g64, gpt, factor=factor, name=f"d{name}")
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    # flash-attn's convention: a query without visible keys has lse = +inf
    assert torch.equal(torch.isposinf(lse), torch.isneginf(lse64)) and not lse.isneginf().any()
    fin = torch.isfinite(lse64)
    torch.testing.assert_close(lse[fin], lse64[fin].float(), atol=1e-3, rtol=1e-3)
    return out, grads


CROSS = [
    # (B, Sq, Sk, Hq, Hkv, D), dtype, causal, window
    ((1, 9, 37, 2, 1, 32), F16, True, (-1, -1)),  # Sq < Sk: each query sees a long prefix
    ((2, 40, 23, 2, 2, 16), BF16, True, (-1, -1)),  # Sq > Sk: the first 17 queries see nothing
    ((1, 30, 45, 2, 1, 24), F32, False, (4, 2)),  # window around i + 15
]


@pytest.mark.parametrize("case,dtype,causal,window", CROSS, ids=["sq<sk", "sq>sk", "window"])
def test_cross_attention_bottom_right(case, dtype, causal, window):
    b, sq, sk, hq, hkv, d = case
    q, k, v = _inputs((b, sq, hq, d), (b, sk, hkv, d), dtype)
    out, _ = check(
        lambda q, k, v: flash_attn_func(
            q, k, v, causal=causal, window_size=window, return_attn_probs=True
        ),
        lambda q, k, v: fa_reference(q, k, v, causal=causal, window=window),
        (q, k, v),
    )
    if sq > sk and causal:
        assert torch.all(out[:, : sq - sk] == 0)


def test_positional_call_softcap_alibi_gqa():
    """flash-attn's positional order; ALiBi after the softcap; [B, H] slopes."""
    q, k, v = _inputs((2, 35, 4, 32), (2, 35, 2, 32), F32, scale=2.0)
    slopes = torch.rand(2, 4) * 0.5
    check(
        lambda q, k, v: flash_attn_func(
            q, k, v, 0.0, 0.2, False, (-1, -1), 4.0, slopes, False, True
        ),
        lambda q, k, v: fa_reference(q, k, v, scale=0.2, softcap=4.0, alibi=slopes),
        (q, k, v),
    )


def test_alibi_causal_standard_slopes():
    q, k, v = _inputs((1, 33, 3, 16), (1, 33, 3, 16), F16)
    slopes = alibi_slopes_for(3)
    assert torch.allclose(slopes, torch.tensor([2**-4, 2**-8, 2**-2]))  # 2 heads + 1 odd power
    check(
        lambda q, k, v: flash_attn_func(
            q, k, v, causal=True, alibi_slopes=slopes, return_attn_probs=True
        ),  # fmt: skip
        lambda q, k, v: fa_reference(q, k, v, causal=True, alibi=slopes),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=str)
def test_varlen_cross_attention(dtype):
    lq, lk = [3, 0, 21, 5, 4], [10, 4, 9, 0, 4]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _inputs((sum(lq), 2, 16), (sum(lk), 1, 16), dtype)
    slopes = torch.tensor([0.3, 0.05])
    check(
        lambda q, k, v: flash_attn_varlen_func(
            q,
            k,
            v,
            cu_q,
            cu_k,
            max(lq),
            max(lk),
            0.0,
            None,
            True,
            (6, -1),
            0.0,
            slopes,
            False,
            True,
        ),
        lambda q, k, v: varlen_reference(
            q, k, v, cu_q, cu_k, causal=True, window=(6, -1), alibi=slopes
        ),  # fmt: skip
        (q, k, v),
    )


def test_packed_variants_equal_unpacked():
    torch.manual_seed(1)
    qkv = torch.randn(2, 19, 3, 2, 16, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True, softcap=3.0)
    q, k, v = qkv.unbind(2)
    ref, _ = fa_reference(*(t.double() for t in (q, k, v)), causal=True, softcap=3.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), qkv)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-4, rtol=1e-4)

    q = torch.randn(2, 7, 2, 16)
    kv = torch.randn(2, 19, 2, 1, 16)
    out = flash_attn_kvpacked_func(q, kv, window_size=(3, 3))
    torch.testing.assert_close(
        out, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], window_size=(3, 3))
    )

    cu = torch.tensor([0, 5, 19], dtype=torch.int32)
    qkv_t = torch.randn(19, 3, 2, 16)
    out = flash_attn_varlen_qkvpacked_func(qkv_t, cu, 14, causal=True)
    ref = flash_attn_varlen_func(*qkv_t.unbind(1), cu, cu, 14, 14, causal=True)
    torch.testing.assert_close(out, ref)
    cu_k = torch.tensor([0, 8, 11], dtype=torch.int32)
    kv_t = torch.randn(11, 2, 1, 16)
    out, lse, _ = flash_attn_varlen_kvpacked_func(
        qkv_t[:, 0], kv_t, cu, cu_k, 14, 8, return_attn_probs=True
    )
    ref, ref_lse, _ = flash_attn_varlen_func(
        qkv_t[:, 0], kv_t[:, 0], kv_t[:, 1], cu, cu_k, 14, 8, return_attn_probs=True
    )
    torch.testing.assert_close(out, ref)
    assert lse.shape == (2, 19) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("api", ["bidirlm", "compat"])
def test_key_padding_mask_zeroes_padded_queries(api):
    q, k, v = _inputs((2, 37, 2, 16), (2, 37, 1, 16), F32)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::3] = False
    fn = bidirlm_flash_attn_func if api == "bidirlm" else flash_attn_func
    out = fn(q, k, v, key_padding_mask=mask, window_size=(-1, 4))
    assert torch.all(out[~mask] == 0) and torch.all(out[mask] != 0)
    ref, _ = fa_reference(*(t.detach().double() for t in (q, k, v)), window=(-1, 4), kpm=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(dq[~mask] == 0) and torch.all(dk[~mask] == 0) and torch.all(dv[~mask] == 0)


def test_torch_path_matches(monkeypatch):
    """BIDIRLM_KERNELS=torch runs the plain reference through the same ops (cross, ALiBi)."""
    q, k, v = _inputs((1, 12, 2, 16), (1, 20, 2, 16), F32)
    slopes = torch.tensor([0.1, 0.4])
    triton_out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, softcap=2.0)
    triton_g = torch.autograd.grad(triton_out.sum(), (q, k, v))
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    torch_out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, softcap=2.0)
    torch_g = torch.autograd.grad(torch_out.sum(), (q, k, v))
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(triton_g, torch_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_deterministic_flag_is_bitwise():
    q, k, v = _inputs((1, 40, 2, 16), (1, 25, 1, 16), BF16)
    dout = torch.randn(1, 40, 2, 16).to(BF16)
    runs = [
        torch.autograd.grad(
            flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


BAD = [
    ({"dropout_p": 0.1}, "dropout_p"),
    ({"dropout_p": True}, "dropout_p"),
    ({"causal": 1}, "causal"),
    ({"window_size": (3,)}, "window_size"),
    ({"alibi_slopes": torch.ones(3)}, "alibi_slopes"),
    ({"alibi_slopes": torch.ones(2, dtype=torch.float64)}, "alibi_slopes"),
    ({"softcap": -1.0}, "softcap"),
    ({"return_attn_probs": 1}, "return_attn_probs"),
    ({"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}, "key_padding_mask"),
]


@pytest.mark.parametrize("over,match", BAD, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD)])
def test_bad_dense_arguments(over, match):
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 6, 1, 16)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, k, **over)


def test_bad_varlen_arguments():
    q, k = torch.randn(8, 2, 16), torch.randn(6, 1, 16)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 10**9, 4)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 5, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flash_attn_varlen_func(q, k, k, cu_q, torch.tensor([0, 6], dtype=torch.int32), 5, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k.long(), 5, 4)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 5, 4, block_table=torch.zeros(1))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen_func(q, k, k, cu_q, cu_k, 5, 4, 0.5)
    with pytest.raises(ValueError, match="qkv"):
        flash_attn_varlen_qkvpacked_func(q, cu_q, 5)


def test_torch_compile_fullgraph_cross_alibi():
    """The extra op arguments (cu_seqlens_k, max_seqlen_k, alibi_slopes) trace with fake kernels."""
    q, k, v = _inputs((1, 9, 2, 16), (1, 13, 1, 16), F32)
    slopes = torch.tensor([0.2, 0.1])
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 13], dtype=torch.int32)

    def loss_fn(q, k, v):
        dense = flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 2.0, slopes)
        packed = flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 5, 7, causal=True)
        return dense.square().sum() + packed.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = loss_fn(q, k, v)
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, torch.autograd.grad(eager, (q, k, v))):
        torch.testing.assert_close(a, b)


# --- flash-attn's argument types, one import for both call forms, KV cache ----------------------


def test_tensor_and_numpy_arguments_as_flash_attn_takes_them():
    """window_size as a tensor / list / numpy ints, tensor softmax_scale and softcap, 0-d tensor
    max_seqlen: the same result as plain Python numbers."""
    import numpy as np

    q, k, v = _inputs((2, 21, 2, 16), (2, 30, 1, 16), F32)
    ref = flash_attn_func(q, k, v, 0.0, 0.3, True, (4, 2), 2.0, return_attn_probs=True)
    for window in (torch.tensor([4, 2]), [4, 2], np.array([4, 2]), (np.int64(4), np.int32(2))):
        got = flash_attn_func(
            q, k, v, torch.tensor(0.0), torch.tensor(0.3), np.bool_(True), window,
            torch.tensor(2.0), return_attn_probs=True,
        )  # fmt: skip
        torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=0, rtol=0)
    cu_q = torch.tensor([0, 9, 21], dtype=torch.int32)
    cu_k = torch.tensor([0, 14, 30], dtype=torch.int32)
    packed = (q[0], k[0], v[0], cu_q, cu_k)
    ref = flash_attn_varlen_func(*packed, 12, 16, causal=True, window_size=(3, 0))
    got = flash_attn_varlen_func(
        *packed, torch.tensor(12), np.int64(16), causal=True, window_size=torch.tensor([3, 0])
    )
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"window_size": torch.tensor([1.5, 2.0])}, "window_size"),
        ({"window_size": torch.tensor([1, 2, 3])}, "window_size"),
        ({"softmax_scale": torch.ones(2)}, "softmax_scale"),
        ({"causal": torch.tensor(1)}, "causal"),
    ],
    ids=["float-window", "3-window", "2-scale", "int-causal"],
)
def test_bad_tensor_arguments(over, match):
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, q, q, **over)


def test_lse_plus_inf_for_rows_without_keys():
    """flash-attn's convention (+inf) with return_attn_probs; bidirlm's (-inf) with return_lse."""
    q, k, v = _inputs((1, 9, 2, 16), (1, 4, 2, 16), F32)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.isposinf(lse[..., :5]).all() and torch.isfinite(lse[..., 5:]).all()
    assert torch.all(out[:, :5] == 0)
    _, lse_native = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.isneginf(lse_native[..., :5]).all()
    torch.testing.assert_close(lse_native[..., 5:], lse[..., 5:])
    with pytest.raises(ValueError, match="exclusive"):
        flash_attn_func(q, k, v, return_lse=True, return_attn_probs=True)


def test_package_names_are_the_superset():
    """`from bidirlm.kernels import flash_attn_func` is the flash-attn-compatible function and
    keeps bidirlm's documented keyword-only form; the varlen function tells its two forms apart."""
    import bidirlm.kernels as kernels
    from bidirlm.kernels import attention

    assert kernels.flash_attn_func is flash_attn_func
    assert kernels.flash_attn_varlen_func is flash_attn_varlen_func
    assert kernels.flash_attn_with_kvcache is flash_attn_with_kvcache
    q, k, v = _inputs((2, 19, 4, 16), (2, 19, 2, 16), F32)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 15:] = False
    kw = dict(softmax_scale=0.2, window_size=(5, 3), softcap=3.0, key_padding_mask=mask)
    strict = attention.flash_attn_func(q, k, v, deterministic=True, return_lse=True, **kw)
    superset = bidirlm_flash_attn_func(q, k, v, deterministic=True, return_lse=True, **kw)
    for a, b in zip(strict, superset):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32)
    packed = (q[0], k[0], v[0])
    strict = attention.flash_attn_varlen_func(*packed, cu, 12, window_size=(2, 2), return_lse=True)
    for got in (
        flash_attn_varlen_func(*packed, cu, 12, window_size=(2, 2), return_lse=True),
        flash_attn_varlen_func(
            *packed, cu_seqlens=cu, max_seqlen=12, window_size=(2, 2), return_lse=True
        ),  # fmt: skip
        flash_attn_varlen_func(*packed, cu, cu, 12, 12, window_size=(2, 2), return_lse=True),
    ):
        for a, b in zip(strict, got):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        flash_attn_varlen_func(*packed, cu, cu_seqlens=cu, max_seqlen=12)
    with pytest.raises(ValueError, match="max_seqlen_q is required"):
        flash_attn_varlen_func(*packed, cu, cu)
    with pytest.raises(ValueError, match="max_seqlen must be"):
        flash_attn_varlen_func(*packed, cu, -1)


def test_kvcache_matches_dense_call_and_writes_in_place():
    torch.manual_seed(3)
    q = torch.randn(2, 3, 4, 16)
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    k_new, v_new = torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    seqlens = torch.tensor([5, 11], dtype=torch.int32)
    before = k_cache.clone()
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True,
        return_softmax_lse=True,
    )  # fmt: skip
    for b, n in enumerate(seqlens.tolist()):
        assert torch.equal(k_cache[b, n : n + 3], k_new[b]) and torch.equal(v_cache[b, n : n + 3],
                                                                            v_new[b])  # fmt: skip
        assert torch.equal(k_cache[b, :n], before[b, :n])
        ref, ref_lse, _ = flash_attn_func(
            q[b : b + 1], k_cache[b : b + 1, : n + 3], v_cache[b : b + 1, : n + 3], causal=True,
            return_attn_probs=True,
        )  # fmt: skip
        torch.testing.assert_close(out[b : b + 1], ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[b : b + 1], ref_lse, atol=1e-6, rtol=1e-6)
    # an int cache_seqlens, no new keys
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=7)
    torch.testing.assert_close(out, flash_attn_func(q, k_cache[:, :7], v_cache[:, :7]))


@pytest.mark.parametrize(
    "over,match",
    [
        ({"block_table": torch.zeros(2, 1, dtype=torch.int32)}, "block_table"),
        ({"cache_leftpad": torch.zeros(2, dtype=torch.int32)}, "cache_leftpad"),
        ({"cache_seqlens": torch.tensor([5, 40], dtype=torch.int32)}, "cache_seqlens"),
        ({"cache_batch_idx": torch.tensor([0, 9], dtype=torch.int32)}, "cache_batch_idx"),
        ({"k": torch.randn(2, 1, 2, 16)}, "k and v"),
        ({"rotary_cos": torch.ones(20, 4), "rotary_sin": torch.ones(20, 4)}, "rotary"),
    ],
    ids=["block_table", "leftpad", "seqlens", "batch_idx", "k-alone", "rotary-no-k"],
)
def test_kvcache_refuses(over, match):
    q, cache = torch.randn(2, 1, 4, 16), torch.randn(2, 20, 2, 16)
    kwargs = {"cache_seqlens": 3, **over}
    with pytest.raises(ValueError, match=match):
        flash_attn_with_kvcache(q, cache, cache.clone(), **kwargs)
