"""`bidirlm merge CONFIG OUTPUT_DIR`: merge checkpoints shard by shard from a mergekit-style YAML.

See `bidirlm.runtime.merging.merge` for the YAML keys (mergekit's methods: linear,
task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs(_ties), della(_linear), slerp, nuslerp,
model_stock, passthrough, sce, ram, ramplus_tl, multislerp, karcher, arcee_fusion, nearswap and
`slices:`; plus bidirlm's `rename`, `take`, `exclude`, `config_from`,
`tokenizer_from`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from typing import Any

from bidirlm.cli import CommandError

DTYPE_ALIASES = {
    "float64": "float64",
    "fp64": "float64",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="merge YAML (mergekit format + bidirlm keys)")
    parser.add_argument("output_dir", help="output folder (created atomically)")
    parser.add_argument(
        "--out-shard-size",
        default="5GB",
        help="maximum output shard size, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_ALIASES),
        help="merge dtype: overrides the YAML `dtype` (inputs are cast to it when read)",
    )
    parser.add_argument(
        "--out-dtype",
        choices=sorted(DTYPE_ALIASES),
        help="output dtype: overrides the YAML `out_dtype`",
    )
    parser.add_argument("--threads", type=int, default=None, help="reader threads (default 4)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing OUTPUT_DIR (after the merge is complete; never an input model "
        "or the working directory)",
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="write the merge even if a merged tensor holds NaN/Inf (refused by default)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="cosine similarity of each model to the base (or first) model: "
        "merge_report.json in the output and a printed table",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _log_progress(name: str, done: int, total: int) -> None:
    """One stderr line per tenth of the tensors (for logs, where a progress bar is noise)."""
    if done == total or done * 10 // total != (done - 1) * 10 // total:
        print(f"merge: {done}/{total} tensors ({100 * done // total}%)", file=sys.stderr)


def _print_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
    """Merge warnings as one stderr line each (no file/line of Python source)."""
    print(f"bidirlm merge: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from bidirlm.runtime.merging.merge import MergeWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", MergeWarning)
        previous = warnings.showwarning
        warnings.showwarning = _print_warning
        try:
            return _run(args)
        finally:
            warnings.showwarning = previous


def _run(args: argparse.Namespace) -> int:
    from bidirlm.runtime.merging.merge import (
        MergeError,
        format_report,
        load_config,
        merge_from_config,
    )

    try:
        config = load_config(args.config)
        overrides = {}
        if args.dtype:
            overrides["dtype"] = DTYPE_ALIASES[args.dtype]
        if args.out_dtype:
            overrides["out_dtype"] = DTYPE_ALIASES[args.out_dtype]
        if overrides:
            config = dataclasses.replace(config, **overrides)
        tty = sys.stderr.isatty()
        result = merge_from_config(
            config,
            args.output_dir,
            shard_size=args.out_shard_size,
            threads=args.threads,
            force=args.force,
            report=args.report,
            progress=not args.quiet and tty,  # a progress bar on a terminal,
            on_tensor=None if args.quiet or tty else _log_progress,  # else log lines
            allow_non_finite=args.allow_non_finite,
        )
    except MergeError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # disk full, permissions: one line, the output was not created
        raise CommandError(f"{exc.strerror or exc}: {exc.filename or args.output_dir}") from None
    gb = result.bytes / 1e9
    print(
        f"merged {len(config.models)} models -> {result.output}: {result.tensors} tensors, "
        f"{result.shards} shard(s), {gb:.2f} GB in {result.seconds:.2f} s "
        f"({gb / max(result.seconds, 1e-9):.2f} GB/s written)"
    )
    if result.report is not None:
        print(format_report(result.report), end="")
    return 0
