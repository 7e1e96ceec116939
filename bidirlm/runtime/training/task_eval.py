"""Predictions and dev scores of classifiers: what the fine-tuning phases evaluate during
training and `bidirlm eval` / `bidirlm predict` compute (`evaluation.classify`, which imports it
from here: training sits below evaluation).

- `predict_logits(module_or_encoder, examples, ...)`: float32 logits per example, in order;
  sequence heads `[N, C]`, token heads one `[n_words, C]` array per example (the logits of each
  word's first subword; NaN rows for words truncated away).
- `decode(kind, problem_type, labels, logits)`: labels and scores. Single-label: the argmax label
  and its softmax probability; multi-label: the labels whose sigmoid is >= 0.5, with every
  label's probability; regression: the values; token tasks: one tag (and probability) per word,
  `O` (or label 0) for truncated words.
- `score_examples(module, examples, ...)`: `task_metrics` of the predictions on labelled
  examples (`task_data.TaskExample`s).
- `trained_max_length(folder)`: the token limit a run's `best/` / `final/` was trained with,
  the default of `bidirlm eval` / `predict` on such a folder (so they agree with `best.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch
from torch import nn

from bidirlm.runtime.models import Encoder

from .multimodal import task_inputs
from .task_config import TASK_PHASES
from .task_data import iter_batches
from .task_metrics import task_metrics


def _forward_logits(
    module: nn.Module,
    ids: torch.Tensor,
    cu: torch.Tensor,
    max_seqlen: int,
    media: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Logits of a packed batch from an `Encoder` with a head or a fine-tuning phase's module
    (`media`: an omni model's extra inputs, `multimodal.task_inputs`)."""
    if isinstance(module, Encoder):
        if module.head is None:
            raise ValueError("the model has no classification head")
        if media is not None:
            hidden = module.forward_multimodal(ids, cu_seqlens=cu, max_seqlen=max_seqlen, **media)
        else:
            hidden = module(ids, cu_seqlens=cu, max_seqlen=max_seqlen)
        return module.head(hidden, cu_seqlens=cu)
    # the training module (or DDP): labels=None -> logits
    return module(ids, cu, max_seqlen, media=media)


def _encoder_of(module: nn.Module) -> nn.Module:
    """The `Encoder` inside a fine-tuning module (possibly wrapped by DDP / FSDP)."""
    while not isinstance(module, Encoder):
        inner = getattr(module, "encoder", None) or getattr(module, "module", None)
        if inner is None:
            raise ValueError("media records need the model's encoder (an omni model)")
        module = inner
    return module


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
            ids, cu, max_seqlen, media = (
                batch.input_ids,
                batch.cu_seqlens,
                batch.max_seqlen,
                None,
            )
            if batch.media is not None:  # image / audio records on an omni model
                media = task_inputs(_encoder_of(module), batch)
                ids, cu = media.pop("input_ids"), media.pop("cu_seqlens")
                max_seqlen = media.pop("max_seqlen")
            with amp() if amp is not None else contextlib.nullcontext():
                logits = _forward_logits(module, ids.to(device), cu.to(device), max_seqlen, media)
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


DEFAULT_MAX_LENGTH = 512


def trained_max_length(model: str | os.PathLike) -> int | None:
    """The `data.max_seq_len` a fine-tuned folder was trained with, when `model` is a run's
    `best/` or `final/` folder: `best.json`'s `max_seq_len` (for `best/`), else the run's
    `config.toml` (of a fine-tuning phase). None for any other folder (`bidirlm eval` /
    `predict` then use 512)."""
    folder = Path(model).expanduser()
    run = folder.parent
    if folder.name not in ("best", "final") or not (run / "config.toml").is_file():
        return None
    if folder.name == "best" and (run / "best.json").is_file():
        try:
            value = json.loads((run / "best.json").read_text(encoding="utf-8")).get("max_seq_len")
        except (OSError, ValueError):
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    try:
        with (run / "config.toml").open("rb") as fh:
            recorded = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if recorded.get("phase") not in TASK_PHASES:  # only fine-tuned classifiers
        return None
    value = (recorded.get("data") or {}).get("max_seq_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
