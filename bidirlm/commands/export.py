"""`bidirlm export MODEL OUT [--format sentence-transformers|bidirlm|bidirlm-omni]`.

- `sentence-transformers` (default): `SentenceTransformer(OUT)` then loads the model offline,
  bidirectional (recorded in config.json the transformers way), with the chosen pooling
  (`--pooling mean|last|first`), and gives the embeddings of `Encoder.encode`.
- `bidirlm`: the released BidirLM text layout (`model_type` "bidirlm", `BidirLMModel` and its
  `auto_map`, the Qwen3 / Gemma3 fields flat with `is_causal: false` /
  `use_bidirectional_attention: true`, backbone names without `model.`, 1_Pooling mean pooling);
  an omni MODEL gives its text backbone. The remote code files are not written (see
  `bidirlm.runtime.models.released.export_checkpoint`).
- `bidirlm-omni`: an omni MODEL in the released BidirLM-Omni layout (`model_type`
  "bidirlm_omni", `language_model.*`, `visual.*`, `audio_tower.*`), which `load_model` reads back.

The two checkpoint formats stream the tensors shard by shard, renamed but bit for bit: the
input dtype is kept unless `--dtype` asks otherwise. OUT is built in a hidden folder beside it
(same filesystem; nothing is copied under $TMPDIR) and swapped in when complete (nothing is left
on failure, a full disk is one line); `--force` replaces a non-empty OUT only after the new one
is complete, an OUT that appears while the export runs (created by the user meanwhile) is left
as it is and refused, and an OUT that is (or contains) MODEL or the working directory is
refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded

DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("sentence-transformers", "bidirlm", "bidirlm-omni")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Qwen3 or Gemma3 checkpoint folder (Hugging Face layout)")
    parser.add_argument("output", help="folder to write the exported model to")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="sentence-transformers",
        help="sentence-transformers (default), bidirlm (bidirectional text checkpoint) or "
        "bidirlm-omni (the released BidirLM-Omni layout of an omni checkpoint)",
    )
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
    from bidirlm.runtime.models.released import export_checkpoint
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
    if args.format != "sentence-transformers":
        try:
            path = export_checkpoint(
                args.model,
                out,
                layout=args.format,
                dtype=dtype,
                force=args.force,
                allow_non_finite=args.allow_non_finite or None,
            )
        except (CheckpointError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:  # read-only or full output folder: nothing was left behind
            raise CommandError(str(write_error(exc, out))) from None
        print(f"exported {args.model} -> {path} ({args.format} layout, bidirectional)")
        return 0
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
