"""Learning-rate schedules as pure functions of the step: resuming needs no scheduler state.

`lr_factor(step, ...)` is the multiplier of the peak learning rate used for optimizer step
`step` (0-based), in [0, 1]:

- warmup (all schedules): linear from 1/(warmup+1) to 1 over the first `warmup_steps` steps
  (never 0, so the first step moves the weights);
- `constant`: 1 after warmup;
- `linear`: linear decay from 1 to `min_lr_ratio` over the steps after warmup;
- `cosine`: half-cosine from 1 to `min_lr_ratio` over the steps after warmup;
- `wsd` (warmup-stable-decay, MiniCPM arXiv 2404.06395): 1 until the last
  `decay_fraction * total_steps` steps, then linear down to `min_lr_ratio` at the final step.
"""

from __future__ import annotations

import math

SCHEDULES = ("wsd", "cosine", "constant", "linear")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    schedule: str = "wsd",
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning-rate multiplier for 0-based optimizer step `step` of `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = int(round(decay_fraction * total_steps))
        decay_start = max(total_steps - decay_steps, warmup_steps)
        if step < decay_start or decay_steps == 0:
            return 1.0
        # Reaches min_lr_ratio at the last step (total_steps - 1).
        progress = (step - decay_start + 1) / max(total_steps - decay_start, 1)
        return 1.0 - (1.0 - min_lr_ratio) * min(progress, 1.0)
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps + 1) / span, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
