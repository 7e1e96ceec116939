"""`infonce_loss(..., gather_across_devices=True)` with two gloo processes on a CPU, against the
single-process loss on the concatenated batch (losses and gradients).

Each rank holds B_r queries and M_r = B_r * 2 documents (its positives, then one hard negative
per query), with B_0 != B_1, so rank 1's positives sit at a nonzero offset of the gathered
documents. On a CPU the workers run the float32 torch path (BIDIRLM_KERNELS=torch): the first
call of any torch.library custom op imports torch._dynamo, several seconds per spawned process;
the Triton op with a positive offset is checked against float64 in test_infonce.py. With a GPU
the workers would not be on it (gloo, CPU tensors), so this file is the same everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bidirlm.kernels import infonce_loss
from tests.helpers import assert_close_to_ref

SIZES = (3, 5)  # queries per rank
WIDTH = 24
CASES = ({"symmetric": False}, {"symmetric": True, "normalize": False, "temperature": 2.0})


def _batch() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank: (queries [B_r, d], positives [B_r, d], hard negatives [B_r, d]), fixed seed."""
    gen = torch.Generator().manual_seed(1234)
    return [tuple(torch.randn(b, WIDTH, generator=gen) for _ in range(3)) for b in SIZES]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["BIDIRLM_KERNELS"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, pos, neg = _batch()[rank]
        results = []
        for case in CASES:
            queries = q.clone().requires_grad_()
            documents = torch.cat([pos, neg]).requires_grad_()
            loss = infonce_loss(queries, documents, gather_across_devices=True, **case)
            loss.backward()
            results.append((loss.detach(), queries.grad, documents.grad))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_matches_single_process(tmp_path) -> None:
    world = len(SIZES)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    batch = _batch()
    starts = [sum(SIZES[:r]) for r in range(world)]
    for index, case in enumerate(CASES):
        # Single process: all queries, then all positives before all hard negatives so that the
        # positive of global query i is documents[i]; the log-sum-exp ignores document order.
        q = torch.cat([b[0] for b in batch]).double().requires_grad_()
        pos = torch.cat([b[1] for b in batch]).double().requires_grad_()
        neg = torch.cat([b[2] for b in batch]).double().requires_grad_()
        per_query = infonce_loss_reference_none(q, torch.cat([pos, neg]), case)
        # Each rank returns the mean over its own queries; the gathered backward sums the ranks'
        # losses, so the gradient reference is that of the sum of the per-rank means.
        rank_losses = [per_query[s : s + n].mean() for s, n in zip(starts, SIZES)]
        torch.stack(rank_losses).sum().backward()
        for r, results in enumerate(per_rank):
            loss, g_queries, g_documents = results[index]
            pass_ = f"case {case}, rank {r}"
            s, n = starts[r], SIZES[r]
            assert_close_to_ref(loss, rank_losses[r].detach(), name=f"loss ({pass_})")
            assert_close_to_ref(g_queries, q.grad[s : s + n], name=f"d queries ({pass_})")
            g_docs = torch.cat([pos.grad[s : s + n], neg.grad[s : s + n]])
            assert_close_to_ref(g_documents, g_docs, name=f"d documents ({pass_})")


def infonce_loss_reference_none(
    queries: torch.Tensor, documents: torch.Tensor, case: dict
) -> torch.Tensor:
    from bidirlm.kernels.reference import infonce_reference

    return infonce_reference(queries, documents, reduction="none", **case)
