"""`bidirlm bench [SUITE ...|all] [--quick] [--results DIR | --commit-results] [--plot]
[--suite-args ARGS]`.

Without a suite it lists the suites and exits. Each suite is `bench/<name>.py` with a
`main(argv) -> int`; it runs in its own Python process (suites set process-wide state:
TRITON_INTERPRET must be fixed before any `@triton.jit` function is created, CUDA memory stats,
compile caches). Rows go through the shared runner (bench/runner.py) to `<results>/<device>.jsonl`
where `<results>` is `--results DIR`, else `$BIDIRLM_BENCH_RESULTS`, else
`$BIDIRLM_CACHE/bench-results` (default `~/.cache/bidirlm/bench-results`): outside the source
tree. Only `--commit-results` appends to the git-tracked `bench/results/` files. `--plot` writes
one PNG per suite beside its rows (bench/plot.py).
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bidirlm.cli import CommandError
from bidirlm.commands._threads import add_threads_argument, resolve_threads

SUITES = ("attention", "mntp_loss", "infonce", "model", "merge", "st_loss", "compile")
# `all` = the measuring suites; `compile` (static GPU compiles on the CPU, minutes of ptxas and
# LLVM) runs when named: `bidirlm bench compile [--quick]`.
ALL = tuple(s for s in SUITES if s != "compile")


def bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def default_results_dir() -> Path:
    env = os.environ.get("BIDIRLM_BENCH_RESULTS")
    if env:
        return Path(env)
    cache = os.environ.get("BIDIRLM_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "bidirlm"
    return root / "bench-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suites", nargs="*", help=f"suites to run: {', '.join(SUITES)} or all (none: list them)"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder for the result rows (default: {default_results_dir()})",
    )
    where.add_argument(
        "--commit-results",
        action="store_true",
        help="append to the git-tracked bench/results/ files instead",
    )
    parser.add_argument("--plot", action="store_true", help="write a PNG chart per suite")
    parser.add_argument(
        "--suite-args",
        default="",
        metavar="ARGS",
        help="extra arguments for every suite run, e.g. --suite-args '--seqlens 256,512'",
    )
    add_threads_argument(parser)  # passed to every suite process as OMP_NUM_THREADS


def describe(name: str, root: Path) -> str:
    """The first line of bench/<name>.py's docstring (read without importing the suite)."""
    try:
        doc = ast.get_docstring(ast.parse((root / f"{name}.py").read_text(encoding="utf-8")))
    except (OSError, SyntaxError):
        doc = None
    return (doc or "").strip().splitlines()[0] if doc else ""


def list_suites(root: Path) -> None:
    print("benchmark suites (run: bidirlm bench SUITE [--quick] [--plot]; all = every one but "
          "compile):")  # fmt: skip
    width = max(len(s) for s in SUITES)
    for name in SUITES:
        print(f"  {name:<{width}}  {describe(name, root)}")


def run(args: argparse.Namespace) -> int:
    root = bench_dir()
    if not (root / "runner.py").exists():
        raise CommandError(
            f"benchmark scripts not found at {root}: run from a source checkout of bidirlm"
        )
    if not args.suites:
        list_suites(root)
        return 0
    suites = list(ALL) if "all" in args.suites else list(dict.fromkeys(args.suites))
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise CommandError(f"unknown suite(s) {unknown}; valid: {', '.join(SUITES)}, all")
    try:
        threads = resolve_threads(args.threads)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (optional: only --plot needs it)
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
    results = root / "results" if args.commit_results else (args.results or default_results_dir())
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create the results folder {results}: {exc.strerror}") from None
    env = {**os.environ, "BIDIRLM_BENCH_RESULTS": str(results.resolve())}
    if threads is not None:  # None: OMP_NUM_THREADS is already set and inherited
        env["OMP_NUM_THREADS"] = str(threads)
    failed = []
    for name in suites:
        print(f"bench: running {name} (rows -> {results})", flush=True)
        started = time.time()
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        cmd += shlex.split(args.suite_args)
        if subprocess.run(cmd, cwd=root.parent, env=env).returncode != 0:
            failed.append(name)
            continue
        if args.plot:
            for png in plot_new_rows(results, name, started):
                print(f"bench: {name} chart -> {png}", flush=True)
    if failed:
        raise CommandError(f"suite(s) failed: {', '.join(failed)}")
    return 0


def plot_new_rows(results: Path, suite: str, since: float) -> list[Path]:
    """Charts of `suite` from every results file that the run just wrote to."""
    sys.path.insert(0, str(bench_dir().parent))  # bench/ is a folder of the source checkout
    try:
        from bench.plot import plot_suite
    finally:
        sys.path.pop(0)
    written = []
    for path in sorted(results.glob("*.jsonl")):
        if path.stat().st_mtime < since:
            continue
        try:
            written.append(plot_suite(path, suite))
        except ValueError:
            continue  # that file holds no row of this suite
    return written
