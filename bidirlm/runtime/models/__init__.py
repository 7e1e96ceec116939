"""Lean Qwen3 and Gemma3 encoders that read and write Hugging Face checkpoints.

`load_model(path)` -> `Encoder`; `pool` reduces hidden states to one vector per sequence;
`SequenceClassifier` / `TokenClassifier` are fine-tuning heads (`as_classifier` wraps a loaded one).
"""

from __future__ import annotations

from bidirlm.runtime.models.checkpoint import SUPPORTED_ARCHITECTURES, CheckpointError
from bidirlm.runtime.models.config import ModelConfig, RopeConfig
from bidirlm.runtime.models.encoder import Encoder
from bidirlm.runtime.models.heads import (
    ClassificationHead,
    ClassifierOutput,
    SequenceClassifier,
    TokenClassifier,
    as_classifier,
)
from bidirlm.runtime.models.loading import load_model
from bidirlm.runtime.models.pooling import POOLINGS, packed_positions, pool

__all__ = [
    "POOLINGS",
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "ClassificationHead",
    "ClassifierOutput",
    "Encoder",
    "ModelConfig",
    "RopeConfig",
    "SequenceClassifier",
    "TokenClassifier",
    "as_classifier",
    "load_model",
    "packed_positions",
    "pool",
]
