"""Inference and evaluation of fine-tuned classifiers (`encoder.head` set, see `models.heads`).

- `predict_logits(module_or_encoder, examples, ...)`: float32 logits per example, in order;
  sequence heads `[N, C]`, token heads one `[n_words, C]` array per example (the logits of each
  word's first subword; NaN rows for words truncated away).
- `decode(head, logits)`: labels and scores. Single-label: the argmax label and its softmax
  probability; multi-label: the labels whose sigmoid is >= 0.5, with every label's probability;
  regression: the values; token tasks: one tag (and probability) per word, `O` (or label 0) for
  truncated words.
- `evaluate_classifier(model, data)` / `predict_file(model, input, output)`: what `bidirlm eval
  MODEL --task FILE` and `bidirlm predict` run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bidirlm.runtime.models import Encoder, load_model
from bidirlm.runtime.models.heads import head_kind
from bidirlm.runtime.training.task_data import (
    TaskRecords,
    encode_records,
    iter_batches,
    read_records,
)

from .classification import task_metrics


def _forward_logits(
    module: nn.Module, ids: torch.Tensor, cu: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Logits of a packed batch from an `Encoder` with a head or a trainer's task module."""
    if isinstance(module, Encoder):
        if module.head is None:
            raise ValueError("the model has no classification head")
        hidden = module(ids, cu_seqlens=cu, max_seqlen=max_seqlen)
        return module.head(hidden, cu_seqlens=cu)
    return module(ids, cu, max_seqlen)  # the training module (or DDP): labels=None -> logits


@torch.no_grad()
def predict_logits(
    module: nn.Module,
    examples: Sequence[Any],
    *,
    kind: str,
    problem_type: str,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[np.ndarray] | np.ndarray:
    """float32 logits of `examples` (`task_data.TaskExample`s), batched in order, eval mode."""
    if device is None:
        device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    rows: list[np.ndarray] = []
    try:
        for _, batch in iter_batches(examples, batch_size, kind, problem_type):
            ids, cu = batch.input_ids.to(device), batch.cu_seqlens.to(device)
            with amp() if amp is not None else contextlib.nullcontext():
                logits = _forward_logits(module, ids, cu, batch.max_seqlen)
            rows.append(logits.float().cpu().numpy())
    finally:
        module.train(was_training)
    if kind == "sequence":
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(rows)
    flat = np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)
    out, offset = [], 0
    for ex in examples:
        n = len(ex.input_ids)
        tok = flat[offset : offset + n]
        offset += n
        words = np.full((len(ex.word_starts), tok.shape[1]), np.nan, dtype=np.float32)
        for w, j in enumerate(ex.word_starts):
            if j >= 0:
                words[w] = tok[j]
        out.append(words)
    return out


def _fallback_index(labels: Sequence[str]) -> int:
    return list(labels).index("O") if "O" in labels else 0


def decode(
    kind: str, problem_type: str, labels: Sequence[str], logits: Any
) -> tuple[list[Any], list[Any]]:
    """(predicted label indices / values, scores) from `predict_logits`' output."""
    if kind == "token":
        preds, scores = [], []
        fallback = _fallback_index(labels)
        for words in logits:
            if words.shape[0] == 0:
                preds.append([])
                scores.append([])
                continue
            ok = ~np.isnan(words).any(1)
            probs = _softmax(np.nan_to_num(words))
            idx = np.where(ok, probs.argmax(1), fallback)
            preds.append([int(i) for i in idx])
            scores.append([float(probs[w, i]) if ok[w] else 0.0 for w, i in enumerate(idx)])
        return preds, scores
    if problem_type == "single_label":
        probs = _softmax(logits)
        idx = probs.argmax(1)
        return [int(i) for i in idx], [float(probs[r, i]) for r, i in enumerate(idx)]
    if problem_type == "multi_label":
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return [[int(v) for v in row >= 0.5] for row in probs], [list(map(float, r)) for r in probs]
    return [list(map(float, row)) for row in logits], [list(map(float, row)) for row in logits]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def references(kind: str, examples: Sequence[Any]) -> list[Any]:
    """Gold labels of encoded examples in the layout `task_metrics` takes."""
    if kind == "token":
        return [list(ex.word_labels) for ex in examples]
    return [ex.label for ex in examples]


def score_examples(
    module: nn.Module,
    examples: Sequence[Any],
    *,
    kind: str,
    problem_type: str,
    labels: Sequence[str],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """`task_metrics` of the module's predictions on labelled examples."""
    logits = predict_logits(
        module,
        examples,
        kind=kind,
        problem_type=problem_type,
        batch_size=batch_size,
        device=device,
        amp=amp,
    )
    preds, _ = decode(kind, problem_type, labels, logits)
    out = task_metrics(kind, problem_type, labels, references(kind, examples), preds)
    out["n"] = len(examples)
    return out


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
