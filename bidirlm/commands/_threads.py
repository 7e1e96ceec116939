"""`--threads N` for every command that computes on the CPU (train, pipeline, encode, eval,
predict, finetune-sweep, domain-transfer, export, compose, demo, check).

torch's default is one OpenMP thread per core. On a shared or busy machine those threads
spin-wait on each other: 5 steps of `examples/tiny-contrastive.toml` on a busy 2-core machine
took 137.5 s with 2 threads and 30.7 s with 1. The default is therefore half the usable cores,
at least 1 and at most 4 (1 on a 2-core machine); an `OMP_NUM_THREADS` set in the environment is
respected, and `--threads N` overrides both.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections.abc import Callable, Iterator

MAX_DEFAULT_THREADS = 4


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Half the usable cores, clamped to [1, MAX_DEFAULT_THREADS]."""
    return max(1, min(MAX_DEFAULT_THREADS, usable_cores() // 2))


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=(
            "torch CPU threads (default: OMP_NUM_THREADS when set, else half the cores, 1 to "
            f"{MAX_DEFAULT_THREADS}, now {default_threads()}; more threads spin-wait on a busy "
            "machine)"
        ),
    )


def resolve_threads(value: int | None) -> int | None:
    """The thread count to set: `value`, else None under OMP_NUM_THREADS, else the default."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {value!r}")
        return value
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return default_threads()


@contextlib.contextmanager
def torch_threads(value: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set (restored after: tests call the
    commands in-process); yields the count in effect."""
    import torch

    count = resolve_threads(value)
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def threaded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a command's `run(args)` to run under `torch_threads(args.threads)`; a bad value
    is the command's one-line error."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from bidirlm.cli import CommandError

        value = getattr(args, "threads", None)
        try:
            resolve_threads(value)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        with torch_threads(value):
            return run(args)

    return wrapper
