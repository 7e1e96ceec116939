"""Cross-device gather for `infonce_loss(..., gather_across_devices=True)`.

`gather_with_grad(x)` concatenates every rank's `x [n_r, d]` (ranks may hold different n_r) in
rank order and returns this rank's row offset in the result. The backward sums the gradient of
the gathered tensor over all ranks (each rank's loss used every rank's rows) and hands each rank
its own slice: the same semantics as `torch.distributed.nn.all_gather` and
sentence-transformers' `all_gather_with_grad`, but with unequal sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "world_size"]


def world_size() -> int:
    """Number of processes in the default group; 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class _GatherRows(torch.autograd.Function):
    """all_gather of `[n_r, d]` rows padded to the largest n_r; backward: all_reduce + slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        largest = max(sizes)
        # all_gather needs equal shapes on every rank: pad to the largest, cut after.
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every rank holds d(own loss)/d(all rows); the owner's gradient is their sum. all_reduce
        # (not reduce_scatter) because gloo has no reduce_scatter and the sizes are unequal.
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(torch.cat(all ranks' x), this rank's row offset)`; `(x, 0)` with one process.

    Every rank must call it (collective), with the same width and dtype.
    """
    if world_size() == 1:
        return x, 0
    rank = dist.get_rank()
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    return _GatherRows.apply(x, sizes, rank), sum(sizes[:rank])
