"""`bidirlm demo [--quick] [--out DIR]`: the BidirLM recipe end to end on the embedded corpora.

Trains a small causal model on Python's stdlib, builds the paper's adaptation variants (Base,
Bi+Base, Bi+MNTP, Bi+Contrastive, Bi+MNTP+Contrastive) and the MNTP model merged 50/50 with its
base, evaluates each on held-out stdlib retrieval and writes DIR/results.json, DIR/report.md and
DIR/results.png; the best variant is exported as a sentence-transformers model. `--quick` takes
about 10 minutes on a 2-core CPU; the default size is meant for a GPU and uses one when present.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, resolve_threads, torch_threads

T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="the small CPU-sized demo (about 10 min)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)"
    )
    # Hidden: the CI-sized run (about a minute; the numbers are noise at that size).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--omni",
        action="store_true",
        help="the BidirLM-Omni demo instead: tiny vision and audio specialists composed with "
        "the text encoder, cross-modal retrieval before/after alignment (out: runs/omni-demo)",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="stay on the CPU even when a GPU is present"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed of every demo phase (default 0)"
    )
    parser.add_argument(
        "--pretrain-base",
        action="store_true",
        help="instead of the demo: pre-train the demo's base model (a small causal Qwen3 on the "
        "stdlib training packages) into --output; the package ships one made this way",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="--pretrain-base: output folder (default runs/demo-base)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="--pretrain-base: optimizer steps of 4096 tokens (default 900)",
    )
    add_threads_argument(parser)


def _threaded(
    args: argparse.Namespace,
    out: Path,
    errors: tuple[type[BaseException], ...],
    job: Callable[[], T],
) -> T:
    """Run `job` on `--threads` torch threads (the shared default of every command), restored
    afterwards (the process may go on: tests call main() in-process); `errors`, and an OSError
    of a read-only or full `out`, become one-line CommandErrors."""
    try:
        resolve_threads(args.threads)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        with torch_threads(args.threads):
            return job()
    except errors as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # read-only or full output folder: one line naming the path
        from bidirlm.runtime.outputs import write_error

        raise CommandError(str(write_error(exc, out))) from None


def run(args: argparse.Namespace) -> int:
    if getattr(args, "omni", False):
        return _run_omni(args)
    if getattr(args, "pretrain_base", False):
        return _run_pretrain_base(args)
    from bidirlm.recipe.demo import run_demo
    from bidirlm.recipe.pipeline import RecipeError
    from bidirlm.runtime.training.trainer import TrainingError

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    results = _threaded(
        args,
        args.out,
        (RecipeError, TrainingError, FileNotFoundError),
        lambda: run_demo(args.out, size, prefer_gpu=not args.cpu, seed=args.seed),
    )
    width = max(len(n) for n in results["variants"])
    seeds = results["finetune_protocol"]["seeds"]
    print(
        f"\n{'variant':<{width}}  nDCG@10  MRR@10  sequence F1  token F1  "
        f"(F1: fine-tuned, mean of {seeds} seeds)"
    )
    for name, score in results["variants"].items():
        task = results["tasks"][name]
        print(
            f"{name:<{width}}  {score:7.4f}  {results['mrr@10'][name]:6.4f}  "
            f"{task['sequence']:11.4f}  {task['token']:8.4f}"
        )
    for reference in (results["bm25"], results["reference"]):
        print(
            f"(reference, not a variant: {reference['name']}: nDCG@10 "
            f"{reference['ndcg@10']:.4f}, MRR@10 {reference['mrr@10']:.4f})"
        )
    missed = [c["claim"] for c in results["checks"] if not c["met"]]
    print(
        f"\n{len(results['checks']) - len(missed)} of {len(results['checks'])} goals/orderings hold"
    )
    for claim in missed:
        print(f"  does not hold here: {claim}")
    export = results["export"]
    print(
        f"\nbest: {results['best']}; best bidirectional ({export['variant']}) exported to "
        f"{export['path']} (SentenceTransformer(path).encode: shape {tuple(export['shape'])})"
    )
    print(f"results: {Path(args.out) / 'results.json'}, report.md, results.png, forgetting.png")
    return 0


def _run_omni(args: argparse.Namespace) -> int:
    """`bidirlm demo --omni [--quick]` (bidirlm.recipe.omni_demo)."""

    from bidirlm.recipe.omni_demo import run_omni_demo
    from bidirlm.runtime.training.trainer import TrainingError

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = Path("runs/omni-demo") if args.out == Path("runs/demo") else args.out
    results = _threaded(args, out, (TrainingError, ValueError), lambda: run_omni_demo(out, size))
    print("\ndirection     unaligned R@1  aligned R@1  unaligned nDCG@10  aligned nDCG@10")
    for d, u in results["unaligned"].items():
        a = results["aligned"][d]
        print(
            f"{d:<12}  {u['recall@1']:13.3f}  {a['recall@1']:11.3f}  {u['ndcg@10']:17.3f}  "
            f"{a['ndcg@10']:15.3f}"
        )
    print(f"\n{out / 'report.md'}, {out / 'results.png'} ({results['seconds']:.0f} s)")
    return 0


def _run_pretrain_base(args: argparse.Namespace) -> int:
    """`bidirlm demo --pretrain-base [--output DIR] [--steps N]` (bidirlm.recipe.demo_base)."""

    from bidirlm.recipe.demo_base import DEFAULT_STEPS, pretrain_base
    from bidirlm.runtime.training.trainer import TrainingError

    output = args.output if args.output is not None else Path("runs/demo-base")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise CommandError(f"--steps must be >= 1, got {steps}")
    record = _threaded(
        args,
        output,
        (TrainingError, ValueError),
        lambda: pretrain_base(output, steps=steps, device="cpu" if args.cpu else "auto"),
    )
    curve = record["loss_curve"]
    print(
        f"base pre-trained: {output} ({record['parameters'] / 1e6:.2f}M parameters, "
        f"{record['steps']} steps, final loss {curve[-1]['loss'] if curve else 'n/a'}, "
        f"{record['seconds']:.0f} s on {record['machine']})"
    )
    return 0
