"""`bidirlm bench [SUITE ...|all] [-- suite args]`: run benchmark suites from the repo's bench/.

Each suite is `bench/<name>.py` with a `main(argv) -> int`; rows go to
`bench/results/<device>.jsonl` through the shared runner (bench/runner.py). Each suite runs in
its own Python process: suites set process-wide state (TRITON_INTERPRET must be fixed before any
`@triton.jit` function is created, CUDA memory stats, compile caches) that must not leak into the
next one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bidirlm.cli import CommandError

SUITES = ("attention", "mntp_loss", "infonce", "model", "merge", "st_loss", "compile")
# `all` = the measuring suites; `compile` (static GPU compiles on the CPU, minutes of ptxas and
# LLVM) runs when named: `bidirlm bench compile [--quick]`.
ALL = tuple(s for s in SUITES if s != "compile")


def bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suites", nargs="*", default=["all"], help=f"suites to run: {', '.join(SUITES)} or all"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")


def run(args: argparse.Namespace) -> int:
    root = bench_dir()
    if not (root / "runner.py").exists():
        raise CommandError(
            f"benchmark scripts not found at {root}: run from a source checkout of bidirlm"
        )
    suites = list(ALL) if "all" in args.suites else args.suites
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise CommandError(f"unknown suite(s) {unknown}; valid: {', '.join(SUITES)}, all")
    failed = []
    for name in suites:
        print(f"bench: running {name}", flush=True)
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        if subprocess.run(cmd, cwd=root.parent).returncode != 0:
            failed.append(name)
    if failed:
        raise CommandError(f"suite(s) failed: {', '.join(failed)}")
    return 0
