"""`bidirlm train CONFIG.toml [--set section.key=value ...]`: run or resume a training phase.

Re-running the same command resumes from the latest checkpoint under `train.output`. Under
torchrun (`torchrun --nproc-per-node N -m bidirlm.cli train CONFIG.toml`) every process runs it.
Exit codes: 0 done, 1 bad config / data / non-finite losses, 143 stopped by SIGTERM after a
checkpoint.
"""

from __future__ import annotations

import argparse

from bidirlm.cli import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (TOML), e.g. examples/tiny-mntp.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set train.steps=10",
    )


def run(args: argparse.Namespace) -> int:
    from bidirlm.runtime.training.config import load_train_config
    from bidirlm.runtime.training.trainer import TrainingError, TrainingInterrupted, train

    try:
        config = load_train_config(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    try:
        final = train(config)
    except (FileNotFoundError, ValueError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    except TrainingInterrupted as exc:
        print(f"bidirlm train: {exc}")
        return 143
    print(final)
    return 0
