"""`bidirlm domain-transfer CONFIG --encoder PATH --specialist PATH [--steps 10,20,50,100]`.

Merges the encoder (e.g. Bi+MNTP) 50/50 with a same-backbone specialist (any causal checkpoint),
fine-tunes the merged model, the encoder alone and the specialist itself with bidirectional
attention (the paper's Bi+Specialist) with CONFIG's task, and reports the three learning curves
(dev score at each of `--steps`) with an EMA-smoothed copy of each (`--ema-alpha`, 0.4): a table,
`OUTPUT/domain_transfer.json` and the chart `OUTPUT/curve.png` (OUTPUT: `--output`, else the
config's `train.output`).
"""

from __future__ import annotations

import argparse
import json

from bidirlm.cli import CommandError
from bidirlm.commands._limits import check_max_seq_len
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="fine-tuning config (TOML) with task.dev")
    parser.add_argument("--encoder", required=True, help="the adapted encoder (Bi+MNTP) folder")
    parser.add_argument("--specialist", required=True, help="a same-backbone causal checkpoint")
    parser.add_argument("--steps", default="10,20,50,100", help="evaluation steps (comma list)")
    parser.add_argument("--weight", type=float, default=0.5, help="the encoder's merge weight")
    parser.add_argument(
        "--ema-alpha",
        type=float,
        default=0.4,
        help="weight of the newest point in the EMA-smoothed curves (default 0.4)",
    )
    parser.add_argument("--output", default=None, help="folder (default: train.output)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value")  # fmt: skip
    parser.add_argument("--no-chart", action="store_true", help="skip the matplotlib chart")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    add_threads_argument(parser)


@threaded
def run(args: argparse.Namespace) -> int:
    from bidirlm.recipe.finetune import domain_transfer, format_transfer
    from bidirlm.runtime.training.config import load_train_config
    from bidirlm.runtime.training.trainer import TrainingError

    try:
        steps = [int(x) for x in args.steps.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--steps {args.steps!r}: expected integers like 10,20,50") from None
    try:
        config = load_train_config(args.config, args.overrides)
        for path in (args.encoder, args.specialist):
            check_max_seq_len(config, path)
        report = domain_transfer(
            config,
            encoder=args.encoder,
            specialist=args.specialist,
            steps=steps,
            weight=args.weight,
            ema_alpha=args.ema_alpha,
            output=args.output,
            chart=not args.no_chart,
        )
    except (FileNotFoundError, ValueError, TrainingError) as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(report, indent=2) if args.json else format_transfer(report))
    return 0
