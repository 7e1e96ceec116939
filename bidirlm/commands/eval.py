"""`bidirlm eval MODEL [--task embedded|SET]`: retrieval nDCG@10 / MRR@10 of a model.

For a fine-tuned classifier (`bidirlm train` with a `*-classification` phase), `--task FILE` is a
labelled JSON Lines file (or `embedded:python-packages:heldout`, ...) and the output its metrics
(accuracy, macro-F1, entity F1, Spearman, ... as `bidirlm.runtime.evaluation.classification`).

SET is a JSON Lines file of pairs (`query`, `positive`, optional `negatives`) or a BEIR-style
folder (queries.jsonl, corpus.jsonl, qrels.jsonl); see `bidirlm.runtime.evaluation`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face checkpoint folder (Qwen3 or Gemma3)")
    parser.add_argument(
        "--task",
        default="embedded",
        help="'embedded' (held-out stdlib docstrings, default), a pairs .jsonl or a BEIR folder",
    )
    parser.add_argument("--pooling", choices=("mean", "last", "first"), default="mean")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="token limit per text (default: the length a fine-tuning run's best/ or final/ "
        "was trained with, else 512)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--query-prefix", default="", help="text prepended to every query")
    parser.add_argument(
        "--causal", action="store_true", help="run the model with causal attention (Base variant)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument(
        "--output", type=Path, help="also write the metrics to this JSON file (atomically)"
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="load a model whose weights hold NaN/Inf (refused by default); metrics are never "
        "computed from non-finite embeddings",
    )
    add_threads_argument(parser)


@threaded  # --threads N (bidirlm/commands/_threads.py)
def run(args: argparse.Namespace) -> int:
    import torch

    from bidirlm.commands._limits import clamp_max_length
    from bidirlm.commands.encode import check_device
    from bidirlm.runtime.evaluation import evaluate
    from bidirlm.runtime.models import CheckpointError
    from bidirlm.runtime.outputs import atomic_write_text
    from bidirlm.runtime.training.task_eval import DEFAULT_MAX_LENGTH, trained_max_length

    if args.max_length is None:  # a run's best/ or final/: the length it was trained with
        args.max_length = trained_max_length(args.model) or DEFAULT_MAX_LENGTH
    if args.max_length < 1 or args.batch_size < 1:
        raise CommandError("--max-length and --batch-size must be >= 1")
    if args.output is not None and args.output.is_dir():
        raise CommandError(f"--output {args.output} is a directory; expected a JSON file path")
    max_length = clamp_max_length("eval", args.model, args.max_length)
    device = check_device(args.device) if args.device else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = args.model
        if args.allow_non_finite:
            from bidirlm.runtime import load_model

            model = load_model(
                args.model, bidirectional=not args.causal, device=device, allow_non_finite=True
            )
        from bidirlm.runtime.evaluation.classify import evaluate_classifier, is_classifier
        from bidirlm.runtime.evaluation.crossmodal import evaluate_crossmodal, is_crossmodal_task

        if is_classifier(model):  # fine-tuned classifier: task metrics on a labelled file
            if args.task == "embedded":
                raise CommandError("a classifier needs --task FILE (labelled JSON Lines)")
            metrics = evaluate_classifier(
                model, args.task, batch_size=args.batch_size, max_length=max_length,
                device=device,
            )  # fmt: skip
            metrics["max_length"] = max_length  # the run's training length by default
        elif is_crossmodal_task(args.task):  # image/audio-text pairs: an omni model's retrieval
            metrics = evaluate_crossmodal(
                model,
                args.task,
                pooling=args.pooling,
                batch_size=args.batch_size,
                max_length=max_length,
                device=device,
            )
        else:
            metrics = evaluate(
                model,
                args.task,
                pooling=args.pooling,
                batch_size=args.batch_size,
                max_length=max_length,
                query_prefix=args.query_prefix,
                bidirectional=not args.causal,
                device=device,
            )
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    text = json.dumps(metrics, indent=2)
    if args.output:
        try:
            atomic_write_text(args.output, text + "\n")
        except ValueError as exc:  # OutputError: read-only or full output folder
            raise CommandError(str(exc)) from None
    print(text)
    return 0
