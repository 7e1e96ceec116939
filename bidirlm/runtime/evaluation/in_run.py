"""The evaluator a training run is handed for `heldout.tasks` (training imports no evaluation).

`task_evaluator(config)` returns `(encoder, tasks) -> {task: metrics}`: each task is what
`bidirlm eval --task` takes. A fine-tuned classifier (a model with a head) is scored on labelled
JSON Lines (`evaluate_classifier`: accuracy, macro-F1, ...); any other model on a retrieval set
(`evaluate`: nDCG@10, MRR@10, recall@k), pooled like the run's contrastive phase.
`bidirlm train` and `bidirlm pipeline` pass it to `trainer.train(..., evaluator=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from bidirlm.runtime.training.config import TrainConfig

from .classify import evaluate_classifier, is_classifier
from .retrieval import evaluate


def task_evaluator(
    config: TrainConfig, *, batch_size: int = 32, max_length: int | None = None
) -> Callable[[nn.Module, Sequence[str]], dict[str, Any]]:
    """The evaluator of `config.heldout.tasks` (see the module docstring); texts are cut to
    `max_length` tokens (default: the run's `data.document_max_len`)."""
    pooling = config.contrastive.pooling
    max_length = max_length or config.data.document_max_len

    def evaluate_tasks(encoder: nn.Module, tasks: Sequence[str]) -> dict[str, Any]:
        device = next(encoder.parameters()).device
        out: dict[str, Any] = {}
        for task in tasks:
            if is_classifier(encoder):
                out[task] = evaluate_classifier(
                    encoder, task, batch_size=batch_size, max_length=max_length, device=device
                )
            else:
                out[task] = evaluate(
                    encoder,
                    task,
                    pooling=pooling,
                    batch_size=batch_size,
                    max_length=max_length,
                    device=device,
                )
        return out

    return evaluate_tasks
