"""`bidirlm export MODEL OUT [--pooling mean|last|first]`: a sentence-transformers folder.

`SentenceTransformer(OUT)` then loads the model offline, bidirectional (recorded in config.json
the transformers way), with the chosen pooling, and gives the embeddings of `Encoder.encode`.
OUT is written beside and swapped in when complete (nothing is left on failure); `--force`
replaces a non-empty OUT only after the new one is complete, and an OUT that is (or contains)
MODEL or the working directory is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Qwen3 or Gemma3 checkpoint folder (Hugging Face layout)")
    parser.add_argument("output", help="folder to write the sentence-transformers model to")
    parser.add_argument(
        "--pooling", choices=("mean", "last", "first"), default="mean", help="default: mean"
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument(
        "--max-length", type=int, default=512, help="max tokens per text (default: 512)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="weight dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty OUTPUT (after the new one is complete; never MODEL or the "
        "working directory)",
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="load a model whose weights hold NaN/Inf (refused by default)",
    )
    add_threads_argument(parser)


@threaded
def run(args: argparse.Namespace) -> int:
    import torch

    from bidirlm.integrations.sentence_transformers import export_sentence_transformers
    from bidirlm.runtime.models import CheckpointError
    from bidirlm.runtime.outputs import check_output, write_error

    out = Path(args.output)
    try:
        check_output(out, inputs=[args.model])
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CommandError(f"{out} exists and is not empty (use --force to overwrite)")
    if args.max_length < 1:
        raise CommandError(f"--max-length must be >= 1, got {args.max_length}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        path = export_sentence_transformers(
            args.model,
            out,
            pooling=args.pooling,
            normalize=args.normalize,
            max_length=args.max_length,
            dtype=dtype,
            force=args.force,
            allow_non_finite=args.allow_non_finite or None,
        )
    except (CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # read-only or full output folder: nothing was left behind
        raise CommandError(str(write_error(exc, out))) from None
    print(
        f"exported {args.model} -> {path} (sentence-transformers, bidirectional, "
        f"pooling={args.pooling}{', normalized' if args.normalize else ''})"
    )
    return 0
