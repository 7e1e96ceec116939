"""flash-attention's own test grid (tests/test_flash_attn.py), ported: the calls are written
exactly as flash-attn's tests write them (positional dropout_p, `window_size` drawn as a tensor
with `torch.randint(0, seqlen_k, (2,))`, `return_attn_probs=True`, varlen inputs from a padding
mask, `flash_attn_with_kvcache` with new keys, rotary and cache_batch_idx), only the import
changes. The acceptance rule is flash-attn's: the kernel's error against an fp32 reference is at
most 2x (kvcache: 3x) PyTorch's own error in the low dtype, plus 1e-5. Shapes are shrunk for the
Triton interpreter; flash-attn is not installed here (it needs a GPU), so the reference is our
own port of its `attention_ref` rules (bottom-right alignment with the real key count, padding
masks, softcap, ALiBi).
"""

from __future__ import annotations

import math

import pytest
import torch

from bidirlm.kernels.flash_attn_compat import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_with_kvcache,
)


def padding_mask(max_seqlen: int, batch: int, mode: str = "random") -> torch.Tensor:
    """flash-attn's generate_random_padding_mask (modes full / random / third)."""
    if mode == "full":
        lengths = torch.full((batch, 1), max_seqlen)
    elif mode == "random":
        lengths = torch.randint(max(1, max_seqlen - 20), max_seqlen + 1, (batch, 1))
    else:
        lengths = torch.randint(max_seqlen // 3, max_seqlen + 1, (batch, 1))
    return torch.arange(max_seqlen)[None, :] < lengths


def unpad(x: torch.Tensor, mask: torch.Tensor):
    """flash-attn's unpad_input: (rows, indices, cu_seqlens int32, max_seqlen as a 0-d tensor)."""
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[indices], indices, cu, lengths.max()


def pad(rows: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    out = rows.new_zeros(batch * seqlen, *rows.shape[1:])
    out[indices] = rows
    return out.unflatten(0, (batch, seqlen))


def attention_ref(q, k, v, qmask=None, kmask=None, causal=False, window=(-1, -1), softcap=0.0,
                  alibi=None, upcast=True, reorder_ops=False):  # fmt: skip
    """flash-attn's attention_ref rules: per batch the real key count sk (kmask) aligns the
    window bottom-right; padded queries output 0; a query without keys outputs 0."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    b, sq, h, d = q.shape
    sk_all = k.shape[1]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    if reorder_ops:
        s = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    else:
        s = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    sk = (kmask.sum(-1) if kmask is not None else torch.full((b,), sk_all))[:, None, None]
    sqr = (qmask.sum(-1) if qmask is not None else torch.full((b,), sq))[:, None, None]
    row = torch.arange(sq)[None, :, None]
    col = torch.arange(sk_all)[None, None, :]
    pos = row + sk - sqr
    left, right = window
    if causal:
        right = 0
    hidden = torch.zeros(b, sq, sk_all, dtype=torch.bool)
    if kmask is not None:
        hidden |= ~kmask[:, None, :]
    if left >= 0:
        hidden |= col < pos - left
    if right >= 0:
        hidden |= col > torch.minimum(pos + right, sk)
    if alibi is not None:
        slopes = alibi if alibi.dim() == 2 else alibi.expand(b, h)
        s = s - slopes[:, :, None, None].to(s.dtype) * (pos - col).abs()[:, None].to(s.dtype)
    s = s.masked_fill(hidden[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", p, v)
    if qmask is not None:
        out = out.masked_fill(~qmask[:, :, None, None], 0.0)
    return out.to(dtype)


def assert_rule(mine, ref, pt, factor=2.0, name="out"):
    err, err_pt = (mine - ref).abs().max().item(), (pt - ref).abs().max().item()
    assert err <= factor * err_pt + 1e-5, f"{name}: {err:.3g} > {factor} x {err_pt:.3g} + 1e-5"


GRID = [(1, 37), (47, 19), (33, 45)]  # (seqlen_q, seqlen_k)


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", GRID, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,mha_type,d,alibi,kvpacked,softcap", [
    (torch.float16, "mha", 32, False, False, 0.0),
    (torch.bfloat16, "gqa", 40, True, True, 0.0),
    (torch.float16, "mqa", 59, False, False, 5.0),
])  # fmt: skip
def test_flash_attn_output(seqlens, causal, local, dtype, mha_type, d, alibi, kvpacked, softcap):
    seqlen_q, seqlen_k = seqlens
    torch.random.manual_seed(0)
    batch, nheads = 2, 4
    nheads_k = {"mha": nheads, "mqa": 1, "gqa": 2}[mha_type]
    window_size = (-1, -1) if not local else torch.randint(0, seqlen_k, (2,))
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=dtype, requires_grad=True)
    if softcap > 0:
        q = (q.detach() * softcap / 4).requires_grad_()
    if kvpacked:
        kv = torch.randn(batch, seqlen_k, 2, nheads_k, d, dtype=dtype, requires_grad=True)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        k = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, requires_grad=True)
    alibi_slopes = torch.rand(batch, nheads) * 0.3 if alibi else None
    dropout_p = 0.0
    if kvpacked:
        out, lse, S_dmask = flash_attn_kvpacked_func(
            q, kv, dropout_p, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, deterministic=False, return_attn_probs=True,
        )  # fmt: skip
    else:
        out, lse, S_dmask = flash_attn_func(
            q, k, v, dropout_p, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, deterministic=False, return_attn_probs=True,
        )  # fmt: skip
    assert S_dmask is None and lse.shape == (batch, nheads, seqlen_q)
    window = tuple(int(w) for w in window_size)
    kw = dict(causal=causal, window=window, softcap=softcap, alibi=alibi_slopes)
    out_ref = attention_ref(q, k, v, **kw)
    out_pt = attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)
    assert_rule(out, out_ref, out_pt)
    g = torch.randn_like(out)
    inputs = (q, kv) if kvpacked else (q, k, v)
    grads = torch.autograd.grad(out, inputs, g)
    grads_ref = torch.autograd.grad(out_ref, inputs, g)
    grads_pt = torch.autograd.grad(out_pt, inputs, g)
    for name, a, r, p in zip(("dq", "dkv") if kvpacked else ("dq", "dk", "dv"), grads,
                             grads_ref, grads_pt):  # fmt: skip
        assert_rule(a, r, p, name=name)


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(1, 37), (33, 33), (47, 19)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,mha_type,d,kvpacked", [
    (torch.float16, "mha", 32, False),
    (torch.bfloat16, "gqa", 48, True),
])  # fmt: skip
def test_flash_attn_varlen_output(seqlens, causal, local, dtype, mha_type, d, kvpacked):
    seqlen_q, seqlen_k = seqlens
    torch.random.manual_seed(0)
    batch, nheads = 3, 4
    nheads_k = {"mha": nheads, "gqa": 2}[mha_type]
    window_size = (-1, -1) if not local else torch.randint(0, seqlen_k, (2,))
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, requires_grad=True)
    qmask = padding_mask(seqlen_q, batch)
    kmask = padding_mask(seqlen_k, batch, "third" if seqlen_k > 20 else "random")
    q_unpad, idx_q, cu_q, max_q = unpad(q, qmask)
    k_unpad, _, cu_k, max_k = unpad(k, kmask)
    v_unpad, _, _, _ = unpad(v, kmask)
    if kvpacked:
        kv_unpad = torch.stack([k_unpad, v_unpad], dim=1)
        out_unpad, lse, _ = flash_attn_varlen_kvpacked_func(
            q_unpad, kv_unpad, cu_q, cu_k, max_q, max_k, 0.0, causal=causal,
            window_size=window_size, deterministic=False, return_attn_probs=True,
        )  # fmt: skip
    else:
        out_unpad, lse, _ = flash_attn_varlen_func(
            q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, 0.0, causal=causal,
            window_size=window_size, deterministic=False, return_attn_probs=True,
        )  # fmt: skip
    out = pad(out_unpad, idx_q, batch, seqlen_q)
    window = tuple(int(w) for w in window_size)
    kw = dict(causal=causal, window=window)
    out_ref = attention_ref(q, k, v, qmask, kmask, **kw)
    out_pt = attention_ref(q, k, v, qmask, kmask, upcast=False, reorder_ops=True, **kw)
    assert_rule(out, out_ref, out_pt)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), g)
    grads_pt = torch.autograd.grad(out_pt, (q, k, v), g)
    for name, a, r, p in zip(("dq", "dk", "dv"), grads, grads_ref, grads_pt):
        assert_rule(a, r, p, name=name)
    assert not lse.isneginf().any()  # flash-attn writes +inf for a row without keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen", [17, 33])
def test_flash_attn_qkvpacked(seqlen, causal):
    torch.random.manual_seed(0)
    qkv = torch.randn(2, seqlen, 3, 4, 32, dtype=torch.float16, requires_grad=True)
    out, lse, _ = flash_attn_qkvpacked_func(qkv, 0.0, causal=causal, return_attn_probs=True)
    q, k, v = qkv.unbind(2)
    out_ref = attention_ref(q, k, v, causal=causal)
    out_pt = attention_ref(q, k, v, causal=causal, upcast=False, reorder_ops=True)
    assert_rule(out, out_ref, out_pt)
    g = torch.randn_like(out)
    (dqkv,), (dref,), (dpt,) = (torch.autograd.grad(o, qkv, g) for o in (out, out_ref, out_pt))
    assert_rule(dqkv, dref, dpt, name="dqkv")


def rotary_ref(x, cos, sin, positions, interleaved):
    """flash-attn's apply_rotary_emb on x [B, S, H, D] at integer positions [B, S] (fp32)."""
    rd = cos.shape[-1] * 2
    c, s = cos[positions][:, :, None].float(), sin[positions][:, :, None].float()
    head = x[..., :rd].float()
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, dim=-1)
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([rot.to(x.dtype), x[..., rd:]], -1)


@pytest.mark.parametrize("has_batch_idx", [False, True])
@pytest.mark.parametrize("local,causal", [(False, False), (False, True), (True, False)])
# flash-attn rotates only appended keys: rotary cases all have new_kv
@pytest.mark.parametrize("new_kv,rotary_fraction,rotary_interleaved", [
    (False, 0.0, False), (True, 0.0, False), (True, 0.5, False), (True, 0.5, True),
])  # fmt: skip
@pytest.mark.parametrize("seqlens", [(1, 48), (9, 40)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_flash_attn_kvcache(seqlens, new_kv, local, causal, has_batch_idx, rotary_fraction,
                            rotary_interleaved):  # fmt: skip
    seqlen_q, seqlen_k = seqlens
    torch.random.manual_seed(0)
    dtype, batch, nheads, nheads_k, d = torch.float16, 2, 4, 2, 32
    batch_cache = 2 * batch if has_batch_idx else batch
    seqlen_new = min(seqlen_q, 5) if new_kv else 0
    window_size = (-1, -1) if not local else torch.randint(0, seqlen_k, (2,))
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=dtype)
    k = torch.randn(batch, seqlen_new, nheads_k, d, dtype=dtype) if new_kv else None
    v = torch.randn(batch, seqlen_new, nheads_k, d, dtype=dtype) if new_kv else None
    k_cache = torch.randn(batch_cache, seqlen_k, nheads_k, d, dtype=dtype)
    v_cache = torch.randn(batch_cache, seqlen_k, nheads_k, d, dtype=dtype)
    rotary_dim = math.floor(int(rotary_fraction * d) / 16) * 16
    span = seqlen_q if (causal or local) and rotary_dim > 0 else seqlen_new
    cache_seqlens = torch.randint(0, seqlen_k - span + 1, (batch,), dtype=torch.int32)
    cache_batch_idx = torch.randperm(batch_cache, dtype=torch.int32)[:batch] if has_batch_idx \
        else None  # fmt: skip
    cos = sin = None
    if rotary_dim > 0:
        angle = torch.rand(seqlen_k, rotary_dim // 2) * 2 * math.pi
        cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    rows = cache_batch_idx.long() if has_batch_idx else torch.arange(batch)
    k_cache_ref, v_cache_ref = k_cache[rows].clone(), v_cache[rows].clone()
    q_ro = q
    if new_kv:
        pos_new = cache_seqlens.long()[:, None] + torch.arange(seqlen_new)
        k_ro = rotary_ref(k, cos, sin, pos_new, rotary_interleaved) if cos is not None else k
        for b in range(batch):
            span = slice(int(cache_seqlens[b]), int(cache_seqlens[b]) + seqlen_new)
            k_cache_ref[b, span], v_cache_ref[b, span] = k_ro[b], v[b]
        if cos is not None:
            offs = torch.arange(seqlen_q) if causal or local else torch.zeros(seqlen_q, dtype=int)
            q_ro = rotary_ref(q, cos, sin, cache_seqlens.long()[:, None] + offs, rotary_interleaved)
    kmask = torch.arange(seqlen_k)[None, :] < (cache_seqlens[:, None] + seqlen_new)
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx, causal=causal, window_size=window_size,
        rotary_interleaved=rotary_interleaved, num_splits=0, return_softmax_lse=True,
    )  # fmt: skip
    window = tuple(int(w) for w in window_size)
    kw = dict(causal=causal, window=window)
    out_ref = attention_ref(q_ro, k_cache_ref, v_cache_ref, None, kmask, **kw)
    out_pt = attention_ref(q_ro, k_cache_ref, v_cache_ref, None, kmask, upcast=False,
                           reorder_ops=True, **kw)  # fmt: skip
    assert_rule(out, out_ref, out_pt, factor=3.0)
    assert lse.shape == (batch, nheads, seqlen_q) and not lse.isneginf().any()
    if new_kv:  # written in place, rotated
        atol = 1e-3 if cos is not None else 0.0
        torch.testing.assert_close(k_cache[rows], k_cache_ref, atol=atol, rtol=1e-3)
        torch.testing.assert_close(v_cache[rows], v_cache_ref, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_flash_attn_deterministic(causal, local):
    """flash-attn's test_flash_attn_deterministic: with deterministic=True, repeated backward
    passes give bitwise-equal gradients (dense and varlen)."""
    torch.random.manual_seed(0)
    batch, seqlen_q, seqlen_k, nheads, nheads_k, d = 2, 33, 45, 4, 2, 32
    window_size = (-1, -1) if not local else torch.randint(0, seqlen_k, (2,))
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, seqlen_k, nheads_k, d, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, seqlen_k, nheads_k, d, dtype=torch.bfloat16, requires_grad=True)
    out = flash_attn_func(q, k, v, 0.0, causal=causal, window_size=window_size,
                          deterministic=True)  # fmt: skip
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    qmask, kmask = padding_mask(seqlen_q, batch), padding_mask(seqlen_k, batch)
    q_unpad, _, cu_q, max_q = unpad(q, qmask)
    k_unpad, _, cu_k, max_k = unpad(k, kmask)
    v_unpad, _, _, _ = unpad(v, kmask)
    out = flash_attn_varlen_func(
        q_unpad, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, 0.0, causal=causal,
        window_size=window_size, deterministic=True,
    )  # fmt: skip
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
