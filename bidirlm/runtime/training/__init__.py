"""Training: the loop (`trainer`) and its phases (`phases`, one module each, registered in
`registry`), typed configs, data, MNTP masking, gradient cache, schedules, torch.distributed
wrapping and exact-resume checkpoints."""

from __future__ import annotations

from .config import TrainConfig, load_train_config, train_config_from_dict
from .masking import MNTPCollator, mask_for_mntp, resolve_mask_token_id
from .phases import PHASES, Phase, PhaseBase, register_phase
from .trainer import TrainingError, TrainingInterrupted, train, validate

__all__ = [
    "PHASES",
    "MNTPCollator",
    "Phase",
    "PhaseBase",
    "TrainConfig",
    "TrainingError",
    "TrainingInterrupted",
    "load_train_config",
    "mask_for_mntp",
    "register_phase",
    "resolve_mask_token_id",
    "train",
    "train_config_from_dict",
    "validate",
]
