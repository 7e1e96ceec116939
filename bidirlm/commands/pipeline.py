"""`bidirlm pipeline RECIPE [--set table.key=value ...]`: run a recipe's phases in order.

RECIPE is a TOML file or a shipped recipe's name (qwen3-0.6b, qwen3-1.7b, gemma3-270m,
gemma3-1b). Completed phases are skipped and an interrupted one resumes, so re-running the same
command continues where it stopped. `--check` runs nothing: it checks the inputs and prints each
train phase's tokens (or pairs) per step, steps, tokens in all, the accumulation on 8 and 96
ranks and an estimated time per device class (from the MFU peak table; a prediction). See
`bidirlm.recipe.pipeline` for the file format.
"""

from __future__ import annotations

import argparse
import json
import sys

from bidirlm.cli import CommandError
from bidirlm.commands._limits import check_max_seq_len
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe TOML file, or a shipped recipe name (qwen3-0.6b)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a recipe value, e.g. recipe.base=models/Qwen3-0.6B or mntp.train.steps=100",
    )
    parser.add_argument(
        "--check", action="store_true", help="parse the recipe and check its inputs; run nothing"
    )
    add_threads_argument(parser)


@threaded  # --threads N (bidirlm/commands/_threads.py)
def run(args: argparse.Namespace) -> int:
    from bidirlm.recipe.pipeline import (
        RecipeError,
        check_inputs,
        load_recipe,
        parameter_count,
        plan_lines,
        run_pipeline,
    )
    from bidirlm.runtime.training.trainer import TrainingError, TrainingInterrupted

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_inputs(recipe)  # (missing inputs first: they are the likelier mistake)
        for phase in recipe.phases:  # every phase keeps the base's positions (same backbone)
            if phase.kind == "train":
                check_max_seq_len(phase.config, recipe.recipe.base, where=f"[{phase.name}] ")
        if args.check:
            for phase in recipe.phases:
                print(f"{phase.name:<20} {phase.kind:<6} <- {', '.join(phase.inputs)}")
            # the size of each train phase (every phase's model has the base's size)
            for line in plan_lines(recipe, parameter_count(recipe.recipe.base)):
                print(line)
            print(f"ok: inputs of {recipe.recipe.name} exist; outputs in {recipe.recipe.output}")
            return 0
        from pathlib import Path

        from bidirlm.runtime.outputs import lock_output

        # one pipeline per recipe.output (a second one would run the same phases concurrently)
        with lock_output(Path(recipe.recipe.output).expanduser()):
            report = run_pipeline(recipe)
    except (RecipeError, FileNotFoundError, ValueError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    except TrainingInterrupted as exc:  # SIGTERM / Ctrl-C: the phase checkpointed; re-run resumes
        print(f"bidirlm pipeline: {exc}", file=sys.stderr)
        return 130 if exc.reason == "Ctrl-C" else 143
    print(json.dumps(report, indent=2))
    return 0
