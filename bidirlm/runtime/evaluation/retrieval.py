"""Retrieval evaluation of an `Encoder` (or a checkpoint folder) on a `RetrievalTask`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime.models import load_model

from .metrics import rank_by_similarity, retrieval_metrics
from .tasks import RetrievalTask, load_task


def embed(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    pooling: str = "mean",
    max_length: int = 512,
) -> torch.Tensor:
    """L2-normalized float32 embeddings `[len(texts), d]` from an `Encoder`; ValueError when any
    is not finite (metrics from NaN/Inf embeddings would be meaningless, yet look plausible)."""
    out = model.encode(
        list(texts), batch_size=batch_size, pooling=pooling, normalize=True, max_length=max_length
    )
    out = torch.as_tensor(out).float().cpu()
    finite = torch.isfinite(out).all(dim=-1) if out.numel() else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"{len(bad)} of {len(out)} embeddings are not finite (NaN/Inf; first: text "
            f"{bad[0]} {str(texts[bad[0]])[:40]!r}): no metrics from them (check the model's "
            "weights, or evaluate in float32)"
        )
    return out


def evaluate(
    model_or_path: Any,
    task: str | Path | RetrievalTask = "embedded",
    *,
    pooling: str = "mean",
    batch_size: int = 32,
    max_length: int = 512,
    query_prefix: str = "",
    bidirectional: bool = True,
    device: str | torch.device | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """Evaluate an `Encoder` (or a checkpoint folder) on a retrieval task.

    Returns ``{"task", "ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100",
    "num_queries", "num_documents"}`` (k sets the cut-off of nDCG and MRR). A path is loaded
    with `load_model(path, bidirectional=..., device=...)`; `query_prefix` is prepended to every
    query (an instruction, as in the contrastive phase).
    """
    retrieval = load_task(task)
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model = load_model(model_or_path, bidirectional=bidirectional, device=device)
    doc_ids = list(retrieval.corpus)
    query_ids = [q for q, rel in retrieval.qrels.items() if rel]
    opts = {"batch_size": batch_size, "pooling": pooling, "max_length": max_length}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            docs = embed(model, [retrieval.corpus[d] for d in doc_ids], **opts)
            queries = embed(model, [query_prefix + retrieval.queries[q] for q in query_ids], **opts)
    finally:
        if was_training:
            model.train()
    ranked = rank_by_similarity(queries, docs, doc_ids, top_k=max(100, k))
    metrics = retrieval_metrics(dict(zip(query_ids, ranked)), retrieval.qrels, k=k)
    return {
        "task": retrieval.name,
        **metrics,
        "num_queries": len(query_ids),
        "num_documents": len(doc_ids),
    }
