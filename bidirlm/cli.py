"""The `bidirlm` command.

Each subcommand lives in `bidirlm/commands/<name>.py`, which defines
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their
subcommand runs, so `bidirlm env` stays fast and a broken optional dependency of one command
never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bidirlm.commands._quiet import quiet_libraries
from bidirlm.extras import command_missing, missing_extra

# name -> one-line help (kept here so `bidirlm --help` needs no imports)
COMMANDS: dict[str, str] = {
    "env": "print versions, the device and which kernel implementation runs",
    "train": "run a training phase (causal, mntp, contrastive, sequence-/token-classification)",
    "merge": "merge checkpoints shard by shard (mergekit YAML: its methods, slices, tokenizers)",
    "compose": "compose an omnimodal encoder from text, vision and audio specialists",
    "pipeline": "run a recipe's phases in order, resuming completed ones",
    "export": "export a model as a sentence-transformers folder",
    "encode": "embed a text file into a .npy array",
    "eval": "evaluate a model on the embedded retrieval task or a JSON Lines retrieval set",
    "predict": "label a JSON Lines file with a fine-tuned classifier (labels and scores)",
    "finetune-sweep": "the fine-tuning protocol: a learning-rate grid, best dev score per model",
    "domain-transfer": "merge an encoder with a specialist, compare fine-tuning learning curves",
    "profile": "profile training steps: a Chrome/Perfetto trace and time per op family",
    "check": "prove a model is bidirectional and that its backends and exports agree",
    "bench": "run benchmark suites and append rows under bench/results/",
    "demo": "the main job: the BidirLM recipe end to end on the embedded corpora",
}


class CommandError(Exception):
    """An error to show the user as one line, without a traceback."""


def _load(name: str):
    module = f"bidirlm.commands.{name.replace('-', '_')}"  # finetune-sweep -> finetune_sweep
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bidirlm", description="Turn causal decoder LLMs into bidirectional encoders."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (lazy, see module docstring).
        if name == wanted:
            module = _load(name)
            if module is not None:
                module.add_arguments(p)
            else:
                p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        module = _load(args.command)
    except ModuleNotFoundError as exc:  # an optional package of the chosen command is missing
        wanted = next((a for a in argv if not a.startswith("-")), None)
        message = missing_extra(exc, wanted)
        if message is None:
            raise
        print(f"bidirlm {wanted}: error: {message}", file=sys.stderr)
        return 1
    missing = command_missing(args.command)
    if missing is not None:
        print(f"bidirlm {args.command}: error: {missing}", file=sys.stderr)
        return 1
    if module is None:
        print(
            f"bidirlm {args.command}: not available in this version of bidirlm yet "
            f"(no bidirlm/commands/{args.command}.py)",
            file=sys.stderr,
        )
        return 2
    try:
        with quiet_libraries():  # no library progress bars or load reports in our logs
            return int(module.run(args) or 0)
    except CommandError as exc:
        print(f"bidirlm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        message = missing_extra(exc, args.command)
        if message is None:
            raise
        print(f"bidirlm {args.command}: error: {message}", file=sys.stderr)
        return 1
    except OSError as exc:  # read-only or full output folder, permissions: one line, the path
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"bidirlm {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bidirlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run as `python -m bidirlm.cli`, this file is `__main__`, a second copy of the module whose
    # CommandError is not the class the commands raise: delegate to the real module.
    from bidirlm.cli import main as _main

    sys.exit(_main())
