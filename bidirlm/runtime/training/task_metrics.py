"""Metrics of fine-tuned classifiers, exact and dependency-free (numpy only). They live in
`training/` because the fine-tuning phases' dev evaluation needs them and `training` sits below
`evaluation` (`bidirlm.runtime.evaluation.classification` re-exports them).

- `accuracy`, `macro_f1` (single-label; sklearn's `f1_score(average="macro")`: the mean F1 over
  the classes present in the references or the predictions, 0 for a class never predicted);
- `multilabel_scores` over multi-hot matrices: micro-F1, macro-F1 (every label column counts)
  and subset accuracy (sklearn's `accuracy_score` on indicator matrices);
- `pearson`, `spearman` (Pearson of average ranks, ties shared, as scipy's `spearmanr`);
- `get_entities` / `entity_scores`: entity-level precision, recall and F1 with the semantics of
  seqeval's default (conlleval) mode for IOB2 / BIO / IOBES tags: a chunk starts at `B-`/`S-`, at
  an `I-`/`E-` after `O` or after an entity of another type, and ends before `O`, `B-`, `S-` or a
  change of type; an entity counts only when type, start and end all match. Micro-averaged over
  types, with 0 when undefined (no predicted or no reference entity);
- `task_metrics(...)` picks the metrics of a task kind and `primary_metric(...)` the one that
  selects the best checkpoint: accuracy (single-label), micro-F1 (multi-label), Spearman
  (regression), entity F1 (token tasks whose tags are BIO-shaped) or macro-F1 (other tag sets).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_BIO = re.compile(r"^[BIES]-.+$")


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    _same_length(t, p)
    return float((t == p).mean()) if t.size else 0.0


def _same_length(t: np.ndarray, p: np.ndarray) -> None:
    if t.shape != p.shape:
        raise ValueError(f"y_pred: shape {p.shape} != y_true's {t.shape}")


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean per-class F1 over the classes that occur in `y_true` or `y_pred`."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    _same_length(t, p)
    classes = np.union1d(t, p)
    if classes.size == 0:
        return 0.0
    tp = np.array([np.sum((t == c) & (p == c)) for c in classes], dtype=np.float64)
    fp = np.array([np.sum((t != c) & (p == c)) for c in classes], dtype=np.float64)
    fn = np.array([np.sum((t == c) & (p != c)) for c in classes], dtype=np.float64)
    return float(_f1(tp, fp, fn).mean())


def multilabel_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """`micro_f1`, `macro_f1` and `subset_accuracy` of multi-hot `[N, C]` matrices."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    _same_length(t, p)
    if t.ndim != 2:
        raise ValueError(f"y_true: expected a multi-hot [N, C] matrix, got shape {t.shape}")
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    micro = _f1(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))[0]
    return {
        "micro_f1": float(micro),
        "macro_f1": float(_f1(tp, fp, fn).mean()) if t.shape[1] else 0.0,
        "subset_accuracy": float((t == p).all(1).mean()) if t.shape[0] else 0.0,
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation in float64 (0.0 when either side is constant)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _same_length(a, b)
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy's `rankdata(method="average")`)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(a.size, dtype=np.float64)
    start = 0
    for end in range(1, a.size + 1):
        if end == a.size or sorted_a[end] != sorted_a[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1..end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(rankdata(x), rankdata(y))


# --------------------------------------------------------------------------------------------
# Entity-level scores (seqeval default mode)
# --------------------------------------------------------------------------------------------


def _parse(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "_") from "O"."""
    return tag[0], tag[1:].split("-", 1)[-1] or "_"


def _chunk_ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev not in ("O", ".") and prev_type != type_


def _chunk_starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """`(type, first, last)` chunks of one tag sequence (inclusive word indices)."""
    chunks = []
    prev, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _parse(chunk)
        if _chunk_ends(prev, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _chunk_starts(prev, tag, prev_type, type_):
            begin = i
        prev, prev_type = tag, type_
    return chunks


def entity_scores(
    y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro `entity_precision`, `entity_recall`, `entity_f1` over sentences of tags."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_pred: {len(y_pred)} sentences, y_true has {len(y_true)}")
    true_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    for s, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"y_pred: sentence {s} has {len(p)} tags, y_true has {len(t)}")
        true_set.update((s, *e) for e in get_entities(list(t)))
        pred_set.update((s, *e) for e in get_entities(list(p)))
    tp = len(true_set & pred_set)
    precision = tp / len(pred_set) if pred_set else 0.0
    recall = tp / len(true_set) if true_set else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


def is_bio(labels: Sequence[str]) -> bool:
    """True when every label is `O` or `B-`/`I-`/`E-`/`S-` + a type (and some are not `O`)."""
    return any(lab != "O" for lab in labels) and all(
        lab == "O" or _BIO.match(lab) for lab in labels
    )


# --------------------------------------------------------------------------------------------
# Per task
# --------------------------------------------------------------------------------------------


def primary_metric(kind: str, problem_type: str, labels: Sequence[str]) -> str:
    """The metric that ranks checkpoints (higher is better) for this kind of task."""
    if kind == "token":
        return "entity_f1" if is_bio(labels) else "macro_f1"
    return {"single_label": "accuracy", "multi_label": "micro_f1", "regression": "spearman"}[
        problem_type
    ]


def metric_names(kind: str, problem_type: str, labels: Sequence[str]) -> list[str]:
    """The higher-is-better metrics `task_metrics` reports for this kind of task."""
    if kind == "token":
        entity = ["entity_precision", "entity_recall", "entity_f1"] if is_bio(labels) else []
        return ["accuracy", "macro_f1", *entity]
    return {
        "single_label": ["accuracy", "macro_f1"],
        "multi_label": ["micro_f1", "macro_f1", "subset_accuracy"],
        "regression": ["pearson", "spearman"],
    }[problem_type]


def task_metrics(
    kind: str,
    problem_type: str,
    labels: Sequence[str],
    y_true: Any,
    y_pred: Any,
) -> dict[str, float]:
    """All metrics of a task from references and predictions.

    Sequence tasks: `y_true`/`y_pred` are label indices `[N]` (single-label), multi-hot `[N, C]`
    (multi-label) or floats `[N]` / `[N, C]` (regression). Token tasks: lists of word-level
    label-index sequences (one list per sentence).
    """
    if kind == "token":
        flat_t = np.asarray([i for s in y_true for i in s], dtype=np.int64)
        flat_p = np.asarray([i for s in y_pred for i in s], dtype=np.int64)
        out = {"accuracy": accuracy(flat_t, flat_p), "macro_f1": macro_f1(flat_t, flat_p)}
        if is_bio(labels):
            names = list(labels)
            out.update(
                entity_scores(
                    [[names[i] for i in s] for s in y_true],
                    [[names[i] for i in s] for s in y_pred],
                )
            )
        return out
    if problem_type == "single_label":
        return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred)}
    if problem_type == "multi_label":
        return multilabel_scores(np.asarray(y_true), np.asarray(y_pred))
    t = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    _same_length(t, p)
    return {
        "pearson": float(np.mean([pearson(t[:, j], p[:, j]) for j in range(t.shape[1])])),
        "spearman": float(np.mean([spearman(t[:, j], p[:, j]) for j in range(t.shape[1])])),
        "mse": float(((t - p) ** 2).mean()) if t.size else 0.0,
    }


# --------------------------------------------------------------------------------------------
# JSON without NaN
# --------------------------------------------------------------------------------------------


def finite_or_none(value: Any) -> Any:
    """`value` (dicts / lists / numbers) with every NaN / Inf float replaced by None, so it is
    written as JSON `null` (a bare `NaN` is not JSON)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON of `value`: non-finite numbers become null (`finite_or_none`), and
    `allow_nan=False` guarantees no `NaN` / `Infinity` token is ever written."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)
