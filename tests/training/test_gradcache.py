"""Gradient cache: same loss and parameter gradients as the uncached contrastive batch."""

from __future__ import annotations

import pytest
import torch

from bidirlm.kernels import infonce_loss
from bidirlm.runtime.embedded import tiny_qwen3_config
from bidirlm.runtime.models import Encoder, pool
from bidirlm.runtime.models.config import ModelConfig
from bidirlm.runtime.training.gradcache import cached_backward


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is kernel-agnostic; the torch reference path keeps these tests fast on a CPU
    (the Triton kernels are covered by their own tests and the training convergence tests)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def _tiny_encoder() -> Encoder:
    from bidirlm.runtime.models.checkpoint import ARCHS

    hf = tiny_qwen3_config(96, hidden_size=32, intermediate_size=48, head_dim=8).to_dict()
    spec = next(s for s in ARCHS.values() if "qwen3" in s.model_types)
    config: ModelConfig = spec.parse_config(hf)
    torch.manual_seed(0)
    model = Encoder(config, bidirectional=True, hf_config=hf)
    for p in model.parameters():  # real-looking weights (the default init leaves norms at 1)
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, 1.0, 0.1)
    return model.train()


def _embed_fn(model: Encoder):
    def embed(seqs: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor([t for s in seqs for t in s])
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor([len(s) for s in seqs]).cumsum(0)
        hidden = model(ids, cu_seqlens=cu, max_seqlen=max(len(s) for s in seqs))
        return pool(hidden, pooling="mean", cu_seqlens=cu)

    return embed


def _batch(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 11, (n,), generator=g)
    return [torch.randint(0, 96, (int(k),), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("mini_batch_size", [4, 64])
def test_cached_gradients_equal_the_full_batch(mini_batch_size: int) -> None:
    model = _tiny_encoder()
    embed = _embed_fn(model)
    queries, documents = _batch(6, 1), _batch(11, 2)  # 6 positives + 5 hard negatives

    def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return infonce_loss(q, d, temperature=0.05, symmetric=True)

    full = loss_fn(embed(queries), embed(documents))
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    cached = cached_backward(embed, queries, documents, loss_fn, mini_batch_size)
    assert not cached.requires_grad
    torch.testing.assert_close(cached, full.detach(), rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        scale = expected[name].abs().max().clamp(min=1e-6)
        err = (param.grad - expected[name]).abs().max() / scale
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
    assert any(g.abs().max() > 0 for g in expected.values())


def test_dropout_masks_are_replayed() -> None:
    """With dropout, the re-embedding must draw the masks of the first pass: the gradient then
    matches the analytic gradient of the loss the first pass computed."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5)).train()
    inputs = torch.randn(6, 4)

    def embed(rows: list[int]) -> torch.Tensor:
        return layer(inputs[list(rows)])

    def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return infonce_loss(q, d, normalize=False, temperature=1.0)

    torch.manual_seed(5)
    loss = cached_backward(embed, [0, 1, 2], [3, 4, 5], loss_fn, mini_batch_size=1)
    grad = layer[0].weight.grad.clone()
    # Replay the same RNG stream without the cache: chunk by chunk, in the same order.
    layer.zero_grad()
    torch.manual_seed(5)
    q = torch.cat([embed([i]) for i in (0, 1, 2)])
    d = torch.cat([embed([i]) for i in (3, 4, 5)])
    ref = loss_fn(q, d)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, layer[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_bad_arguments() -> None:
    embed = _embed_fn(_tiny_encoder())
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        cached_backward(embed, _batch(2, 0), _batch(2, 1), lambda q, d: q.sum(), 0)
    with pytest.raises(ValueError, match="at least one query and one document"):
        cached_backward(embed, [], _batch(2, 1), lambda q, d: q.sum(), 2)


@pytest.mark.gpu
def test_large_batch_fits_with_cache_peak_memory() -> None:
    """Batch 512, mini-batch 16: peak activation memory is a fraction of the uncached batch's."""
    from bidirlm.runtime.models.checkpoint import ARCHS

    hf = tiny_qwen3_config(
        1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4
    ).to_dict()
    spec = next(s for s in ARCHS.values() if "qwen3" in s.model_types)
    model = Encoder(spec.parse_config(hf), bidirectional=True, hf_config=hf).cuda().train()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1024, (128,), generator=g).tolist() for _ in range(1024)]
    queries, documents = seqs[:512], seqs[512:]

    def embed(batch: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor([t for s in batch for t in s], device="cuda")
        cu = torch.arange(0, 128 * len(batch) + 1, 128, dtype=torch.int32, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return pool(
                model(ids, cu_seqlens=cu, max_seqlen=128), pooling="mean", cu_seqlens=cu
            ).float()

    def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return infonce_loss(q, d)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_fn(embed(queries), embed(documents)).backward()
    full_peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cached_backward(embed, queries, documents, loss_fn, 16)
    cached_peak = torch.cuda.max_memory_allocated() - base
    assert cached_peak < full_peak / 8, (cached_peak, full_peak)
