"""The `token-classification` phase: a head on every token (one tag per word: the first
subword carries it), records `{"tokens": [str, ...], "tags": [T, ...]}` (see `task_data`); the
rest is the fine-tuning phases' (`finetune.FineTunePhase`)."""

from __future__ import annotations

from .finetune import FineTunePhase


class TokenClassificationPhase(FineTunePhase):
    name = "token-classification"
    kind = "token"
