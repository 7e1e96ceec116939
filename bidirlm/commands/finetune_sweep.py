"""`bidirlm finetune-sweep CONFIG --lrs 1e-5,3e-5,... [--models NAME=PATH,...]`: the paper's
fine-tuning protocol.

CONFIG is a `sequence-classification` / `token-classification` training config with `task.dev`.
Every model is fine-tuned at every learning rate with 10% warmup and linear decay; the best dev
score of each run and of each model over the grid are printed as a table and written to
`OUTPUT/sweep.json` (OUTPUT: `--output`, else the config's `train.output`). Runs resume.
"""

from __future__ import annotations

import argparse
import json

from bidirlm.cli import CommandError
from bidirlm.commands._limits import check_max_seq_len
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="fine-tuning config (TOML), e.g. examples/tiny-seqcls.toml")
    parser.add_argument("--lrs", required=True, help="learning rates, comma-separated")
    parser.add_argument(
        "--models",
        default="",
        help="NAME=PATH,... models to compare (default: the config's model)",
    )
    parser.add_argument("--output", default=None, help="sweep folder (default: train.output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    add_threads_argument(parser)


def parse_models(text: str) -> dict[str, str]:
    """`a=PATH,b=PATH` (or bare paths, named by position) -> {name: path}."""
    out: dict[str, str] = {}
    for i, item in enumerate(x.strip() for x in text.split(",") if x.strip()):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = f"model{i}", item
        if name in out:
            raise CommandError(f"--models: the name {name!r} is given twice")
        out[name] = path
    return out


@threaded
def run(args: argparse.Namespace) -> int:
    from bidirlm.recipe.finetune import finetune_sweep, format_sweep
    from bidirlm.runtime.training.config import load_train_config
    from bidirlm.runtime.training.trainer import TrainingError

    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--lrs {args.lrs!r}: expected numbers like 1e-5,3e-5") from None
    try:
        config = load_train_config(args.config, args.overrides)
        models = parse_models(args.models) or None
        for path in (models or {"": config.model}).values():
            check_max_seq_len(config, path)
        report = finetune_sweep(config, lrs, models=models, output=args.output)
    except (FileNotFoundError, ValueError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(report, indent=2) if args.json else format_sweep(report))
    return 0
