"""The `sequence-classification` phase: a head on the pooled sequence (single-label,
multi-label or regression), records `{"text": str, "label": L}` or `{"text", "text_pair",
"label"}` (see `task_data`); the rest is the fine-tuning phases' (`finetune.FineTunePhase`)."""

from __future__ import annotations

from .finetune import FineTunePhase


class SequenceClassificationPhase(FineTunePhase):
    name = "sequence-classification"
    kind = "sequence"
