"""Run monitoring beside `metrics.jsonl`: TensorBoard event files and Weights & Biases.

`Monitors(config, output, enabled)` writes every numeric value of a step's metrics row (nested
tables flattened: `token_shares/english`, `heldout/docs/lm_loss`) to

- TensorBoard, under `OUTPUT/tensorboard/`, when `train.tensorboard` (the default) and the
  `tensorboard` package is installed (`pip install "bidirlm[tensorboard]"`); without the package
  the run says so once and goes on;
- Weights & Biases when `train.wandb = true` (project `train.wandb_project`, run named after the
  output folder, files under `OUTPUT/wandb/`); asking for it without `wandb` installed is a
  one-line error before training (`check_monitors`).

Only the main process writes (`enabled`). `StepLog` is what the trainer writes after each step:
the row appended to `metrics.jsonl`, the monitors, and the console (a progress-bar update on a
terminal, else one line every `train.log_every` steps; token shares and held-out results when
the row has them).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .batching import StepPlan
from .config import TrainConfig
from .mfu import device_name


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def check_monitors(config: TrainConfig) -> None:
    """ValueError when a monitor the config asks for cannot run (before any work)."""
    if config.train.wandb and not wandb_available():
        raise ValueError(
            "train.wandb = true but the wandb package is not installed (pip install wandb)"
        )


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a metrics row, nested tables as `a/b` (booleans as 0/1)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and key != "step":
            out[name] = float(value)
    return out


class Monitors:
    """TensorBoard / W&B writers of one run (see the module docstring)."""

    def __init__(
        self,
        config: TrainConfig,
        output: Path,
        *,
        enabled: bool,
        log: Callable[[str], None] = print,
    ) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        if config.train.tensorboard:
            if tensorboard_available():
                # optional dependency: torch.utils.tensorboard needs the tensorboard package
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(output / "tensorboard"))
            else:
                log(
                    "TensorBoard: the tensorboard package is not installed (pip install "
                    '"bidirlm[tensorboard]"): metrics go to metrics.jsonl only'
                )
        if config.train.wandb:
            import wandb  # optional dependency (asked for by train.wandb; checked before)

            self._wandb = wandb.init(
                project=config.train.wandb_project,
                name=output.name,
                dir=str(output),
                config=config.to_dict(),
                resume="allow",
            )

    @property
    def active(self) -> list[str]:
        return [n for n, w in (("tensorboard", self._tb), ("wandb", self._wandb)) if w]

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        values = flatten(row)
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def token_shares(stream: Any, info: dist_utils.DistInfo) -> dict[str, float] | None:
    """Each source's realised share of the tokens so far, over all ranks (None: the stream does
    not count tokens per source). Collective when the streams are per rank."""
    inner = getattr(stream, "stream", stream)  # RankBatches wraps a global stream
    counts_of = getattr(inner, "token_counts", None)
    if counts_of is None:
        return None
    counts = counts_of()
    if getattr(inner, "per_rank", False):  # each rank counted its own part
        values = torch.tensor(list(counts.values()), dtype=torch.float64)
        counts = dict(zip(counts, dist_utils.all_reduce_sum(values, info).tolist()))
    total = sum(counts.values())
    return {name: (value / total if total else 0.0) for name, value in counts.items()}


def start_notes(
    plan: StepPlan, autocast: torch.dtype | None, peak: float | None, device: torch.device
) -> list[str]:
    """What a run says when it starts: its effective batch, and that MFU is unknown on a device
    without a peak in the table (`mfu.py`; the CPU included) when it trains in bf16/fp16."""
    lines = [f"step: {plan.describe()}"]
    if autocast is not None and peak is None:
        lines.append(
            f"MFU unknown ({device_name(device)} has no {autocast} peak in mfu.py): "
            "logging tokens/s"
        )
    return lines


def log_line(row: dict[str, Any], steps: int) -> str:
    """The console line of a step (MFU when known)."""
    mfu_text = f" mfu {row['mfu']:.1%}" if "mfu" in row else ""
    return (
        f"step {row['step']}/{steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
        f"grad_norm {row['grad_norm']:.3g} tokens/s {row['tokens_per_s']:.0f}{mfu_text}"
    )


def heldout_text(results: dict[str, Any]) -> str:
    return "; ".join(
        f"{name} " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        for name, metrics in results.items()
    )


class StepLog:
    """After each step: `metrics.jsonl`, the monitors and the console (main process only)."""

    def __init__(
        self,
        config: TrainConfig,
        output: Path,
        *,
        main: bool,
        initial: int,
        log: Callable[[str], None],
    ) -> None:
        self.main, self.log = main, log
        self.path = output / "metrics.jsonl"
        self.steps = config.train.steps
        self.log_every = config.train.log_every
        # A bar only on a terminal: in a log file its carriage-return frames pile up.
        self.use_bar = (
            main and config.train.progress_bar and self.log_every > 0 and sys.stderr.isatty()
        )
        self.bar = tqdm(
            total=self.steps,
            initial=initial,
            disable=not self.use_bar,
            desc=config.phase,
            file=sys.stderr,
        )
        self.monitors = Monitors(config, output, enabled=main, log=log)

    def write(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self.monitors.write(row)
        self.bar.update(1)
        step = int(row["step"])
        if self.log_every and (step % self.log_every == 0 or step == self.steps):
            if self.use_bar:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            else:
                self.log(log_line(row, self.steps))
        if "token_shares" in row:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in row["token_shares"].items())
            self.log(f"step {step}: token shares {shares}")
        if "heldout" in row:
            self.log(f"step {step}: held-out {heldout_text(row['heldout'])}")

    def close(self) -> None:
        self.bar.close()
        self.monitors.close()
