"""Gradient caching for contrastive training (Gao et al. 2021, arXiv 2101.06983).

An InfoNCE batch couples every query with every document, so the loss needs all embeddings at
once, but only the embeddings, not the activations behind them. `cached_backward` therefore:

1. embeds the texts in mini-batches without autograd (activations freed at once);
2. computes the loss on the detached embeddings and its gradient with respect to them;
3. re-embeds each mini-batch with autograd and backpropagates the cached embedding gradient.

Peak activation memory is that of one mini-batch, whatever the batch size, for one extra forward
pass. The parameter gradients equal those of the uncached batch up to float summation order; the
RNG state of each mini-batch's first forward is replayed in its second, so dropout (if any)
draws the same masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.profiler import record_function

EmbedFn = Callable[[Sequence[Any]], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextlib.contextmanager
def _replay_rng(state: tuple[torch.Tensor, list[torch.Tensor]] | None) -> Iterator[None]:
    """Run the block with a saved RNG state, then restore the current one."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=range(len(state[1])) if state[1] else []):
        torch.set_rng_state(state[0])
        if state[1]:
            torch.cuda.set_rng_state_all(state[1])
        yield


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def cached_backward(
    embed: EmbedFn,
    queries: Sequence[Any],
    documents: Sequence[Any],
    loss_fn: LossFn,
    mini_batch_size: int,
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Backpropagate `loss_fn(embed(queries), embed(documents))` through mini-batches.

    Args:
        embed: maps a slice of `queries` or `documents` to embeddings `[n, d]` (with autograd
            when grad mode is on).
        queries, documents: the batch's inputs (texts, or anything `embed` takes).
        loss_fn: `(q [B, d], d [M, d]) -> scalar loss` (e.g. `infonce_loss` with its options; it
            may communicate across ranks: it runs exactly once per call on every rank).
        mini_batch_size: texts per re-embedding pass (> 0).
        no_sync: context manager factory that suspends gradient synchronisation across ranks
            (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`); every backward but the
            last runs inside it. None on one process.

    Returns the detached loss. Parameter gradients are accumulated into `.grad` as
    `loss.backward()` would.
    """
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if len(queries) == 0 or len(documents) == 0:
        raise ValueError("cached_backward needs at least one query and one document")
    return cached_backward_chunks(
        embed,
        _chunks(queries, mini_batch_size),
        _chunks(documents, mini_batch_size),
        loss_fn,
        no_sync=no_sync,
    )


def cached_backward_chunks(
    embed: Callable[[Any], torch.Tensor],
    query_chunks: Sequence[Any],
    document_chunks: Sequence[Any],
    loss_fn: LossFn,
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """`cached_backward` over chunks made beforehand (e.g. tokenized by a batch stream):
    `embed(chunk)` gives the chunk's embeddings `[n, d]`; one re-embedding pass per chunk."""
    if not query_chunks or not document_chunks:
        raise ValueError("cached_backward needs at least one query and one document")
    chunks = [("q", c) for c in query_chunks] + [("d", c) for c in document_chunks]

    # 1. embed everything without autograd, remembering each chunk's RNG state
    states, q_parts, d_parts = [], [], []
    with torch.no_grad():
        for kind, chunk in chunks:
            states.append(_rng_state())
            (q_parts if kind == "q" else d_parts).append(embed(chunk))
    q = torch.cat(q_parts).detach().requires_grad_(True)
    d = torch.cat(d_parts).detach().requires_grad_(True)

    # 2. loss and its gradient with respect to the embeddings only
    loss = loss_fn(q, d)
    q_grad, d_grad = torch.autograd.grad(loss, (q, d), allow_unused=True)
    q_grad = torch.zeros_like(q) if q_grad is None else q_grad
    d_grad = torch.zeros_like(d) if d_grad is None else d_grad
    grads = list(torch.split(q_grad, [len(p) for p in q_parts]))
    grads += list(torch.split(d_grad, [len(p) for p in d_parts]))

    # 3. re-embed with autograd and push the cached gradient through each chunk
    for i, ((_, chunk), grad, state) in enumerate(zip(chunks, grads, states)):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        with sync, _replay_rng(state):
            emb = embed(chunk)
            # the trainer's backward range (profiles): here the backward runs inside the loss
            with record_function("bidirlm.train.backward"):
                emb.backward(grad.to(emb.dtype))
    return loss.detach()
