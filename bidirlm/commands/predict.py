"""`bidirlm predict MODEL --input FILE --output FILE`: labels and scores of a fine-tuned classifier.

MODEL is a folder written by `bidirlm train` with the `sequence-classification` or
`token-classification` phase (or any transformers `*ForSequenceClassification` /
`*ForTokenClassification` Qwen3/Gemma3 folder). INPUT is JSON Lines in the training format
(`{"text"}` / `{"text", "text_pair"}` or `{"tokens": [...]}`; labels, when present, are kept
but not needed). OUTPUT gets every input record plus `prediction` and `score` (sequence tasks:
the label and its probability; multi-label: the list of labels and every label's probability;
regression: the value) or `predicted_tags` and `scores` (token tasks, one per word). The output
is written atomically and never replaces the input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="fine-tuned classifier folder (Hugging Face layout)")
    parser.add_argument("--input", required=True, type=Path, help="JSON Lines records to label")
    parser.add_argument("--output", required=True, type=Path, help="JSON Lines file to write")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="token limit per record (default: the length a fine-tuning run's best/ or final/ "
        "was trained with, else 512)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    add_threads_argument(parser)


@threaded
def run(args: argparse.Namespace) -> int:
    import torch

    from bidirlm.commands._limits import clamp_max_length
    from bidirlm.commands.encode import check_device
    from bidirlm.runtime.evaluation.classify import predict_records, write_jsonl
    from bidirlm.runtime.models import CheckpointError
    from bidirlm.runtime.training.task_eval import DEFAULT_MAX_LENGTH, trained_max_length

    if args.max_length is None:  # a run's best/ or final/: the length it was trained with
        args.max_length = trained_max_length(args.model) or DEFAULT_MAX_LENGTH
    if args.max_length < 1 or args.batch_size < 1:
        raise CommandError("--max-length and --batch-size must be >= 1")
    if not args.input.is_file():
        raise CommandError(f"--input {args.input} is not a file")
    if args.output.is_dir():
        raise CommandError(f"--output {args.output} is a directory; expected a JSON Lines path")
    if args.output.resolve() == args.input.resolve():
        raise CommandError("--output is the --input file: choose another path")
    device = check_device(args.device) if args.device else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_length = clamp_max_length("predict", args.model, args.max_length)
    try:
        rows = predict_records(
            args.model,
            args.input,
            batch_size=args.batch_size,
            max_length=max_length,
            device=device,
        )
        write_jsonl(rows, args.output)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{len(rows)} predictions -> {args.output}")
    return 0
