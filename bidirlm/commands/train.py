"""`bidirlm train CONFIG.toml [--set section.key=value ...]`: run or resume a training phase.

Re-running the same command resumes from the latest checkpoint under `train.output`; a resume
with a changed config is refused unless `--allow-config-change` is given. Under torchrun
(`torchrun --nproc-per-node N -m bidirlm.cli train CONFIG.toml`) every process runs it.
Exit codes: 0 done, 1 bad config / data / non-finite values, 143 stopped by SIGTERM and 130 by
Ctrl-C (both after a checkpoint; a second Ctrl-C aborts without one).
"""

from __future__ import annotations

import argparse

from bidirlm.cli import CommandError
from bidirlm.commands._limits import check_max_seq_len
from bidirlm.commands._threads import add_threads_argument, torch_threads


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
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run whose config.toml differs from this config (same as "
        "--set train.allow_config_change=true; the change is recorded in config-changes.jsonl)",
    )
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from bidirlm.runtime.evaluation.in_run import task_evaluator
    from bidirlm.runtime.training.config import load_train_config
    from bidirlm.runtime.training.trainer import TrainingError, TrainingInterrupted, train

    overrides = list(args.overrides)
    if args.allow_config_change:
        overrides.append("train.allow_config_change=true")
    try:
        config = load_train_config(args.config, overrides)
        check_max_seq_len(config)
        # heldout.tasks are scored by the evaluation package, handed in (training imports none)
        extra = {"evaluator": task_evaluator(config)} if config.heldout.tasks else {}
        with torch_threads(args.threads):
            final = train(config, **extra)
    except (FileNotFoundError, ValueError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    except TrainingInterrupted as exc:
        print(f"bidirlm train: {exc}")
        return 130 if exc.reason == "Ctrl-C" else 143
    print(final)
    return 0
