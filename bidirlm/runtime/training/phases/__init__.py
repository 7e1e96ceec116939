"""The training phases, one module each, registered in `training.registry.PHASES` (the way
`ArchSpec`s make `models.checkpoint.ARCHS`): a config's `phase` picks one by name.

| phase                     | module                        | trains                          |
|---------------------------|-------------------------------|---------------------------------|
| `causal`                  | `causal.py`                   | next-token prediction           |
| `mntp`                    | `mntp.py`                     | masked next-token prediction    |
| `contrastive`             | `contrastive.py`              | in-batch InfoNCE                |
| `multimodal-contrastive`  | `multimodal_contrastive.py`   | InfoNCE on text, image, audio   |
| `sequence-classification` | `sequence_classification.py`  | a sequence head                 |
| `token-classification`    | `token_classification.py`     | a token head                    |

`base.py` holds the `Phase` protocol and `PhaseBase` (its common choices); a new phase is one
module with a `PhaseBase` subclass and a `register_phase` call (here for the built-in ones).
"""

from __future__ import annotations

from ..registry import PHASES, get_phase, register_phase
from .base import (
    MicroStep,
    Phase,
    PhaseBase,
    PhaseContext,
    RankBatches,
    autocast_dtype,
    decay_groups,
)
from .causal import CausalPhase, next_token_labels
from .contrastive import ContrastivePhase
from .finetune import FineTunePhase, TaskModule, attach_head
from .mntp import MNTPPhase
from .module import PhaseModule
from .multimodal_contrastive import MultimodalContrastivePhase
from .sequence_classification import SequenceClassificationPhase
from .token_classification import TokenClassificationPhase

BUILTIN_PHASES = (
    CausalPhase,
    MNTPPhase,
    ContrastivePhase,
    MultimodalContrastivePhase,
    SequenceClassificationPhase,
    TokenClassificationPhase,
)
for _phase in BUILTIN_PHASES:
    register_phase(_phase)

__all__ = [
    "BUILTIN_PHASES",
    "PHASES",
    "CausalPhase",
    "ContrastivePhase",
    "FineTunePhase",
    "MNTPPhase",
    "MicroStep",
    "MultimodalContrastivePhase",
    "Phase",
    "PhaseBase",
    "PhaseContext",
    "PhaseModule",
    "RankBatches",
    "SequenceClassificationPhase",
    "TaskModule",
    "TokenClassificationPhase",
    "attach_head",
    "autocast_dtype",
    "decay_groups",
    "get_phase",
    "next_token_labels",
    "register_phase",
]
