"""`bidirlm profile CONFIG --steps N [--set ...] [--output DIR]`: trace and time breakdown.

Runs N training steps of CONFIG (the same TOML and `--set` overrides as `bidirlm train`, in a
temporary run folder: the config's own `train.output` is never touched) under the torch profiler.
Writes DIR/trace.json (Chrome/Perfetto trace), DIR/breakdown.md and DIR/breakdown.json (time
per op family: attention fwd/bwd, MNTP loss, InfoNCE, other matmuls, norms, optimizer, data
loading, checkpoints, other compute, host gaps) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (TOML), e.g. examples/tiny-mntp.toml")
    parser.add_argument("--steps", type=int, default=5, help="steps to profile (default: 5)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), as for bidirlm train",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bidirlm-profile"),
        help="folder for trace.json and breakdown.md (default: ./bidirlm-profile)",
    )
    add_threads_argument(parser)


@threaded
def run(args: argparse.Namespace) -> int:
    from bidirlm.runtime.training.config import load_train_config
    from bidirlm.runtime.training.profiling import profile_training
    from bidirlm.runtime.training.trainer import TrainingError

    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.output.exists() and not args.output.is_dir():
        raise CommandError(f"--output {args.output} exists and is not a folder")
    try:
        config = load_train_config(args.config, list(args.overrides))
        result = profile_training(config, args.steps, args.output)
    except (FileNotFoundError, ValueError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    print(result.table(), end="")
    print(f"trace: {args.output / 'trace.json'} (open in Perfetto or chrome://tracing)")
    return 0
