"""`bidirlm bench [SUITE ...|all] [-- suite args]`: run benchmark suites from the repo's bench/.

Each suite is `bench/<name>.py` with a `main(argv) -> int`; rows go to
`bench/results/<device>.jsonl` through the shared runner (bench/runner.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bidirlm.cli import CommandError

SUITES = ("attention", "mntp_loss", "infonce", "model", "merge")


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
    suites = list(SUITES) if "all" in args.suites else args.suites
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise CommandError(f"unknown suite(s) {unknown}; valid: {', '.join(SUITES)}, all")
    sys.path.insert(0, str(root.parent))
    rc = 0
    for name in suites:
        if not (root / f"{name}.py").exists():
            print(f"bench: suite {name!r} has no script yet (bench/{name}.py); skipped")
            continue
        print(f"bench: running {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        rc |= int(module.main(["--quick"] if args.quick else []) or 0)
    return rc
