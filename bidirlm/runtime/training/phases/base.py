"""The `Phase` protocol: what one training phase gives the loop in `training/trainer.py`.

The loop (schedule, accumulation, clipping, the non-finite policy, checkpoints, signals, logs)
is the same for every phase; a phase supplies the rest:

| member                                   | what                                                |
|------------------------------------------|-----------------------------------------------------|
| `name`                                   | the `phase = "..."` of a config                     |
| `step_unit`                              | what a step's size counts: tokens, pairs            |
| `check(config, model_path, log)`         | checks the data before any work; returns it         |
| `bidirectional(config)`                  | the attention of the model it trains                |
| `Phase(context, encoder)`                | builds the phase on the loaded model                |
| `module()`                               | the `nn.Module` it trains (wrapped by DDP/FSDP2)    |
| `batches()`                              | its batch stream (tokenized, resumable)             |
| `loss(module, batch, micro)`             | one micro-step's loss, scaled by `micro.scale`      |
| `param_groups(module, weight_decay)`     | the optimizer's parameter groups                    |
| `state_dict()` / `load_state_dict(...)`  | its own state in checkpoints                        |
| `after_step(run, row)`                   | what it adds to a step's metrics row (dev scores)   |

`PhaseBase` implements every member but `name`, `check`, `batches` and `loss` with the common
choice. A batch has `num_tokens` (this rank's tokens, for tokens/s and MFU); a stream has
`next_batch()`, `state_dict()` / `load_state_dict()` (JSON-serializable) and, when it reads
records, `bad_records` / `first_bad`. Streams are global: micro-batch j of a step is rank
`j % world`'s, so W processes see the batches of one process with W times the accumulation
(`RankBatches`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..distributed import DistInfo

IGNORE_INDEX = -100


@dataclass
class PhaseContext:
    """What the loop hands a phase: the config, the processes, the checked data, autocast."""

    config: TrainConfig
    info: DistInfo
    model_path: Path
    data: Any  # what the phase's `check` returned
    autocast: torch.dtype | None = None  # None: float32
    log: Callable[[str], None] = print

    @property
    def device(self) -> torch.device:
        return self.info.device

    def amp(self) -> contextlib.AbstractContextManager:
        """The run's autocast (a no-op in float32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.dtype` on `device` (None: float32; "auto": bf16 on a GPU)."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if choice == "float32" else getattr(torch, choice)


@dataclass(frozen=True)
class MicroStep:
    """Micro-batch `index` of `accum` in the optimizer step after `step` steps, on `rank`."""

    step: int
    index: int
    accum: int
    rank: int = 0
    world: int = 1

    @property
    def scale(self) -> float:
        """The factor of this micro-batch's loss in the step's (the mean over micro-batches)."""
        return 1.0 / self.accum

    @property
    def global_index(self) -> int:
        """The position of this rank's batch in the global stream (seeds per-batch randomness)."""
        return (self.step * self.accum + self.index) * self.world + self.rank


class RunView(Protocol):
    """The run as a phase sees it after a step (`after_step`): public attributes only."""

    step: int
    output: Path
    info: DistInfo
    module: nn.Module

    @property
    def device(self) -> torch.device: ...

    def amp(self) -> contextlib.AbstractContextManager: ...

    def save_final(self, name: str = "final") -> Path: ...


@runtime_checkable
class Phase(Protocol):
    """One training phase (see the module docstring); registered in `training.registry`."""

    name: ClassVar[str]
    backpropagates: ClassVar[bool]  # True: `loss` runs its own backward, returns it detached
    stop_reason: str  # non-empty: stop the run after this step (early stopping)

    @classmethod
    def check(cls, config: TrainConfig, model_path: Path, log: Callable[[str], None]) -> Any: ...

    @classmethod
    def bidirectional(cls, config: TrainConfig) -> bool: ...

    def module(self) -> nn.Module: ...

    def batches(self) -> Any: ...

    def loss(self, module: nn.Module, batch: Any, micro: MicroStep) -> torch.Tensor: ...

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...

    def after_step(self, run: RunView, row: dict[str, Any]) -> None: ...

    def prepare_copy(self, encoder: nn.Module) -> None: ...


class PhaseBase:
    """The common choices of the `Phase` members; subclasses set `name` and write `check`,
    `batches` and `loss` (and `module` when the encoder alone is not what they train)."""

    name: ClassVar[str] = ""
    backpropagates: ClassVar[bool] = False
    # What `train.tokens_per_step` / `pairs_per_step` count for this phase ("tokens", "pairs");
    # "micro-batches": neither applies, `train.grad_accum` is used (`training/batching.py`).
    step_unit: ClassVar[str] = "micro-batches"

    def __init__(self, context: PhaseContext, encoder: nn.Module) -> None:
        self.context = context
        self.config = context.config
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.stop_reason = ""

    @classmethod
    def bidirectional(cls, config: TrainConfig) -> bool:
        return True

    def module(self) -> nn.Module:
        return self.encoder

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(module, weight_decay)

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        del state

    def after_step(self, run: RunView, row: dict[str, Any]) -> None:
        del run, row

    def prepare_copy(self, encoder: nn.Module) -> None:
        """Give a freshly loaded copy of the model what this phase added to it (a head); the
        FSDP2 run saves its gathered weights into that copy."""
        del encoder


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms and biases), as is customary."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence: independent streams per tuple)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class RankBatches:
    """This rank's share of a global stream: each call draws `world` batches and keeps batch
    `rank` (so every rank advances the stream alike and the state is the inner stream's)."""

    def __init__(self, stream: Any, info: DistInfo) -> None:
        self.stream = stream
        self.rank, self.world = info.rank, info.world_size

    def next_batch(self) -> Any:
        batches = [self.stream.next_batch() for _ in range(self.world)]
        return batches[self.rank]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    @property
    def bad_records(self) -> int:
        return getattr(self.stream, "bad_records", 0)

    @property
    def first_bad(self) -> str | None:
        return getattr(self.stream, "first_bad", None)
