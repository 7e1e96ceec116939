"""flash_attn_func / flash_attn_varlen_func against the float64 reference (DESIGN.md contract).

Without a GPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1); the
interpreter launch config uses 32x32 tiles, so lengths 33..100 cross block boundaries and tails.
The kernel's error must be at most 2x PyTorch's own error in the same dtype plus a small floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bidirlm.kernels import flash_attn_func, flash_attn_varlen_func
from bidirlm.kernels.attention_triton import (
    CONFIGS,
    _exp2_mixed,
    autotune_configs,
    pick_config,
)
from bidirlm.kernels.exp2_triton import exp2_poly_affine
from bidirlm.kernels.reference import attention_reference
from tests.helpers import DTYPES, assert_close_to_ref, count_triton_launches

HAS_GPU = torch.cuda.is_available()


def _inputs(shape_q, shape_kv, dtype, device, scale=1.0):
    q = (torch.randn(shape_q, device=device) * scale).to(dtype).requires_grad_()
    k = (torch.randn(shape_kv, device=device) * scale).to(dtype).requires_grad_()
    v = torch.randn(shape_kv, device=device).to(dtype).requires_grad_()
    return q, k, v


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _check_grads(q, k, v, grads, dout, dtype, **ref_kw):
    """Kernel dq/dk/dv vs the float64 reference, bound from torch's own error in `dtype`."""
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    grads64 = _grads(attention_reference(*inputs64, compute_dtype=torch.float64, **ref_kw),
                     inputs64, dout.double())  # fmt: skip
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grads_pt = _grads(attention_reference(*low, compute_dtype=dtype, **ref_kw), low, dout)
    for name, g, g64, g_pt in zip(("dq", "dk", "dv"), grads, grads64, grads_pt):
        assert_close_to_ref(g, g64, g_pt, name=name)


def check_against_reference(q, k, v, *, cu_seqlens=None, max_seqlen=None, factor=2.0, **kw):
    """Kernel out/lse/dq/dk/dv vs float64 reference; bound from torch's error in q.dtype."""
    ref_kw = {key: kw[key] for key in ("softmax_scale", "window_size", "softcap") if key in kw}
    if "key_padding_mask" in kw:
        ref_kw["key_padding_mask"] = kw["key_padding_mask"]
    if cu_seqlens is None:
        out, lse = flash_attn_func(q, k, v, return_lse=True, **kw)
    else:
        out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, return_lse=True, **kw)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)

    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attention_reference(
        *inputs64, cu_seqlens=cu_seqlens, return_lse=True, compute_dtype=torch.float64, **ref_kw
    )
    grads64 = _grads(out64, inputs64, dout.double())
    low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_pt = attention_reference(*low, cu_seqlens=cu_seqlens, compute_dtype=q.dtype, **ref_kw)
    grads_pt = _grads(out_pt, low, dout)

    assert_close_to_ref(out, out64, out_pt, factor=factor, name="out")
    for name, g, g64, g_pt in zip(("dq", "dk", "dv"), grads, grads64, grads_pt):
        assert_close_to_ref(g, g64, g_pt, factor=factor, name=name)
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), "lse: -inf rows differ"
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite], lse64[finite].float(), atol=1e-4, rtol=1e-4)
    return out, lse, grads


# (B, S, Hq, Hkv, D), dtype: odd lengths, GQA 2:1 and MQA, head dims that are not powers of two;
# every dtype on one case, the rest spread over dtypes to keep the interpreter time down.
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DENSE_CASES = [
    ((2, 17, 4, 2, 32), F32),
    ((2, 17, 4, 2, 32), F16),
    ((2, 17, 4, 2, 32), BF16),
    ((2, 1, 2, 1, 32), F16),
    ((1, 77, 2, 2, 80), F32),
    ((1, 77, 2, 2, 80), BF16),
    ((1, 100, 2, 1, 64), F16),
    ((1, 40, 2, 2, 128), BF16),
]


@pytest.mark.parametrize(
    "case,dtype",
    DENSE_CASES,
    ids=["b{}-s{}-hq{}-hkv{}-d{}".format(*c) + f"-{str(t)[6:]}" for c, t in DENSE_CASES],
)
def test_dense_matches_reference(case, dtype, device):
    b, s, hq, hkv, d = case
    q, k, v = _inputs((b, s, hq, d), (b, s, hkv, d), dtype, device)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_256(dtype, device):
    q, k, v = _inputs((1, 33, 2, 256), (1, 33, 1, 256), dtype, device)
    check_against_reference(q, k, v, window_size=(-1, 0))


def test_split_dkdv_backward(monkeypatch, device):
    """The two-launch dK/dV path (dV, then dK; sm_90 takes it at head dim 256) on a small head
    dim: GQA, a softcap and a window, against the float64 reference."""
    from bidirlm.kernels import attention_triton

    families = ("hopper", "ampere", "nvidia", "cdna", "amd", "interpreter")
    monkeypatch.setattr(attention_triton, "FUSED_DKDV_MAX_D", dict.fromkeys(families, 16))
    q, k, v = _inputs((1, 40, 4, 32), (1, 40, 2, 32), torch.bfloat16, device)
    check_against_reference(q, k, v, softcap=5.0, window_size=(12, 7), deterministic=True)
    # packed MQA: the dV / dK launches per q head on repeated K, V, summed per group
    q, k, v = _inputs((45, 4, 32), (45, 1, 32), torch.float32, device)
    cu = torch.tensor([0, 30, 45], dtype=torch.int32, device=device)
    check_against_reference(q, k, v, cu_seqlens=cu, max_seqlen=30, deterministic=True)


# Head dim 256 through the split dK/dV path (sm_90 takes it there: a dV launch, then a dK launch,
# each recomputing P; dQ from its own kernel; GQA/MQA per q head on repeated K, V). The
# interpreter's family fuses dK/dV, so FUSED_DKDV_MAX_D is lowered for every family. 45 tokens
# cross a 32-row block with a tail (the epilogue's row mask); float32: the reference gradients
# are float64, the kernel's are exact in the interpreter up to float32 rounding.
HD256_VARIANTS = {
    "dense": {},
    "gqa": {"hkv": 2},
    "mqa": {"hkv": 1, "deterministic": True},
    "window-softcap": {"window_size": (9, 4), "softcap": 5.0},
    "kpm": {"kpm": True},
    "alibi-cross": {"alibi": True, "sk": 38},
    "packed-window": {"packed": True, "window_size": (7, 7)},
    "packed-cross-gqa": {"packed": True, "hkv": 2, "cross": True},
}


@pytest.mark.parametrize("variant", list(HD256_VARIANTS), ids=list(HD256_VARIANTS))
def test_hd256_split_backward_variants(variant, monkeypatch, device):
    from bidirlm.kernels import attention_triton
    from bidirlm.kernels import flash_attn_compat as fa

    families = ("hopper", "ampere", "nvidia", "cdna", "amd", "interpreter")
    monkeypatch.setattr(attention_triton, "FUSED_DKDV_MAX_D", dict.fromkeys(families, 128))
    cfg = HD256_VARIANTS[variant]
    hq = 4 if "hkv" in cfg else 2
    hkv, d, f32 = cfg.get("hkv", hq), 256, torch.float32
    window, softcap = cfg.get("window_size", (-1, -1)), cfg.get("softcap", 0.0)
    det = cfg.get("deterministic", False)
    ref_kw: dict = {"window_size": window, "softcap": softcap}
    if cfg.get("packed"):
        cu = torch.tensor([0, 30, 45], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 20, 51], dtype=torch.int32, device=device) if "cross" in cfg else cu
        q, k, v = _inputs((45, hq, d), (int(cu_k[-1]), hkv, d), f32, device)
        out = fa.flash_attn_varlen_func(
            q, k, v, cu, cu_k, 30, int((cu_k[1:] - cu_k[:-1]).max()), window_size=window,
            softcap=softcap, deterministic=det,
        )  # fmt: skip
        ref_kw.update(cu_seqlens=cu, cu_seqlens_k=cu_k)
    else:
        sk = cfg.get("sk", 45)
        q, k, v = _inputs((1, 45, hq, d), (1, sk, hkv, d), f32, device)
        slopes = torch.linspace(0.05, 0.3, hq, device=device) if cfg.get("alibi") else None
        kpm = None
        if cfg.get("kpm"):
            kpm = torch.ones(1, sk, dtype=torch.bool, device=device)
            kpm[0, 37:] = False
        out = fa.flash_attn_func(
            q, k, v, window_size=window, softcap=softcap, alibi_slopes=slopes, deterministic=det,
            key_padding_mask=kpm,
        )  # fmt: skip
        ref_kw.update(alibi_slopes=slopes, key_padding_mask=kpm)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kw = {key: val for key, val in ref_kw.items() if val is not None}
    out64 = attention_reference(*inputs64, compute_dtype=torch.float64, **ref_kw)
    grads64 = _grads(out64, inputs64, dout.double())
    assert_close_to_ref(out, out64, atol=1e-4, name="out")
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_to_ref(g, g64, atol=1e-4, name=name)


def test_split_dv_tile_differs_from_dk(monkeypatch, device):
    """The split dV launch with its own query tile (SPLIT_DV_CONFIGS; sm_90 at head dim 256), here
    16 queries for dV and the interpreter's 32 for dK on the same 32-key grid (fp16: the tiles are
    for 16-bit inputs), vs float64."""
    from bidirlm.kernels import attention_triton

    families = ("hopper", "ampere", "nvidia", "cdna", "amd", "interpreter")
    monkeypatch.setattr(attention_triton, "FUSED_DKDV_MAX_D", dict.fromkeys(families, 128))
    tile = attention_triton.LaunchConfig(16, 32, 1, 1)
    monkeypatch.setattr(attention_triton, "SPLIT_DV_CONFIGS", {"interpreter": [(256, tile)]})
    attention_triton._plan.cache_clear()
    launched = []
    run = attention_triton._run

    def record(name, grid, extent, axis, args, kw, family):  # noqa: ANN001, ANN202
        launched.append((name, kw.get("PART"), kw["BLOCK_M"]))
        return run(name, grid, extent, axis, args, kw, family)

    monkeypatch.setattr(attention_triton, "_run", record)
    try:
        q, k, v = _inputs((1, 45, 2, 256), (1, 45, 2, 256), torch.float16, device)
        check_against_reference(q, k, v, deterministic=True)
    finally:
        attention_triton._plan.cache_clear()
    if not HAS_GPU:  # the interpreter's tiles: dV 16 queries, dK 32
        assert ("_attn_bwd_dkdv_kernel", 1, 16) in launched
        assert ("_attn_bwd_dkdv_kernel", 2, 32) in launched


@pytest.mark.parametrize("case", ["dense", "cross-bf16", "gqa", "packed-window"])
def test_backward_on_descriptors(case, monkeypatch, device):
    """The dQ kernel reading K and V, and the dK/dV kernel reading Q and dO, through TMA tensor
    descriptors (DQ_TMA_HEAD_DIMS, KV_TMA_HEAD_DIMS; sm_90 at head dim 256), here in the
    interpreter: dense tails read zeros, packed interior blocks use the dQ descriptors and packed
    edge blocks pointers (packed dK/dV: pointers only); GQA's per-q-head launches; vs float64."""
    from bidirlm.kernels import attention_triton as at
    from bidirlm.kernels import flash_attn_compat as fa

    families = ("hopper", "ampere", "nvidia", "cdna", "amd", "interpreter")
    monkeypatch.setattr(at, "FUSED_DKDV_MAX_D", dict.fromkeys(families, 128))
    monkeypatch.setattr(at, "DQ_TMA_HEAD_DIMS", {"interpreter": (256,), "hopper": (256,)})
    monkeypatch.setattr(at, "KV_TMA_HEAD_DIMS", {"interpreter": (256,), "hopper": (256,)})
    launched = []
    run = at._run

    def record(name, grid, extent, axis, args, kw, family):  # noqa: ANN001, ANN202
        launched.append((name, bool(kw.get("USE_DESC"))))
        return run(name, grid, extent, axis, args, kw, family)

    monkeypatch.setattr(at, "_run", record)
    dt = torch.bfloat16 if case.endswith("bf16") else torch.float16
    ref_kw: dict = {}
    if case == "packed-window":
        cu = torch.tensor([0, 70, 75, 108], dtype=torch.int32, device=device)
        q, k, v = _inputs((108, 2, 256), (108, 1, 256), dt, device)
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 70, 70, window_size=(20, 9))
        ref_kw.update(cu_seqlens=cu, window_size=(20, 9))
    else:
        sk = 38 if case.startswith("cross") else 45
        q, k, v = _inputs((2, 45, 2, 256), (2, sk, 1 if case == "gqa" else 2, 256), dt, device)
        out = fa.flash_attn_func(q, k, v)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    _check_grads(q, k, v, grads, dout, dt, **ref_kw)
    if not HAS_GPU:
        assert ("_attn_bwd_dq_kernel", True) in launched
        assert ("_attn_bwd_dkdv_kernel", not case.startswith("packed")) in launched


def test_hd256_hopper_backward_tiles():
    """sm_90 at head dim 256: 4-warp dV / dK / dQ programs (two per SM, no warpgroup computing
    the other's scores) for dense and variant calls; packed + window keeps the 8-warp dK/dV tile
    (the 4-warp one spills 8 B with triton 3.6); other families are unchanged by it."""
    from bidirlm.kernels.attention_triton import AttnShape, _plan, variant_overrides

    def plan(packed: bool, window: bool, hkv: int = 4):
        shape = AttnShape(2, 256, 4, hkv, 256, packed)
        return _plan("hopper", False, torch.bfloat16, shape, window, False, False, False, False)

    for p in (plan(False, False), plan(True, False), plan(False, True), plan(False, False, 1)):
        assert p.dkdv["num_warps"] == 4 and p.dq["num_warps"] == 4
        assert (p.dkdv["BLOCK_N"], p.dq["BLOCK_M"]) == (64, 64)
    # the dK launch of a dense call: 32 queries with every triton (WIDE_DK_CONFIGS, Q/dO on
    # descriptors); variant calls 16
    assert plan(False, False).dkdv["BLOCK_M"] == 32 and plan(False, False).wide_dk
    for p in (plan(True, False), plan(False, True), plan(False, False, 1)):
        assert p.dkdv["BLOCK_M"] == 16
    # the dV launch of a dense call takes 64 queries (SPLIT_DV_CONFIGS), variants keep dK's tile
    dense = plan(False, False)
    assert (dense.dv["BLOCK_M"], dense.dv["BLOCK_N"], dense.dv["num_warps"]) == (64, 64, 4)
    for p in (plan(True, False), plan(False, True), plan(False, False, 1)):
        assert p.dv == p.dkdv
    pw = plan(True, True)
    assert pw.dkdv["num_warps"] == 8 and pw.dq["num_warps"] == 4
    # dQ: 32-key blocks on K/V descriptors; packed calls keep 16 (their edge blocks use pointers)
    for p in (plan(False, False), plan(False, True), plan(False, False, 1)):
        assert p.dq["BLOCK_N"] == 32
    assert plan(True, False).dq["BLOCK_N"] == pw.dq["BLOCK_N"] == 16
    assert variant_overrides("hopper", 128, True) == variant_overrides("hopper", 128)
    assert variant_overrides("cdna", 256, True) == {}


def test_hd128_hopper_dq_tiles():
    """sm_90 at head dim 128: a dense 16-bit call's dQ takes 64 queries x 128 keys at 4 warps
    (WIDE_DQ_CONFIGS, on K/V descriptors); variant and float32 calls, head dims the descriptors
    do not cover and other families keep their tiles."""
    from bidirlm.kernels import attention_triton as at
    from bidirlm.kernels.attention_triton import AttnShape, _plan

    def plan(family="hopper", d=128, packed=False, window=False, hkv=4, dtype=torch.bfloat16):
        shape = AttnShape(2, 256, 4, hkv, d, packed)
        return _plan(family, False, dtype, shape, window, False, False, False, False)

    dense = plan()
    assert 128 in at.DQ_TMA_HEAD_DIMS["hopper"]
    assert (dense.dq["BLOCK_M"], dense.dq["BLOCK_N"], dense.dq["num_warps"]) == (64, 128, 4)
    assert plan(dtype=torch.float16).dq["BLOCK_N"] == 128
    for p in (plan(packed=True), plan(window=True), plan(hkv=1)):
        assert (p.dq["BLOCK_M"], p.dq["BLOCK_N"]) == (64, 32)
    assert plan(d=96).dq["BLOCK_N"] == 64  # pointer loads: the 64x64 tile
    assert plan(dtype=torch.float32).dq["BLOCK_N"] == 16
    assert plan("ampere").dq["BLOCK_N"] == 32 and plan("cdna").dq["BLOCK_N"] == 64


def test_hd128_hopper_dkdv_tiles():
    """sm_90 at head dim 128: a dense 16-bit call's dK/dV takes 64 queries x 64 keys at 4 warps
    (WIDE_DK_CONFIGS, on Q/dO descriptors), as do calls with a window, a key padding mask or
    ALiBi, or two of them (WIDE_DK_VARIANT_DIMS); packed, softcap, GQA/MQA calls, all three
    together, float32, head dims other than the table's and other families keep their tiles."""
    from bidirlm.kernels.attention_triton import AttnShape, _plan

    def plan(family="hopper", d=128, packed=False, window=False, hkv=4, dtype=torch.bfloat16,
             softcap=False, kpm=False, alibi=False):  # fmt: skip
        shape = AttnShape(2, 256, 4, hkv, d, packed)
        return _plan(family, False, dtype, shape, window, softcap, kpm, kpm, alibi)

    wide = (plan(), plan(dtype=torch.float16), plan(window=True), plan(kpm=True), plan(alibi=True))
    for p in (*wide, plan(window=True, alibi=True)):
        assert p.wide_dk
        assert (p.dkdv["BLOCK_M"], p.dkdv["BLOCK_N"], p.dkdv["num_warps"]) == (64, 64, 4)
        assert p.dkdv["num_stages"] == 2 and p.grid_dkdv[0] == 4
    assert plan(window=True).dq["BLOCK_N"] == 32  # variant calls keep their dQ tile
    three = plan(window=True, kpm=True, alibi=True)
    for p in (plan(packed=True), plan(hkv=1), plan(softcap=True), three):
        assert not p.wide_dk and (p.dkdv["BLOCK_M"], p.dkdv["BLOCK_N"]) == (16, 128)
    assert not plan(d=256, window=True).wide_dk  # D=256: dense calls only
    for p in (plan(d=96), plan(d=64), plan(dtype=torch.float32), plan("ampere"), plan("cdna")):
        assert not p.wide_dk and p.dkdv["BLOCK_M"] <= 64
    assert plan(d=96).dkdv["BLOCK_M"] == 32 and plan(d=64).dkdv["BLOCK_M"] == 64


@pytest.mark.parametrize("case", ["dense", "cross-bf16", "gqa", "kpm", "window-alibi"])
def test_hd128_backward_wide_dkdv_on_descriptors(case, monkeypatch, device):
    """The head-dim-128 dK/dV path of sm_90 (one launch, Q/dO on descriptors, a wide query
    tile: WIDE_DK_CONFIGS, WIDE_DK_VARIANT_DIMS) in the interpreter: 64-query boxes over 45
    queries (the tail reads zeros; lse and delta are masked loads), cross lengths, a key padding
    mask, a window with ALiBi; GQA keeps the plain tile and pointer loads; vs float64."""
    from bidirlm.kernels import attention_triton as at
    from bidirlm.kernels import flash_attn_compat as fa

    # as on sm_90: a separate dQ launch above head dim 64 (the interpreter's default: atomics)
    monkeypatch.setattr(at, "ATOMIC_DQ_MAX_D", {**at.ATOMIC_DQ_MAX_D, "interpreter": 64})
    wide = {"interpreter": {128: at.LaunchConfig(64, 32, 1, 1)}}
    monkeypatch.setattr(at, "WIDE_DK_CONFIGS", wide)
    monkeypatch.setattr(at, "WIDE_DK_VARIANT_DIMS", {"interpreter": (128,)})
    launched = []
    run = at._run

    def record(name, grid, extent, axis, args, kw, family):  # noqa: ANN001, ANN202
        launched.append((name, bool(kw.get("USE_DESC")), kw.get("BLOCK_M"), kw.get("PART")))
        return run(name, grid, extent, axis, args, kw, family)

    monkeypatch.setattr(at, "_run", record)
    at._plan.cache_clear()
    try:
        dt = torch.bfloat16 if case.endswith("bf16") else torch.float16
        sk = 38 if case.startswith("cross") else 45
        hkv = 1 if case == "gqa" else 2
        q, k, v = _inputs((2, 45, 2, 128), (2, sk, hkv, 128), dt, device)
        kpm = slopes = None
        window = (20, 9) if case == "window-alibi" else (-1, -1)
        if case == "kpm":
            kpm = torch.ones(2, sk, dtype=torch.bool, device=device)
            kpm[1, 30:] = False
        if case == "window-alibi":
            slopes = torch.tensor([0.05, 0.2], device=device)
        out = fa.flash_attn_func(
            q, k, v, key_padding_mask=kpm, window_size=window, alibi_slopes=slopes
        )
        dout = torch.randn_like(out)
        grads = _grads(out, (q, k, v), dout)
    finally:
        at._plan.cache_clear()
    ref_kw = {"key_padding_mask": kpm, "window_size": window, "alibi_slopes": slopes}
    ref_kw = {key: val for key, val in ref_kw.items() if val is not None}
    _check_grads(q, k, v, grads, dout, dt, **ref_kw)
    if not HAS_GPU:  # the wide tile on descriptors; GQA: pointers, 32 queries
        expected = (True, 64) if case != "gqa" else (False, 32)
        assert ("_attn_bwd_dkdv_kernel", *expected, 0) in launched


@pytest.mark.parametrize("case", ["dense", "cross-bf16", "gqa", "packed"])
def test_hd128_backward_wide_dq_on_descriptors(case, monkeypatch, device):
    """The head-dim-128 dQ path of sm_90 (K/V descriptors, a wide key block: DQ_TMA_HEAD_DIMS,
    WIDE_DQ_CONFIGS) in the interpreter: 64-key blocks over 45 / 38 keys (tails read zeros),
    GQA, packed edge blocks on pointers; gradients vs float64."""
    from bidirlm.kernels import attention_triton as at
    from bidirlm.kernels import flash_attn_compat as fa

    # as on sm_90: a separate dQ launch above head dim 64 (the interpreter's default: atomics)
    monkeypatch.setattr(at, "ATOMIC_DQ_MAX_D", {**at.ATOMIC_DQ_MAX_D, "interpreter": 64})
    monkeypatch.setattr(at, "DQ_TMA_HEAD_DIMS", {"interpreter": (128,), "hopper": (128, 256)})
    wide = {"interpreter": {128: at.LaunchConfig(32, 64, 1, 1)}}
    monkeypatch.setattr(at, "WIDE_DQ_CONFIGS", wide)
    launched = []
    run = at._run

    def record(name, grid, extent, axis, args, kw, family):  # noqa: ANN001, ANN202
        launched.append((name, bool(kw.get("USE_DESC")), kw.get("BLOCK_N")))
        return run(name, grid, extent, axis, args, kw, family)

    monkeypatch.setattr(at, "_run", record)
    at._plan.cache_clear()
    try:
        dt = torch.bfloat16 if case.endswith("bf16") else torch.float16
        ref_kw: dict = {}
        if case == "packed":
            cu = torch.tensor([0, 70, 75, 108], dtype=torch.int32, device=device)
            q, k, v = _inputs((108, 2, 128), (108, 2, 128), dt, device)
            out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 70, 70)
            ref_kw.update(cu_seqlens=cu)
        else:
            sk = 38 if case.startswith("cross") else 45
            hkv = 1 if case == "gqa" else 2
            q, k, v = _inputs((2, 45, 2, 128), (2, sk, hkv, 128), dt, device)
            out = fa.flash_attn_func(q, k, v)
        dout = torch.randn_like(out)
        grads = _grads(out, (q, k, v), dout)
    finally:
        at._plan.cache_clear()
    _check_grads(q, k, v, grads, dout, dt, **ref_kw)
    if not HAS_GPU:  # dense calls take the wide block, variants (GQA, packed) the plain one
        wide_n = 64 if case in ("dense", "cross-bf16") else 32
        assert ("_attn_bwd_dq_kernel", True, wide_n) in launched


@pytest.mark.parametrize(
    "window",
    [(-1, 0), (0, -1), (5, 5), (7, 2), (0, 0), (40, 3)],
    ids=["causal", "anticausal", "sym5", "asym7-2", "diag", "left40-right3"],
)
def test_windows(window, device):
    q, k, v = _inputs((1, 70, 2, 32), (1, 70, 1, 32), torch.float16, device)
    check_against_reference(q, k, v, window_size=window)


def test_window_skips_blocks_outside_the_band(device):
    """Key blocks outside the band are never read: NaN there cannot reach the visible rows."""
    s, w = 512, 4
    q, k, v = _inputs((1, s, 1, 32), (1, s, 1, 32), torch.float32, device)
    poisoned = v.detach().clone()
    poisoned[:, 384:] = float("nan")  # no query < 256 sees a key >= 260, nor any block of them
    v_nan = poisoned.requires_grad_()
    out = flash_attn_func(q, k, v_nan, window_size=(w, w))
    dq, dk, dv = torch.autograd.grad(out[:, :256].sum(), (q, k, v_nan))
    ref = attention_reference(q.detach(), k.detach(), v.detach(), window_size=(w, w))
    assert torch.isfinite(out[:, :256]).all() and torch.isfinite(dq[:, :256]).all()
    torch.testing.assert_close(out[:, :256], ref[:, :256], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(dv).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_and_scale(dtype, device):
    # Scores of size ~3*3*sqrt(32)*0.3 ~ 15 > softcap: the cap is active and its gradient matters.
    q, k, v = _inputs((1, 45, 4, 32), (1, 45, 2, 32), dtype, device, scale=3.0)
    check_against_reference(q, k, v, softcap=5.0, softmax_scale=0.3)


def test_softcap_small_arguments_float32(device):
    """softcap=30 (Gemma 2) keeps tanh's argument below 0.2, where 1 - exp(-2x) cancels: the
    kernel's tanh switches to its Taylor branch there and stays within 2x torch's fp32 error."""
    q, k, v = _inputs((1, 37, 2, 32), (1, 37, 1, 32), torch.float32, device)
    check_against_reference(q, k, v, softcap=30.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding_mask_with_fully_padded_sequence(dtype, device):
    b, s = 3, 45
    q, k, v = _inputs((b, s, 2, 32), (b, s, 1, 32), dtype, device)
    mask = torch.ones(b, s, dtype=torch.bool, device=device)
    mask[1, 20:] = False
    mask[2] = False  # no valid key at all: zeros, lse = -inf, zero gradients, no NaN
    out, lse, (dq, dk, dv) = check_against_reference(q, k, v, key_padding_mask=mask)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))
    assert torch.all(dq[2] == 0) and torch.all(dk[2] == 0) and torch.all(dv[2] == 0)
    assert torch.all(dk[1, 20:] == 0) and torch.all(dv[1, 20:] == 0)  # padded keys get none


def test_padding_and_window_combined(device):
    q, k, v = _inputs((2, 50, 2, 32), (2, 50, 2, 32), torch.float32, device)
    mask = torch.rand(2, 50, device=device) > 0.3
    check_against_reference(q, k, v, key_padding_mask=mask, window_size=(6, 1), softcap=2.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_packed_with_short_and_empty_sequences(dtype, device):
    lengths = [1, 17, 0, 1, 40, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q, k, v = _inputs((total, 2, 32), (total, 1, 32), dtype, device)
    check_against_reference(q, k, v, cu_seqlens=cu.to(device), max_seqlen=max(lengths))


def test_packed_windowed_equals_per_sequence_dense(device):
    lengths = [33, 1, 64]
    cu = torch.tensor([0, 33, 34, 98], dtype=torch.int32, device=device)
    q, k, v = _inputs((98, 2, 64), (98, 1, 64), torch.float32, device)
    out, lse = flash_attn_varlen_func(
        q, k, v, cu, max(lengths), window_size=(3, 8), softcap=4.0, return_lse=True
    )
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        dense, dlse = flash_attn_func(
            q[None, a:b], k[None, a:b], v[None, a:b], window_size=(3, 8), softcap=4.0,
            return_lse=True,
        )  # fmt: skip
        torch.testing.assert_close(out[a:b], dense[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[:, a:b], dlse[0], atol=1e-6, rtol=1e-6)


def test_non_contiguous_inputs(device):
    """transformers hands over q/k/v as [B, H, S, D].transpose(1, 2): read through strides."""
    qh, kh, vh = _inputs((1, 4, 37, 32), (1, 2, 37, 32), torch.float32, device)
    q, k, v = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    assert not q.is_contiguous()
    check_against_reference(q, k, v)


def test_deterministic_backward_is_bitwise_reproducible(device):
    q, k, v = _inputs((1, 40, 2, 32), (1, 40, 1, 32), torch.bfloat16, device)
    dout = torch.randn(1, 40, 2, 32, device=device).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    fast = torch.autograd.grad(flash_attn_func(q, k, v), (q, k, v), dout)
    for a, b in zip(runs[0], fast):  # same math, different dQ summation order
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_default_scale_and_lse_only_use(device):
    q, k, v = _inputs((1, 20, 2, 48), (1, 20, 2, 48), torch.float32, device)
    out = flash_attn_func(q, k, v)
    explicit = flash_attn_func(q, k, v, softmax_scale=48**-0.5)
    assert torch.equal(out, explicit)
    # lse carries no gradient; using only lse must not fail and gives zero gradients.
    _, lse = flash_attn_func(q, k, v, return_lse=True)
    assert not lse.requires_grad


def test_custom_op_autograd_directly(device):
    q, k, v = _inputs((1, 19, 2, 32), (1, 19, 2, 32), torch.float32, device)
    out, _ = torch.ops.bidirlm.flash_attn_fwd(q, k, v, None, None, 19, 32**-0.5, -1, -1, 0.0)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    g2 = torch.autograd.grad(attention_reference(q2, k2, v2).sum(), (q2, k2, v2))
    for a, b in zip((dq, dk, dv), g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_dispatch_path(monkeypatch, device):
    """BIDIRLM_KERNELS=torch runs the reference through the same ops, gradients included."""
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    lengths = [5, 1, 12]
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32, device=device)
    q, k, v = _inputs((18, 4, 16), (18, 2, 16), torch.float32, device)
    check_against_reference(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), window_size=(2, 2))
    qd, kd, vd = _inputs((2, 9, 2, 16), (2, 9, 1, 16), torch.bfloat16, device)
    mask = torch.tensor([[True] * 9, [True] * 4 + [False] * 5], device=device)
    check_against_reference(qd, kd, vd, key_padding_mask=mask, softcap=3.0)


def test_torch_compile_fullgraph(device):
    q, k, v = _inputs((2, 24, 4, 32), (2, 24, 2, 32), torch.float32, device)
    mask = torch.ones(2, 24, dtype=torch.bool, device=device)
    mask[1, 15:] = False

    def loss_fn(q, k, v, mask):
        out = flash_attn_func(q, k, v, key_padding_mask=mask, window_size=(8, 8))
        return out.square().sum()

    # aot_eager traces with Dynamo (fullgraph: no graph break allowed) and AOTAutograd (fake
    # kernels, the backward op); inductor's CPU codegen would add a minute of C++ compiling.
    backend = "inductor" if HAS_GPU else "aot_eager"
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    loss = compiled(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = loss_fn(q, k, v, mask)
    ref_grads = torch.autograd.grad(eager, (q, k, v))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_profiler_range(device):
    """Both public calls run inside the `bidirlm.flash_attn` profiler range (forward and the
    autograd backward nodes it records), and a range-less call is not named so."""
    q, k, v = _inputs((1, 8, 2, 16), (1, 8, 2, 16), torch.float32, device)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        flash_attn_func(q, k, v).sum().backward()
        flash_attn_varlen_func(q[0], k[0], v[0], cu, 5)
    names = [e.name for e in prof.events()]
    assert names.count("bidirlm.flash_attn") == 2, sorted(set(names))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert "bidirlm.flash_attn" not in [e.name for e in prof.events()]


def test_empty_inputs(device):
    q, k, v = _inputs((0, 2, 16), (0, 2, 16), torch.float32, device)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = flash_attn_varlen_func(q, k, v, cu, 0, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


# --- bad inputs ----------------------------------------------------------------------------------


def _dense(**over):
    base = {
        "q": torch.randn(2, 8, 4, 16),
        "k": torch.randn(2, 8, 2, 16),
        "v": torch.randn(2, 8, 2, 16),
    }
    base.update(over)
    return base


BAD_DENSE = [
    ({"q": torch.randn(8, 4, 16)}, "q must be"),
    ({"k": torch.randn(2, 8, 2, 16, dtype=torch.float16)}, "dtype"),
    ({"q": torch.randn(2, 8, 4, 16).double()}, "q must be float16"),
    ({"v": torch.randn(2, 8, 2, 8)}, "k and v"),
    # (k/v of another length is flash-attn's cross-attention: bidirlm.kernels.flash_attn_func
    # is the flash-attn-compatible superset, tested in test_flash_attn_compat.py)
    ({"k": torch.randn(3, 8, 2, 16), "v": torch.randn(3, 8, 2, 16)}, "k batch"),
    ({"k": torch.randn(2, 8, 3, 16), "v": torch.randn(2, 8, 3, 16)}, "multiple of k/v heads"),
    (
        {
            "q": torch.randn(1, 4, 2, 257),
            "k": torch.randn(1, 4, 2, 257),
            "v": torch.randn(1, 4, 2, 257),
        },
        "head dim",
    ),
    ({"window_size": (-2, 0)}, "window_size"),
    ({"window_size": (3,)}, "window_size"),
    ({"window_size": (1.5, 2)}, "window_size"),
    ({"softcap": -1.0}, "softcap"),
    ({"softcap": float("nan")}, "softcap"),
    ({"softmax_scale": 0.0}, "softmax_scale"),
    ({"softmax_scale": float("inf")}, "softmax_scale"),
    ({"key_padding_mask": torch.ones(2, 8)}, "key_padding_mask"),
    ({"key_padding_mask": torch.ones(2, 7, dtype=torch.bool)}, "key_padding_mask"),
    ({"deterministic": 1}, "deterministic"),
    ({"return_lse": "yes"}, "return_lse"),
]


@pytest.mark.parametrize("over,match", BAD_DENSE, ids=[m for _, m in BAD_DENSE])
def test_bad_dense_inputs(over, match):
    args = _dense(**over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v, **args)


@pytest.mark.gpu
def test_device_mismatch():
    q = torch.randn(1, 4, 2, 16, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        flash_attn_func(q, q.cpu(), q.cpu())


BAD_CU = [
    (torch.tensor([0, 3, 8], dtype=torch.int64), 5, "int32"),
    (torch.tensor([[0, 8]], dtype=torch.int32), 8, "1-D"),
    (torch.tensor([1, 3, 8], dtype=torch.int32), 5, "start at 0"),
    (torch.tensor([0, 5, 3, 8], dtype=torch.int32), 5, "non-decreasing"),
    (torch.tensor([0, 3, 7], dtype=torch.int32), 5, "end at the token count"),
    (torch.tensor([0, 3, 8], dtype=torch.int32), 4, "max_seqlen"),
    (torch.tensor([0, 3, 8], dtype=torch.int32), -1, "max_seqlen"),
    (torch.tensor([0, 3, 8], dtype=torch.int32), 9, "max_seqlen"),
    (torch.tensor([0, 3, 8], dtype=torch.int32), 10**9, "max_seqlen"),
    ([0, 3, 8], 5, "cu_seqlens must be"),
]


@pytest.mark.parametrize("cu,max_seqlen,match", BAD_CU, ids=[m for *_, m in BAD_CU])
def test_bad_cu_seqlens(cu, max_seqlen, match):
    q, k = torch.randn(8, 2, 16), torch.randn(8, 1, 16)
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(q, k, k, cu, max_seqlen)


def test_varlen_rejects_dense_layout():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"q must be \[T, H, D\]"):
        flash_attn_varlen_func(q, q, q, torch.tensor([0, 8], dtype=torch.int32), 8)


# --- launch configs ------------------------------------------------------------------------------


def test_launch_config_table():
    for family in ("hopper", "ampere", "cdna", "interpreter"):
        for d in (32, 64, 80, 128, 256):
            fwd, bwd = pick_config(family, d, False), pick_config(family, d, True)
            for cfg in (fwd, bwd):
                assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.num_warps <= 8
                if family == "cdna":  # AMD: no software pipelining, waves_per_eu set, wave64
                    assert cfg.num_stages == 1 and cfg.waves_per_eu > 0
                else:
                    assert "waves_per_eu" not in cfg.launch_kwargs()
    assert set(CONFIGS) >= {"hopper", "ampere", "cdna", "amd", "nvidia", "interpreter"}
    with pytest.raises(ValueError, match="head dim"):
        pick_config("hopper", 320, False)


def test_variant_configs_replace_the_dense_ones():
    """On Hopper a packed / GQA / windowed call takes VARIANT_CONFIGS (the dense tiles spill in
    those variants); a dense call and fp32 keep CONFIGS; other families have no overrides."""
    from bidirlm.kernels.attention_triton import (
        VARIANT_CONFIGS,
        WIDE_DK_CONFIGS,
        AttnShape,
        _plan,
        variant_overrides,
    )

    def plan(hq: int, hkv: int, packed: bool, window: bool, dtype=torch.bfloat16):
        shape = AttnShape(2, 256, hq, hkv, 128, packed)
        return _plan("hopper", False, dtype, shape, window, False, False, False, False)

    dense = plan(4, 4, False, False)  # CONFIGS' dK/dV tile, widened by WIDE_DK_CONFIGS
    assert dense.dkdv["BLOCK_M"] == WIDE_DK_CONFIGS["hopper"][128].block_m
    assert dense.dkdv["BLOCK_N"] == pick_config("hopper", 128, True).block_n
    over = variant_overrides("hopper", 128)
    for p in (plan(8, 2, False, False), plan(4, 4, True, False), plan(4, 4, False, True)):
        assert p.fwd["num_warps"] == over["fwd"].num_warps
        if p.wide_dk:  # a window alone: WIDE_DK_CONFIGS' tile (WIDE_DK_VARIANT_DIMS)
            assert p.dkdv["BLOCK_M"] == WIDE_DK_CONFIGS["hopper"][128].block_m
            continue
        assert (p.dkdv["BLOCK_M"], p.dkdv["BLOCK_N"]) == (
            over["dkdv"].block_m,
            over["dkdv"].block_n,
        )
    assert (
        plan(8, 2, False, False, torch.float32).dkdv["BLOCK_M"]
        == pick_config("hopper", 128, True, dtype=torch.float32).block_m
    )
    assert variant_overrides("cdna", 128) == {} and variant_overrides("hopper", 512) == {}
    assert all(d in (64, 128, 256) for d, _ in VARIANT_CONFIGS["hopper"])


def test_autotune_space_and_fp32_configs():
    """AMD's waves_per_eu travels in Config's kwargs (a keyword of Config() is a TypeError);
    no config gives a tile fewer rows than 16 per warp; float32 has its own smaller tiles."""
    for family in ("hopper", "cdna"):
        space = autotune_configs(family, 128)
        assert space
        for cfg in space:
            assert ("waves_per_eu" in cfg.kwargs) == (family == "cdna")
            assert cfg.num_warps * 16 <= max(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])
    for family in ("hopper", "ampere", "cdna"):
        for d in (64, 128, 256):
            for kernel in ("fwd", "dkdv", "dq"):
                f32 = pick_config(family, d, False, dtype=torch.float32, kernel=kernel)
                f16 = pick_config(family, d, False, dtype=torch.float16, kernel=kernel)
                assert f32.block_m * f32.block_n <= f16.block_m * f16.block_n
    assert pick_config("hopper", 128, True) == pick_config("hopper", 128, False, kernel="dkdv")


@pytest.mark.gpu
def test_autotune_path_matches_reference(monkeypatch, device):
    monkeypatch.setenv("BIDIRLM_AUTOTUNE", "1")
    q, k, v = _inputs((2, 300, 4, 64), (2, 300, 2, 64), torch.bfloat16, device)
    check_against_reference(q, k, v, window_size=(64, 64))


# --- random configurations -----------------------------------------------------------------------


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    lengths=st.lists(st.integers(1, 33), min_size=1, max_size=3),
    group=st.sampled_from([1, 2]),
    hkv=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([16, 24, 40, 64]),
    left=st.integers(-1, 12),
    right=st.integers(-1, 12),
    softcap=st.sampled_from([0.0, 3.0]),
    deterministic=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_random_packed_configs(
    lengths, group, hkv, head_dim, left, right, softcap, deterministic, dtype
):
    device = torch.device("cuda" if HAS_GPU else "cpu")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q, k, v = _inputs((total, hkv * group, head_dim), (total, hkv, head_dim), dtype, device)
    check_against_reference(
        q, k, v, cu_seqlens=cu.to(device), max_seqlen=max(lengths), window_size=(left, right),
        softcap=softcap, deterministic=deterministic, softmax_scale=1 / math.sqrt(head_dim),
    )  # fmt: skip


# --- forward: TMA descriptors and exp2 on the FMA pipe (Hopper paths, run in the interpreter) ---


@triton.jit
def _exp2_kernel(X, Y, POLY_LOG: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(Y + offs, _exp2_mixed(tl.load(X + offs), 1.0, tl.zeros([M], tl.float32), POLY_LOG))


@pytest.mark.parametrize("poly_log", [0, 1, 2, 3])
def test_exp2_fma_split_matches_torch_exp2(poly_log):
    """`_exp2_mixed` puts the last 2**-poly_log of the columns on the FMA-pipe polynomial; every
    column agrees with float64 2**x to 4e-6 relative (the degree-4 fit: 2.7e-6), over the whole
    range the forward feeds it (finite x <= 0, down to the -126 clamp, and x a rounding above 0),
    and bf16(P) equals bf16 of the exact value except at a few rounding ties."""
    gen = torch.Generator().manual_seed(0)
    x = -torch.rand(64, 64, generator=gen) * torch.tensor([0.5, 4.0, 30.0, 125.0]).repeat(16)
    x[0, :] = torch.linspace(-126.0, 0.0, 64)
    x[1, :] = 1e-6  # s * scale - m can round a hair above 0
    y = torch.empty_like(x)
    _exp2_kernel[(1,)](x, y, poly_log, 64, 64)
    exact = torch.exp2(x.double())
    rel = ((y.double() - exact) / exact).abs()
    assert rel.max() < 4e-6
    if poly_log:
        poly_cols = slice(64 - 64 // 2**poly_log, 64)
        assert rel[:, poly_cols].max() > 1e-7  # those columns really took the polynomial
    same = y.to(torch.bfloat16) == exact.to(torch.bfloat16)
    assert same.float().mean() > 0.995


def _forward_vs_reference(q, k, v, *, cu=None, cu_k=None, kpm=None, window=(-1, -1),
                          softcap=0.0, alibi=None):  # fmt: skip
    """Forward only (out, lse) against the float64 reference, bound from torch's own error."""
    from bidirlm.kernels.attention_triton import attention_forward

    scale = q.shape[-1] ** -0.5
    if cu is not None:
        lens_q, lens_k = cu.diff(), (cu if cu_k is None else cu_k).diff()
        out, lse = attention_forward(
            q, k, v, cu, None, int(lens_q.max()), scale, window, softcap, cu_seqlens_k=cu_k,
            max_seqlen_k=int(lens_k.max()), alibi_slopes=alibi,
        )  # fmt: skip
    else:
        out, lse = attention_forward(
            q, k, v, None, kpm, q.shape[1], scale, window, softcap, alibi_slopes=alibi
        )
    kw = dict(cu_seqlens=cu, cu_seqlens_k=cu_k, key_padding_mask=kpm, softmax_scale=scale,
              window_size=window, softcap=softcap, alibi_slopes=alibi)  # fmt: skip
    out64, lse64 = attention_reference(
        q.double(), k.double(), v.double(), return_lse=True, compute_dtype=torch.float64, **kw
    )
    out_pt = attention_reference(q, k, v, compute_dtype=q.dtype, **kw)
    assert_close_to_ref(out, out64, out_pt, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite], lse64[finite].float(), atol=1e-3, rtol=1e-3)


FWD_TMA_CASES = ["dense-gqa", "cross", "kpm", "window", "softcap-alibi", "d40", "packed",
                 "packed-cross", "strided"]  # fmt: skip


@pytest.mark.parametrize("case", FWD_TMA_CASES)
def test_forward_tma_descriptors_and_fma_exp2(case, monkeypatch):
    """The Hopper forward path (K/V through tensor descriptors, 1/8 of the interior exp2 and the
    rescale factors on the FMA pipe) on the interpreter's small tiles: dense descriptors zero-fill
    the key rows past Sk in edge blocks (cross lengths, key padding), packed ones serve interior
    blocks only; every variant against the float64 reference."""
    from bidirlm.kernels import attention_triton as at

    made = []

    class CountingDescriptor(at.TensorDescriptor):
        def __post_init__(self):
            super().__post_init__()
            made.append(tuple(self.block_shape))

    monkeypatch.setattr(at, "TensorDescriptor", CountingDescriptor)
    monkeypatch.setattr(at, "FWD_TMA_FAMILIES", ("interpreter",))
    monkeypatch.setitem(at.FWD_EXP2_SPLIT, "interpreter", [(256, 32, 32, 3, True, None)])
    torch.manual_seed(0)
    bf16_cases = ("dense-gqa", "kpm", "softcap-alibi", "packed")
    dt = torch.bfloat16 if case in bf16_cases else torch.float16

    def rnd(*shape):
        return torch.randn(*shape).to(dt)

    if case.startswith("packed"):
        cu = torch.tensor([0, 70, 75, 108], dtype=torch.int32)
        cu_k = None
        if case == "packed-cross":
            cu_k = torch.tensor([0, 40, 105, 110], dtype=torch.int32)
        tk = int((cu if cu_k is None else cu_k)[-1])
        _forward_vs_reference(rnd(108, 4, 64), rnd(tk, 2, 64), rnd(tk, 2, 64), cu=cu, cu_k=cu_k)
    elif case == "strided":  # K/V views TMA cannot take as they are: copied once
        kv = rnd(1, 2, 100, 128).transpose(1, 2)  # unaligned bases (2-byte offsets)
        _forward_vs_reference(rnd(1, 100, 2, 64), kv[..., 1:65], kv[..., 63:127])
    else:
        sq, sk, hkv, d = 100, 100, 2, 64
        if case == "cross":
            sk = 90
        elif case == "d40":
            d = 40
        elif case == "dense-gqa":
            hkv = 1
        q, k, v = rnd(2, sq, 2, d), rnd(2, sk, hkv, d), rnd(2, sk, hkv, d)
        kw = {}
        if case == "kpm":
            kpm = torch.ones(2, sk, dtype=torch.bool)
            kpm[1, 61:] = False
            kw["kpm"] = kpm
        elif case == "window":
            kw["window"] = (20, 33)
        elif case == "softcap-alibi":
            kw.update(softcap=5.0, alibi=torch.tensor([0.1, 0.4]))
        _forward_vs_reference(q, k, v, **kw)
    assert made, "the forward took no tensor descriptor"


@triton.jit
def _exp2_affine_kernel(S, Y, scale, shift, DEGREE: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, exp2_poly_affine(tl.load(S + offs), scale, shift, -126, 66, DEGREE))


@pytest.mark.parametrize("degree,bound", [(3, 1e-4), (4, 2e-5)])
def test_exp2_poly_affine_clamps_and_matches_float64(degree, bound):
    """2**clamp(s * scale - shift, -126, 66) on the FMA pipe: within the fit's error plus the
    rounding of the saturating FMA's output and constants (measured: degree 3 8.9e-5, degree 4
    1.6e-5) of float64 over the whole range, positive exponents included, and the clamp value
    outside it."""
    scale, shift = 0.18033688, 3.25
    x = torch.cat([torch.linspace(-140.0, 80.0, 4092), torch.tensor([-1e30, 1e30, 0.0, 65.9])])
    s = ((x + shift) / scale).float()
    y = torch.empty_like(s)
    _exp2_affine_kernel[(1,)](s, y, scale, shift, degree, s.numel())
    want = torch.exp2((s.double() * scale - shift).clamp(-126, 66))
    rel = ((y.double() - want) / want).abs()
    normal = want >= 2.0**-125  # at the clamp 2**-126 * p(0) < 2**-126 is a subnormal: twice
    assert rel[normal].max() < bound  # the relative error of p(0), 1e-38 x 2e-4 absolute
    assert ((y.double() - want).abs()[~normal] <= 2.0**-126 * 2 * bound).all()
    assert rel.max() > bound / 20  # the polynomial really ran (no exact exp2 sneaked in)


FIXED_MAX_CASES = ["dense-bf16", "dense-fp16", "cross", "gqa", "d40", "spread40", "spread100",
                   "spread200", "kpm", "window", "packed"]  # fmt: skip


@pytest.mark.parametrize("case", FIXED_MAX_CASES)
def test_forward_fixed_row_maxima(case, monkeypatch):
    """FIXED_MAX (the Hopper dense bf16 tiles, run here on the interpreter's 32x32 tiles with 1/4
    of the fixed blocks' columns on the FMA pipe): interior blocks after the first run against
    fixed row maxima (fp16 calls keep the online softmax).
    Against the float64 reference: plain dense calls; scores 40 log2 units above the first
    block's maximum (p up to 2**40: the fast loop must be right on its own, also with the
    fallback switched off); 100 units above, on FMA-pipe columns (clamped at 2**66: the fallback
    must redo the program, and without it the two keys' 2:1 weights come out 1:1); 200 units on
    MUFU columns (inf); key padding, windows and packing keep the online softmax (the host never
    asks the kernel for FIXED_MAX there)."""
    from bidirlm.kernels import attention_triton as at

    monkeypatch.setattr(at, "FWD_TMA_FAMILIES", ("interpreter",))
    monkeypatch.setitem(at.FWD_EXP2_SPLIT, "interpreter", [(256, 32, 32, 3, True, 2)])
    torch.manual_seed(0)
    dt = torch.float16 if case == "dense-fp16" else torch.bfloat16
    sq, sk, h, hkv, d = 100, 100, 2, 2, 64
    if case == "cross":
        sk = 90
    elif case == "gqa":
        hkv = 1
    elif case == "d40":
        d = 40
    q, k, v = torch.randn(2, sq, h, d), torch.randn(2, sk, hkv, d), torch.randn(2, sk, hkv, d)
    kw = {}
    if case.startswith("spread"):
        # keys 60 and 61 are FMA-pipe columns of the second 32-key block (its last 8), key 40 a
        # MUFU one; the first block [0, 32) sets the maxima near 0 (q.k ~ N(0, 64))
        q[..., 0] = 4.0
        units = {"spread40": 40, "spread100": 100, "spread200": 200}[case]
        big = units / (4.0 * d**-0.5 * 1.4426950408889634)  # q.k * scale * log2(e) = units
        key = 40 if case == "spread200" else 60
        k[:, key, :, 0] = big
        k[:, key + 1, :, 0] = big - 1.5
    elif case == "kpm":
        kpm = torch.ones(2, sk, dtype=torch.bool)
        kpm[1, 61:] = False
        kw["kpm"] = kpm
    elif case == "window":
        kw["window"] = (20, 33)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if case == "packed":
        cu = torch.tensor([0, 70, 75, 108], dtype=torch.int32)
        _forward_vs_reference(*(torch.randn(108, 2, 64).to(dt) for _ in range(3)), cu=cu)
        return
    _forward_vs_reference(q, k, v, **kw)
    if case in ("spread40", "spread100"):
        monkeypatch.setattr(at, "FIXED_LIMIT", tl.constexpr(float("inf")))  # no fallback
        if case == "spread40":
            _forward_vs_reference(q, k, v)
        else:
            with pytest.raises(AssertionError):
                _forward_vs_reference(q, k, v)


def test_hopper_forward_descriptors_and_exp2_split_choice(monkeypatch):
    """On sm_90 the forward gets K/V descriptors (dense 4-d box, packed 3-d) for 16-bit inputs,
    pointers for float32 and under autotuning; the FMA-pipe exp2 share and (bf16) the fixed row
    maxima go with the dense tiles they were sized on (hd64 128x256: 1/8 of the online blocks'
    columns, 1/4 of the fixed ones; hd128 128x128: the rescale factors, 1/8 of the fixed blocks'
    columns), never to the issue-bound variant tiles."""
    from bidirlm.kernels.attention_triton import AttnShape, _fwd_operands, _plan

    def launch(d, hkv=4, packed=False, dtype=torch.bfloat16):
        shape = AttnShape(2, 256, 4, hkv, d, packed)
        plan = _plan("hopper", False, dtype, shape, False, False, False, False, False)
        kv_shape = (512, hkv, d) if packed else (2, 256, hkv, d)
        k, v = torch.zeros(kv_shape, dtype=dtype), torch.zeros(kv_shape, dtype=dtype)
        return _fwd_operands(plan, k, v, packed)

    def choice(kw):
        fixed = kw["FIXED_LOG"] if kw["FIXED_MAX"] else None
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["POLY_LOG"], kw["POLY_ALPHA"], fixed

    *_, kd, _, kw = launch(64)
    assert kw["USE_DESC"] and kd.block_shape == [1, 256, 1, 64]
    assert choice(kw) == (128, 256, 3, False, 2)
    *_, kw = launch(128)
    assert choice(kw) == (128, 128, 0, True, 3)
    for d, want in ((64, (128, 256, 3, False, None)), (128, (128, 128, 0, True, None))):
        *_, kw = launch(d, dtype=torch.float16)  # fp16: the online softmax (P overflows at 2**16)
        assert choice(kw) == want
    for d in (64, 128):  # GQA: the variant tiles, every exp2 on MUFU, online softmax
        *_, kw = launch(d, hkv=2)
        assert (kw["POLY_LOG"], kw["POLY_ALPHA"], kw["FIXED_MAX"]) == (0, False, False)
    *_, kd, _, kw = launch(128, packed=True)
    assert kd.block_shape == [kw["BLOCK_N"], 1, 128] and not kw["FIXED_MAX"]
    *_, kd, _, kw = launch(64, dtype=torch.float32)
    assert kd is None and not kw["USE_DESC"]
    from bidirlm.kernels import attention_triton

    monkeypatch.setattr(attention_triton, "autotune_enabled", lambda: True)  # GPU-only switch
    *_, kd, _, kw = launch(64)
    assert kd is None and not kw["USE_DESC"]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_launches_do_not_grow_with_the_batch(head_dim, monkeypatch, device):
    """Triton launches of one forward and one backward, counted as they run, at two batch and
    sequence sizes, on sm_90's plan shapes: head dim 64 accumulates dQ by atomics inside dK/dV
    (forward 1; backward preprocess + dK/dV), head dim 128 has its own dQ kernel and the wide
    dK/dV tile on descriptors (backward preprocess + dK/dV + dQ)."""
    if device.type != "cpu":
        pytest.skip("counts the interpreter's launches (same launchers on a GPU)")
    from bidirlm.kernels import attention_triton as at
    from bidirlm.kernels import flash_attn_compat as fa

    monkeypatch.setattr(at, "ATOMIC_DQ_MAX_D", {**at.ATOMIC_DQ_MAX_D, "interpreter": 64})
    monkeypatch.setattr(
        at, "WIDE_DK_CONFIGS", {"interpreter": {128: at.LaunchConfig(64, 32, 1, 1)}}
    )
    names = count_triton_launches(monkeypatch)
    expected_bwd = ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    if head_dim > 64:
        expected_bwd.append("_attn_bwd_dq_kernel")
    at._plan.cache_clear()
    try:
        for batch, seqlen in ((1, 40), (3, 130)):
            q, k, v = _inputs((batch, seqlen, 2, head_dim), (batch, seqlen, 2, head_dim),
                              torch.float16, device)  # fmt: skip
            out = fa.flash_attn_func(q, k, v)
            assert names == ["_attn_fwd_kernel"], (batch, seqlen, names)
            names.clear()
            out.backward(torch.randn_like(out))
            assert sorted(names) == sorted(expected_bwd), (batch, seqlen, names)
            names.clear()
    finally:
        at._plan.cache_clear()
