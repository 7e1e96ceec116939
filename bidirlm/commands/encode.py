"""`bidirlm encode MODEL --input texts.txt --output emb.npy`: one embedding per input line."""

from __future__ import annotations

import argparse
from pathlib import Path

from bidirlm.cli import CommandError


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


def read_texts(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 file (a clear error for a missing or empty file)."""
    if not path.is_file():
        raise CommandError(f"--input {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CommandError(f"--input {path} is not UTF-8 text ({exc.reason})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise CommandError(f"--input {path} has no non-empty line")
    return texts


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from bidirlm.runtime import load_model
    from bidirlm.runtime.models import CheckpointError

    if args.output.suffix != ".npy":
        raise CommandError(f"--output {args.output} must end in .npy")
    texts = read_texts(args.input)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = load_model(args.model, dtype=dtype, device=device, bidirectional=not args.causal)
        emb = model.encode(
            texts,
            batch_size=args.batch_size,
            pooling=args.pooling,
            normalize=args.normalize,
            max_length=args.max_length,
        )
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, emb.float().cpu().numpy())
    print(f"wrote {tuple(emb.shape)} float32 embeddings of {len(texts)} texts to {args.output}")
    return 0
