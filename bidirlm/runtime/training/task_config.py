"""The `[task]` section of the fine-tuning phases (`sequence-classification`,
`token-classification`).

Training data comes from `[[data.sources]]` (JSON Lines files or `embedded:python-*` tasks, see
`bidirlm.runtime.training.task_data`), `data.batch_size` examples per micro-batch, each cut to
`data.max_seq_len` tokens. This section says what to learn and how to evaluate it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bidirlm.runtime.embedded.names import is_embedded

TASK_PHASES = ("sequence-classification", "token-classification")


@dataclass
class TaskConfig:
    # Label names in index order. Empty: read from the training data (sorted names; "O" first
    # for tags; `LABEL_i` for integer labels). Unused for regression.
    labels: list[str] = field(default_factory=list)
    problem_type: Literal["single_label", "multi_label", "regression"] = "single_label"
    # Sequence heads: last (the default: what transformers' *ForSequenceClassification computes),
    # first, mean, or "late" (score each token with dense + GELU + linear, average the logits)
    pooling: Literal["mean", "first", "last", "late"] = "last"
    dropout: float = 0.1  # on the hidden states before the head
    head_lr_multiplier: float = 1.0  # the head's learning rate = optim.lr * this
    class_weights: list[float] = field(default_factory=list)  # one per label; empty: uniform
    label_all_subwords: bool = False  # token tasks: label every subword, not only the first
    dev: str = ""  # dev set (JSON Lines or embedded:...), evaluated every eval_every steps
    eval_every: int = 0  # 0: evaluate only at the end (when dev is set)
    eval_steps: list[int] = field(default_factory=list)  # also evaluate at these steps
    patience: int = 0  # stop after this many evaluations without improvement; 0: never
    metric: str = "auto"  # the dev metric that picks the best checkpoint; auto: by task kind
    eval_batch_size: int = 64
    attention: Literal["bidirectional", "causal"] = "bidirectional"  # causal: the Base variant
    # omni models (records with "image" / "audio"): also train the vision / audio towers, which
    # stay frozen by default
    train_towers: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"task.dropout must be in [0, 1), got {self.dropout}")
        if not self.head_lr_multiplier > 0:
            raise ValueError(f"task.head_lr_multiplier must be > 0, got {self.head_lr_multiplier}")
        if any(not w > 0 for w in self.class_weights):
            raise ValueError(f"task.class_weights must all be > 0, got {self.class_weights}")
        if self.class_weights and self.labels and len(self.class_weights) != len(self.labels):
            raise ValueError(
                f"task.class_weights has {len(self.class_weights)} values but task.labels has "
                f"{len(self.labels)}"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels has duplicates: {self.labels}")
        if self.eval_every < 0:
            raise ValueError("task.eval_every must be >= 0")
        if any(s < 1 for s in self.eval_steps):
            raise ValueError(f"task.eval_steps must be >= 1, got {self.eval_steps}")
        if self.patience < 0:
            raise ValueError("task.patience must be >= 0")
        if self.patience and not self.dev:
            raise ValueError("task.patience needs a task.dev set to evaluate")
        if self.eval_batch_size < 1:
            raise ValueError("task.eval_batch_size must be >= 1")


def resolve_dev_path(data: dict, folder: Path) -> None:
    """Make a relative `task.dev` path of a raw config absolute from the config file's `folder`
    (as `data.sources` paths are)."""
    section = data.get("task")
    dev = section.get("dev") if isinstance(section, dict) else None
    if isinstance(dev, str) and dev and not is_embedded(dev):
        expanded = Path(dev).expanduser()
        if not expanded.is_absolute():
            section["dev"] = os.path.abspath(folder / expanded)
