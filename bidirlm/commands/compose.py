"""`bidirlm compose --text PATH [--vision PATH] [--audio PATH] OUT [--weights W,W,W]`.

Composes one omnimodal (BidirLM-Omni) checkpoint: the text backbones averaged with the streaming
merger, the vision tower (Qwen3-VL) and the audio tower + projector (Qwen3-ASR) attached
unmerged. `--rope-from text|vision|audio` picks the source of the RoPE / position fields when the
models differ (default vision when given); one line reports the choice and the differences.
See `bidirlm.runtime.merging.compose` for the output layout; `load_model(OUT)` reads it.
"""

from __future__ import annotations

import argparse
import json

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, threaded

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="text encoder checkpoint (Qwen3 layout)")
    parser.add_argument("--vision", help="vision-language checkpoint (Qwen3-VL layout)")
    parser.add_argument("--audio", help="speech checkpoint (Qwen3-ASR layout)")
    parser.add_argument("output", help="output folder (created atomically)")
    parser.add_argument(
        "--weights",
        help="comma-separated weights of the text backbones, in the order text,vision,audio "
        "(given models only; default equal)",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="merge arithmetic dtype (default float32)")
    parser.add_argument("--out-dtype", choices=DTYPES, help="output dtype (default: the inputs')")
    parser.add_argument("--out-shard-size", default="5GB", help="maximum shard size (default 5GB)")
    parser.add_argument(
        "--rope-from",
        choices=("text", "vision", "audio"),
        help="the model whose RoPE (theta, scaling) and max_position_embeddings the composite "
        "takes when the models differ (default: vision when given, as image positions need it; "
        "else text)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    add_threads_argument(parser)


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise CommandError(f"--weights: expected numbers like 1,1,1, got {text!r}") from None


@threaded
def run(args: argparse.Namespace) -> int:
    import torch

    from bidirlm.runtime.merging.compose import compose_omni, policy_line
    from bidirlm.runtime.outputs import OutputError

    try:
        result = compose_omni(
            args.text,
            args.vision,
            args.audio,
            args.output,
            weights=_weights(args.weights),
            dtype=args.dtype,
            out_dtype=args.out_dtype,
            rope_from=args.rope_from,
            shard_size=args.out_shard_size,
            force=args.force,
            threads=torch.get_num_threads(),  # --threads (set by @threaded) sizes the merge's pool
        )
    except (ValueError, OutputError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{exc.strerror or exc}: {exc.filename or args.output}") from None
    parts = ["text"] + [m for m in ("vision", "audio") if getattr(args, m)]
    config = json.loads((result.output / "config.json").read_text(encoding="utf-8"))
    print(policy_line(config))
    print(
        f"composed {'+'.join(parts)} -> {result.output}: {result.tensors} tensors, "
        f"{result.bytes / 1e6:.1f} MB in {result.seconds:.2f} s"
    )
    return 0
