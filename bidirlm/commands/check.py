"""`bidirlm check MODEL`: is the model bidirectional, and do all its forms agree?

One line per check (see `bidirlm.integrations.check`): the attention direction as config.json
records it, transformers' eager / sdpa / bidirlm attention against our encoder, and the
sentence-transformers form against `Encoder.encode`. Exit 0 when every check passes, 1 otherwise
(a causal model fails). Works on our checkpoints, exported sentence-transformers folders and plain
transformers Qwen3/Gemma3 folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (Hugging Face / sentence-transformers layout)")
    parser.add_argument("--device", default="cpu", help="where to run the checks (default: cpu)")
    add_threads_argument(parser)


@threaded
def run(args: argparse.Namespace) -> int:
    from bidirlm.integrations.check import check_model
    from bidirlm.runtime.models import CheckpointError

    folder = Path(args.model)
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a model folder")
    try:
        checks = check_model(folder, device=args.device)
    except (CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    for check in checks:
        print(check.line(), flush=True)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"check: {len(failed)} of {len(checks)} checks failed ({', '.join(failed)})")
        return 1
    print(f"check: all {len(checks)} checks passed")
    return 0
