"""Inference and evaluation of fine-tuned classifiers (`encoder.head` set, see `models.heads`).

- `predict_logits`, `decode`, `score_examples`: logits, labels and metrics of encoded examples
  (defined in `bidirlm.runtime.training.task_eval`, where the fine-tuning phases' dev
  evaluation uses them; see there);
- `evaluate_classifier(model, data)` / `predict_file(model, input, output)`: what `bidirlm eval
  MODEL --task FILE` and `bidirlm predict` run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bidirlm.runtime.models import load_model
from bidirlm.runtime.models.heads import head_kind
from bidirlm.runtime.training.task_data import TaskRecords, encode_records, read_records
from bidirlm.runtime.training.task_eval import (
    decode,
    predict_logits,
    references,
    score_examples,
)

__all__ = [
    "decode",
    "evaluate_classifier",
    "is_classifier",
    "predict_logits",
    "predict_records",
    "references",
    "score_examples",
    "write_jsonl",
]


# --------------------------------------------------------------------------------------------
# Files (the eval and predict commands)
# --------------------------------------------------------------------------------------------


def _load(model: Any, device: str | torch.device | None) -> Any:
    if isinstance(model, nn.Module):
        encoder = model
    else:
        encoder = load_model(model, dtype=torch.float32, device=device, bidirectional=None)
    if getattr(encoder, "head", None) is None:
        raise ValueError(
            f"{model}: not a fine-tuned classifier (config.json describes no "
            "*ForSequenceClassification / *ForTokenClassification head)"
        )
    if encoder.tokenizer is None:
        raise ValueError(f"{model}: the checkpoint folder has no tokenizer files")
    return encoder


def _records(data: Any):
    """A file path / embedded name, or an in-memory list of record dicts."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("records: the list is empty")
        if not all(isinstance(r, dict) for r in data):
            raise ValueError("records: expected a list of dicts")
        return TaskRecords("records", [(i + 1, r) for i, r in enumerate(data)])
    return read_records(str(data))


def _encode(encoder: Any, data: Any, *, max_length: int, with_labels: bool):
    head = encoder.head
    records = _records(data)
    examples = encode_records(
        records,
        encoder.tokenizer,
        kind=head.kind,
        labels=head.labels,
        problem_type=head.problem_type,
        max_len=max_length,
        with_labels=with_labels,
    )
    return records, examples


def evaluate_classifier(
    model: Any,
    data: str | Path | Sequence[dict[str, Any]],
    *,
    batch_size: int = 64,
    max_length: int = 512,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Metrics of a fine-tuned classifier (folder or loaded `Encoder`) on labelled data: a JSON
    Lines file, an `embedded:python-*` task name, or a list of record dicts."""
    encoder = _load(model, device)
    head = encoder.head
    _, examples = _encode(encoder, data, max_length=max_length, with_labels=True)
    metrics = score_examples(
        encoder,
        examples,
        kind=head.kind,
        problem_type=head.problem_type,
        labels=head.labels,
        batch_size=batch_size,
    )
    name = "records" if isinstance(data, (list, tuple)) else str(data)
    return {"task": name, "kind": head.kind, "problem_type": head.problem_type, **metrics}


def predict_records(
    model: Any,
    data: str | Path | Sequence[dict[str, Any]],
    *,
    batch_size: int = 64,
    max_length: int = 512,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """One output record per input record (a file, embedded name or list of dicts): the input
    fields plus the prediction.

    Sequence tasks add `prediction` (label name; a list of names for multi-label; the value(s)
    for regression) and `score` (its probability; every label's probability for multi-label);
    token tasks add `predicted_tags` and `scores` (one per word).
    """
    encoder = _load(model, device)
    head = encoder.head
    records, examples = _encode(encoder, data, max_length=max_length, with_labels=False)
    logits = predict_logits(
        encoder, examples, kind=head.kind, problem_type=head.problem_type, batch_size=batch_size
    )
    preds, scores = decode(head.kind, head.problem_type, head.labels, logits)
    out = []
    for (_, record), pred, score in zip(records.rows, preds, scores):
        row = dict(record)
        if head.kind == "token":
            row["predicted_tags"] = [head.labels[i] for i in pred]
            row["scores"] = score
        elif head.problem_type == "single_label":
            row["prediction"], row["score"] = head.labels[pred], score
        elif head.problem_type == "multi_label":
            row["prediction"] = [head.labels[i] for i, on in enumerate(pred) if on]
            row["score"] = dict(zip(head.labels, score))
        else:
            row["prediction"] = pred[0] if len(pred) == 1 else pred
        out.append(row)
    return out


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write rows as JSON Lines atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def is_classifier(model: Any) -> bool:
    """True for a fine-tuned classifier: a loaded model with a head, or a folder whose
    config.json describes one (`*ForSequenceClassification` / `*ForTokenClassification`)."""
    if isinstance(model, nn.Module):
        return getattr(model, "head", None) is not None
    config = Path(str(model)).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return head_kind(json.loads(config.read_text(encoding="utf-8"))) is not None
    except (OSError, ValueError):
        return False
