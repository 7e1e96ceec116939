"""Microbenchmarks of the public ops (forward and forward+backward) and one encoder forward.

On a GPU they time the Triton kernels; on a CPU the torch reference path (timing Triton's
interpreter would measure the interpreter). Shapes are small enough for a CPU run in seconds.
"""

from __future__ import annotations

import pytest
import torch

from bidirlm.kernels import flash_attn_func, flash_attn_varlen_func, infonce_loss, mntp_loss

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32


@pytest.fixture(autouse=True)
def _kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not GPU:
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _fwd_bwd(loss_fn, *inputs: torch.Tensor):  # noqa: ANN001, ANN202
    def step() -> None:
        for t in inputs:
            t.grad = None
        loss_fn().backward()
        _sync()

    return step


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_fwd(benchmark, head_dim: int) -> None:
    q, k, v = (torch.randn(2, 256, 4, head_dim, device=DEVICE, dtype=DTYPE) for _ in range(3))
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), shape=[2, 256, 4, head_dim])
    out = benchmark(lambda: (flash_attn_func(q, k, v), _sync()))
    assert out[0].shape == q.shape


def test_attention_fwd_bwd_gqa(benchmark) -> None:
    q, k, v = _leaf(2, 256, 8, 64), _leaf(2, 256, 2, 64), _leaf(2, 256, 2, 64)
    benchmark(_fwd_bwd(lambda: flash_attn_func(q, k, v).float().sum(), q, k, v))
    assert q.grad is not None and k.grad.shape == k.shape


def test_attention_varlen_fwd_bwd(benchmark) -> None:
    q, k, v = _leaf(600, 4, 64), _leaf(600, 4, 64), _leaf(600, 4, 64)
    cu = torch.tensor([0, 100, 350, 600], device=DEVICE, dtype=torch.int32)
    benchmark(_fwd_bwd(lambda: flash_attn_varlen_func(q, k, v, cu, 250).float().sum(), q, k, v))
    assert v.grad is not None


def test_mntp_loss_fwd_bwd(benchmark) -> None:
    hidden, weight = _leaf(1024, 256), _leaf(4096, 256)
    labels = torch.randint(0, 4096, (1024,), device=DEVICE)
    labels[torch.rand(1024, device=DEVICE) > 0.3] = -100  # 30% labelled, as in MNTP
    benchmark(_fwd_bwd(lambda: mntp_loss(hidden, weight, labels), hidden, weight))
    assert weight.grad is not None


def test_infonce_fwd_bwd(benchmark) -> None:
    queries, docs = _leaf(256, 256), _leaf(512, 256)  # one hard negative per query
    benchmark(_fwd_bwd(lambda: infonce_loss(queries, docs), queries, docs))
    assert docs.grad is not None


def test_encoder_forward(benchmark) -> None:
    from bidirlm.runtime.embedded.tiny import tiny_qwen3_config
    from bidirlm.runtime.models.encoder import Encoder
    from bidirlm.runtime.models.qwen3 import SPEC

    config = SPEC.parse_config(tiny_qwen3_config(512).to_dict())
    model = Encoder(config, bidirectional=True).to(DEVICE).eval()
    ids = torch.randint(0, 512, (4, 128), device=DEVICE)
    with torch.no_grad():
        out = benchmark(lambda: (model(ids), _sync()))
    assert out[0].shape == (4, 128, config.hidden_size)
