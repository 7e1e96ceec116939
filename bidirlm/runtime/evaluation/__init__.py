"""Retrieval evaluation: exact metrics, tasks (embedded or user JSON Lines), `evaluate`."""

from __future__ import annotations

from bidirlm.runtime.embedded.heldout import embedded_task, split_of, stdlib_pairs, stdlib_texts

from .metrics import mrr_at_k, ndcg_at_k, rank_by_similarity, recall_at_k, retrieval_metrics
from .retrieval import embed, evaluate
from .tasks import RetrievalTask, load_retrieval_jsonl, load_task, save_task

__all__ = [
    "RetrievalTask",
    "embed",
    "embedded_task",
    "evaluate",
    "load_retrieval_jsonl",
    "load_task",
    "mrr_at_k",
    "ndcg_at_k",
    "rank_by_similarity",
    "recall_at_k",
    "retrieval_metrics",
    "save_task",
    "split_of",
    "stdlib_pairs",
    "stdlib_texts",
]
