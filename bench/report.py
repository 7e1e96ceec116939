"""Turn benchmark rows into a markdown table and a PNG plot.

    python -m bench.report bench/results/<device>.jsonl [--suite attention] [--run-id ID]
                           [--out table.md] [--plot plot.png]

By default the latest run of each suite in the file is reported, so every ratio in a table comes
from implementations measured side by side in one run.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

try:
    from bench.runner import load_rows
except ModuleNotFoundError:  # run as a script: python bench/report.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.runner import load_rows


def select(
    rows: list[dict[str, Any]], suite: str | None = None, run_id: str | None = None
) -> list[dict[str, Any]]:
    """Rows of one suite (or all) from one run each (the given one, else each suite's latest)."""
    if suite:
        rows = [r for r in rows if r["suite"] == suite]
    if run_id:
        return [r for r in rows if r["run_id"] == run_id]
    latest: dict[str, str] = {}
    for r in rows:  # file order is chronological
        latest[r["suite"]] = r["run_id"]
    return [r for r in rows if latest.get(r["suite"]) == r["run_id"]]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown_table(rows: list[dict[str, Any]], baseline: str | None = None) -> str:
    """One line per (suite, case, pass, impl); `speedup` is vs `baseline` impl in the same run."""
    if not rows:
        return "_no rows_\n"
    ref: dict[tuple, float] = {}
    if baseline:
        for r in rows:
            if r["impl"] == baseline and r["ms"]:
                ref[(r["run_id"], r["suite"], r["case"], r["pass"])] = r["ms"]
    head = "| suite | case | pass | impl | ms | TFLOP/s | peak MB |"
    sep = "|---|---|---|---|---:|---:|---:|"
    if baseline:
        head += f" vs {baseline} |"
        sep += "---:|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['suite']} | {r['case']} | {r['pass']} | {r['impl']} | {_fmt(r['ms'])} | "
            f"{_fmt(r['tflops'])} | {_fmt(r['peak_mem_mb'])} |"
        )
        if baseline:
            b = ref.get((r["run_id"], r["suite"], r["case"], r["pass"]))
            line += f" {_fmt(b / r['ms']) + 'x' if b and r['ms'] else '-'} |"
        lines.append(line)
    stamps = sorted(
        {(r["device"], r["torch"], r["triton"], r["commit"], r["time"][:10]) for r in rows}
    )
    foot = "; ".join(
        f"device {d}, torch {t}, triton {tr}, commit {c}, {day}" for d, t, tr, c, day in stamps
    )
    return "\n".join(lines) + f"\n\n_Measured: {foot}._\n"


def plot(rows: list[dict[str, Any]], path: Path | str, metric: str = "ms") -> Path:
    """Grouped bar chart: one group per (case, pass), one bar per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = defaultdict(dict)
    impls: list[str] = []
    for r in rows:
        if r.get(metric) is None:
            continue
        groups[f"{r['case']}\n{r['pass']}"][r["impl"]] = r[metric]
        if r["impl"] not in impls:
            impls.append(r["impl"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(impls)) / 2), 4))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g + i * width for g in range(len(groups))]
        ys = [groups[k].get(impl, 0.0) for k in groups]
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=7)
    ax.set_ylabel(metric)
    devices = sorted({r["device"] for r in rows})
    suites = sorted({r["suite"] for r in rows})
    ax.set_title(f"{', '.join(suites)} on {', '.join(devices)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--suite")
    parser.add_argument("--run-id")
    parser.add_argument("--baseline", help="impl name to compute speedups against")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    parser.add_argument("--metric", default="ms", choices=["ms", "tflops", "peak_mem_mb"])
    args = parser.parse_args(argv)
    if not args.results.exists():
        print(f"error: {args.results} does not exist", file=sys.stderr)
        return 1
    rows = select(load_rows(args.results), args.suite, args.run_id)
    table = markdown_table(rows, args.baseline)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    print(table)
    if args.plot:
        print(f"plot: {plot(rows, args.plot, args.metric)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
