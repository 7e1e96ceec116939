"""The size of one optimizer step: `train.tokens_per_step` / `train.pairs_per_step` -> accumulation.

A run states its global batch, as the paper does (Table 2: 2,359,296 tokens per MNTP step = 96
GPUs x 3 accumulation steps x 8,192 tokens; Table 3: 512 pairs per contrastive step), and the
runtime derives the gradient accumulation from the world size and the micro-batch at launch:

- causal / MNTP: `grad_accum = tokens_per_step / (world_size x data.tokens_per_batch)`, which
  must be a whole number (a packed micro-batch holds exactly `data.tokens_per_batch` tokens);
- contrastive: `grad_accum = pairs_per_step / data.batch_size` (a contrastive micro-batch of
  `data.batch_size` pairs is shared by the ranks: its in-batch negatives span all of them).

Without either key the step is `train.grad_accum` micro-batches, as before. `step_plan` raises a
one-line ValueError naming the keys when the numbers do not divide; the trainer logs the plan
and writes it to every metrics row (`grad_accum`, `world_size`, `tokens_per_step` /
`pairs_per_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .registry import get_phase


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: `grad_accum` micro-batches on each of `world_size` ranks."""

    grad_accum: int
    world_size: int
    unit: str  # "tokens", "pairs" or "micro-batches"
    per_step: int  # units per optimizer step (micro-batches x accumulation when not given)

    def describe(self) -> str:
        return (
            f"{self.per_step:,} {self.unit} per step = {self.world_size} rank(s) x "
            f"{self.grad_accum} accumulation step(s)"
        )


def _unit(config: TrainConfig) -> str:
    """What a step of this phase is counted in (the phase's `step_unit`)."""
    return getattr(get_phase(config.phase), "step_unit", "micro-batches")


def step_plan(config: TrainConfig, world_size: int = 1) -> StepPlan:
    """The accumulation of `config` on `world_size` ranks (ValueError naming the keys)."""
    train, data = config.train, config.data
    unit = _unit(config)
    if train.tokens_per_step:
        if unit != "tokens":
            raise ValueError(
                f"train.tokens_per_step applies to the causal and mntp phases, not "
                f"{config.phase}" + ("; use train.pairs_per_step" if unit == "pairs" else "")
            )
        micro = world_size * data.tokens_per_batch
        if train.tokens_per_step % micro:
            raise ValueError(
                f"train.tokens_per_step={train.tokens_per_step} is not a multiple of "
                f"data.tokens_per_batch={data.tokens_per_batch} x {world_size} rank(s) = {micro}"
            )
        return StepPlan(train.tokens_per_step // micro, world_size, unit, train.tokens_per_step)
    if train.pairs_per_step:
        if unit != "pairs":
            raise ValueError(
                f"train.pairs_per_step applies to the contrastive phases, not {config.phase}"
                + ("; use train.tokens_per_step" if unit == "tokens" else "")
            )
        if train.pairs_per_step % data.batch_size:
            raise ValueError(
                f"train.pairs_per_step={train.pairs_per_step} is not a multiple of "
                f"data.batch_size={data.batch_size}"
            )
        return StepPlan(
            train.pairs_per_step // data.batch_size, world_size, unit, train.pairs_per_step
        )
    accum = train.grad_accum
    if unit == "tokens":
        return StepPlan(accum, world_size, unit, accum * world_size * data.tokens_per_batch)
    if unit == "pairs":
        return StepPlan(accum, world_size, unit, accum * data.batch_size)
    return StepPlan(accum, world_size, unit, accum * world_size)
