"""`bidirlm encode MODEL --input texts.txt --output emb.npy`: one embedding per input line.

The .npy is written atomically (a temporary file beside it, then renamed) and only when every
embedding is finite: NaN/Inf embeddings are an error naming the first text's line, never a file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._limits import clamp_max_length
from bidirlm.commands._threads import add_threads_argument, threaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face checkpoint folder (Qwen3 or Gemma3)")
    parser.add_argument(
        "--input", required=True, type=Path, help="UTF-8 text file: one text per non-empty line"
    )
    parser.add_argument("--output", required=True, type=Path, help="where to write the .npy")
    parser.add_argument("--pooling", choices=("mean", "last", "first"), default="mean")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--causal", action="store_true", help="run with causal attention")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype"
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="load a model whose weights hold NaN/Inf (refused by default); the embeddings "
        "must still be finite to be written",
    )
    add_threads_argument(parser)


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-empty lines of a UTF-8 file; one-line errors for a missing
    file, a folder, an unreadable file, a line that is not UTF-8, or no text at all."""
    if path.is_dir():
        raise CommandError(f"--input {path} is a directory; expected a text file")
    if not path.exists():
        raise CommandError(f"--input {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"--input {path}: cannot read ({exc.strerror or exc})") from None
    out = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(
                f"--input {path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
        if text.strip():
            out.append((lineno, text))
    if not out:
        raise CommandError(f"--input {path} has no non-empty line")
    return out


def check_device(device: str) -> str:
    """A usable torch device string, or a one-line error (no GPU, unknown device)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as exc:
        raise CommandError(f"--device {device!r} is not a device ({exc})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if kind != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommandError(f"--device {device} is not available: {first}") from None
    return device


@threaded  # --threads N (bidirlm/commands/_threads.py)
def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from bidirlm.runtime import load_model
    from bidirlm.runtime.models import CheckpointError
    from bidirlm.runtime.outputs import atomic_write

    if args.output.suffix != ".npy":
        raise CommandError(f"--output {args.output} must end in .npy")
    if args.output.is_dir():
        raise CommandError(f"--output {args.output} is a directory; expected a .npy file path")
    lines = read_lines(args.input)
    max_length = clamp_max_length("encode", args.model, args.max_length)
    texts = [text for _, text in lines]
    device = check_device(args.device) if args.device else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = load_model(
            args.model,
            dtype=dtype,
            device=device,
            bidirectional=not args.causal,
            allow_non_finite=args.allow_non_finite or None,
        )
        emb = model.encode(
            texts,
            batch_size=args.batch_size,
            pooling=args.pooling,
            normalize=args.normalize,
            max_length=max_length,
        )
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    array = emb.float().cpu().numpy()
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = [lines[i][0] for i in np.flatnonzero(~finite)[:5]]
        raise CommandError(
            f"{int((~finite).sum())} of {len(texts)} embeddings are not finite (NaN/Inf), first "
            f"at --input {args.input} line(s) {bad}: nothing written to {args.output} (check "
            "the model's weights, or try --dtype float32)"
        )
    try:
        atomic_write(args.output, lambda fh: np.save(fh, array))
    except ValueError as exc:  # OutputError: read-only or full output folder
        raise CommandError(str(exc)) from None
    print(f"wrote {tuple(emb.shape)} float32 embeddings of {len(texts)} texts to {args.output}")
    return 0
