"""Metrics of fine-tuned classifiers (accuracy, macro/micro-F1, Spearman, seqeval entity F1):
the names of `bidirlm.runtime.training.task_metrics`, where they live since the fine-tuning
phases' dev evaluation needs them below `evaluation/` (see that module for the definitions)."""

from __future__ import annotations

from bidirlm.runtime.training.task_metrics import (
    accuracy,
    entity_scores,
    get_entities,
    is_bio,
    macro_f1,
    metric_names,
    multilabel_scores,
    pearson,
    primary_metric,
    rankdata,
    spearman,
    task_metrics,
)

__all__ = [
    "accuracy",
    "entity_scores",
    "get_entities",
    "is_bio",
    "macro_f1",
    "metric_names",
    "multilabel_scores",
    "pearson",
    "primary_metric",
    "rankdata",
    "spearman",
    "task_metrics",
]
