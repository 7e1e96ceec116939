"""Exact retrieval metrics.

Binary relevance: a document is relevant to a query iff the qrels list it with a score > 0. For a
query with relevant set R and a ranking d_1, d_2, ... of the whole corpus:

- ``nDCG@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{i<=k, d_i in R} 1 / log2(i + 1)`` and the ideal
  ``IDCG@k = sum_{i <= min(k, |R|)} 1 / log2(i + 1)`` (the ideal ranking puts all of R first).
- ``MRR@k = 1 / rank`` of the first relevant document when that rank is <= k, else 0.
- ``recall@k = |R ∩ {d_1..d_k}| / |R|``.

Each metric is averaged over the queries that have at least one relevant document (queries
without one are dropped, as pytrec_eval does). Rankings sort by cosine similarity, highest
first; ties keep corpus order (a stable sort), so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def ndcg_at_k(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """nDCG@k of one ranking with binary relevance (ideal DCG from min(k, |relevant|))."""
    _check_k(k)
    if not relevant:
        raise ValueError("nDCG is undefined for a query without relevant documents")
    dcg = sum(1.0 / math.log2(i + 2) for i, doc in enumerate(ranking[:k]) if doc in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def mrr_at_k(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document within the top k (0 if none)."""
    _check_k(k)
    for i, doc in enumerate(ranking[:k]):
        if doc in relevant:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranking: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Fraction of the relevant documents found in the top k."""
    _check_k(k)
    if not relevant:
        raise ValueError("recall is undefined for a query without relevant documents")
    return len(set(ranking[:k]) & set(relevant)) / len(relevant)


def retrieval_metrics(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Collection[str]],
    *,
    k: int = 10,
    recall_ks: Sequence[int] = (1, 10, 100),
) -> dict[str, float]:
    """Mean nDCG@k, MRR@k and recall@each of `recall_ks` over queries with relevant documents.

    `rankings[q]` is query q's ranked document ids (best first, at least max(k, recall_ks) long
    when the corpus allows); `qrels[q]` its relevant ids. A query in qrels without a ranking is
    an error (it would silently inflate the score if skipped).
    """
    judged = [q for q, rel in qrels.items() if rel]
    if not judged:
        raise ValueError("no query has a relevant document: nothing to evaluate")
    missing = [q for q in judged if q not in rankings]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no ranking (e.g. {missing[0]!r})")
    out = {
        f"ndcg@{k}": sum(ndcg_at_k(rankings[q], qrels[q], k) for q in judged) / len(judged),
        f"mrr@{k}": sum(mrr_at_k(rankings[q], qrels[q], k) for q in judged) / len(judged),
    }
    for r in recall_ks:
        out[f"recall@{r}"] = sum(recall_at_k(rankings[q], qrels[q], r) for q in judged) / len(
            judged
        )
    return out


def rank_by_similarity(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_ids: Sequence[str],
    *,
    top_k: int = 100,
    chunk: int = 256,
) -> list[list[str]]:
    """Rank documents for each query by cosine similarity (ties keep corpus order).

    `query_emb [Q, d]`, `doc_emb [D, d]`; returns Q lists of at most `top_k` document ids.
    """
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [Q, d] and [D, d], got {tuple(query_emb.shape)} and "
            f"{tuple(doc_emb.shape)}"
        )
    if doc_emb.shape[0] != len(doc_ids):
        raise ValueError(f"{doc_emb.shape[0]} document embeddings but {len(doc_ids)} ids")
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    d = torch.nn.functional.normalize(doc_emb.float(), dim=-1)
    top_k = min(top_k, d.shape[0])
    out: list[list[str]] = []
    for start in range(0, q.shape[0], chunk):
        scores = q[start : start + chunk] @ d.T
        # A stable sort (not topk) so equal scores rank in corpus order on every platform.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
        out.extend([doc_ids[j] for j in row] for row in order.tolist())
    return out
