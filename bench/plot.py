"""Charts of benchmark rows: `bidirlm bench SUITE --plot` (or `python -m bench.plot FILE SUITE`).

One PNG per suite from the rows of that suite's latest run in a results file (every
implementation in a chart was measured in the same run, `run_id`), labelled with the device,
the versions and the date of that run:
- attention: TFLOP/s vs sequence length, one panel per head dim, a line per implementation/pass;
- mntp_loss, infonce: time (and peak memory where measured) vs tokens / batch, a line per
  implementation/pass and vocabulary / width;
- merge: wall time vs model size, a line per implementation;
- compile: registers and spill bytes per kernel and target (static compiles, no GPU);
- every other suite: milliseconds per case, implementation and pass as grouped bars.
Predicted rows (`impl` ending in "-predicted") are left out: a chart shows measurements only.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.runner import load_rows

Row = dict[str, Any]


def latest_run(rows: list[Row], suite: str) -> list[Row]:
    """The rows of `suite`'s most recent run (by time), measured rows only."""
    mine = [r for r in rows if r.get("suite") == suite]
    if not mine:
        return []
    last = max(mine, key=lambda r: r.get("time", ""))["run_id"]
    return [
        r for r in mine if r.get("run_id") == last and not str(r.get("impl")).endswith("predicted")
    ]


def _series(
    rows: list[Row], pattern: str, x_of: Callable[[re.Match], float], y: str
) -> dict[tuple, list[tuple[float, float]]]:
    """(panel, label) -> sorted [(x, y)] for rows whose case matches `pattern`."""
    out: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        m = re.fullmatch(pattern, str(r.get("case", "")))
        if m is None or r.get(y) is None:
            continue
        panel = m.group("panel") if "panel" in m.groupdict() else ""
        tag = m.group("tag") if "tag" in m.groupdict() else ""
        out[(panel, f"{r['impl']} {r['pass']}{tag}")].append((x_of(m), float(r[y])))
    return {k: sorted(v) for k, v in out.items()}


def _line_panels(ax_row, series, xlabel: str, ylabel: str, logx: bool = True) -> None:  # noqa: ANN001
    panels = sorted({p for p, _ in series}, key=lambda p: (len(p), p))
    for ax, panel in zip(ax_row, panels):
        mine = {label: pts for (p, label), pts in sorted(series.items()) if p == panel}
        xs = {x for pts in mine.values() for x, _ in pts}
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(xs) == 1:  # one size measured (a --quick run): bars, a line needs two points
            labels = list(mine)
            ax.barh(range(len(labels)), [mine[k][0][1] for k in labels])
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_ylabel("")
            ax.set_xlabel(f"{ylabel} at {xlabel} {next(iter(xs)):g}")
            continue
        for label, pts in mine.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_xlabel(xlabel)
        if logx:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)


def _panels_needed(series) -> int:  # noqa: ANN001
    return max(1, len({p for p, _ in series}))


def _title(suite: str, rows: list[Row]) -> str:
    r = rows[0]
    return (
        f"bidirlm bench {suite}: {r.get('device')}, {str(r.get('time', ''))[:10]}\n"
        f"torch {r.get('torch')}, triton {r.get('triton')}, run {r.get('run_id')}"
    )


def _figure(rows_of_panels: list[int]):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(rows_of_panels)
    fig, axes = plt.subplots(
        len(rows_of_panels), ncols, figsize=(5 * ncols, 3.8 * len(rows_of_panels)), squeeze=False
    )
    for i, used in enumerate(rows_of_panels):
        for ax in axes[i][used:]:
            ax.set_visible(False)
    return fig, axes


def _bars(ax, rows: list[Row], key: Callable[[Row], float | None], ylabel: str) -> None:  # noqa: ANN001
    cases = sorted({str(r["case"]) for r in rows if key(r) is not None})
    labels = sorted({f"{r['impl']} {r['pass']}" for r in rows if key(r) is not None})
    width = 0.8 / max(len(labels), 1)
    for j, label in enumerate(labels):
        heights = []
        for case in cases:
            vals = [
                key(r)
                for r in rows
                if str(r["case"]) == case and f"{r['impl']} {r['pass']}" == label
            ]
            heights.append(next((v for v in vals if v is not None), 0.0))
        ax.bar([i + j * width for i in range(len(cases))], heights, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _plot_attention(rows: list[Row]):  # noqa: ANN202
    y = "tflops" if any(r.get("tflops") for r in rows) else "ms"
    series = _series(
        rows,
        r"(?P<panel>hd\d+)-s(?P<s>\d+)-b\d+(?P<tag>.*)",
        lambda m: float(m.group("s")),
        y,
    )
    fig, axes = _figure([_panels_needed(series)])
    _line_panels(axes[0], series, "sequence length", "TFLOP/s" if y == "tflops" else "ms")
    return fig


def _plot_loss(rows: list[Row], pattern: str, xlabel: str):  # noqa: ANN202
    time_s = _series(rows, pattern, lambda m: float(m.group("x")), "ms")
    mem_s = _series(rows, pattern, lambda m: float(m.group("x")), "peak_mem_mb")
    layout = [_panels_needed(time_s)] + ([_panels_needed(mem_s)] if mem_s else [])
    fig, axes = _figure(layout)
    _line_panels(axes[0], time_s, xlabel, "ms")
    if mem_s:
        _line_panels(axes[1], mem_s, xlabel, "peak memory (MiB)")
    return fig


def _plot_merge(rows: list[Row]):  # noqa: ANN202
    series = _series(
        rows,
        r"3x(?P<mb>\d+)MB-bf16-(?P<panel>\w+)",
        lambda m: 3 * float(m.group("mb")),
        "ms",
    )
    fig, axes = _figure([_panels_needed(series)])
    _line_panels(axes[0], series, "input size (MB, 3 models)", "wall ms", logx=False)
    return fig


def _plot_compile(rows: list[Row]):  # noqa: ANN202
    """One horizontal bar per compiled launch: registers, spill bytes written beside it."""
    kernels = sorted(
        (r for r in rows if r.get("extra", {}).get("registers") is not None),
        key=lambda r: (r["extra"].get("target", ""), r["case"], r["impl"]),
    )
    fig, axes = _figure([1])
    ax = axes[0][0]
    targets = sorted({r["extra"].get("target", "") for r in kernels})
    colors = {t: f"C{i}" for i, t in enumerate(targets)}
    for i, r in enumerate(kernels):
        ex = r["extra"]
        ax.barh(i, ex["registers"], color=colors[ex.get("target", "")])
        if ex.get("spill_bytes"):
            ax.text(ex["registers"] + 3, i, f"spill {ex['spill_bytes']} B", va="center",
                    fontsize=6, color="red")  # fmt: skip
    ax.set_yticks(range(len(kernels)))
    ax.set_yticklabels([f"{r['case']} {r['impl']}" for r in kernels], fontsize=6)
    ax.set_xlabel("registers per thread (red: spill bytes)")
    for t in targets:
        ax.barh(0, 0, color=colors[t], label=t)
    ax.legend(fontsize=7)
    ax.invert_yaxis()
    fig.set_size_inches(9, max(4, 0.16 * len(kernels) + 1.5))
    return fig


def _plot_bars(rows: list[Row]):  # noqa: ANN202
    fig, axes = _figure([1])
    _bars(axes[0][0], rows, lambda r: r.get("ms"), "ms")
    return fig


def plot_suite(results_file: Path | str, suite: str, output: Path | str | None = None) -> Path:
    """Write the chart of `suite`'s latest run in `results_file`; return the PNG's path.

    `output` defaults to `<results folder>/<suite>-<results file stem>.png`. A ValueError when
    the file holds no measured row of that suite."""
    results_file = Path(results_file)
    rows = latest_run(load_rows(results_file), suite)
    if not rows:
        raise ValueError(f"{results_file} holds no measured row of suite {suite!r}")
    if suite == "attention":
        fig = _plot_attention(rows)
    elif suite == "mntp_loss":
        fig = _plot_loss(rows, r"(?P<panel>.+)-t(?P<x>\d+)-r[\d.]+", "labelled tokens")
    elif suite == "infonce":
        fig = _plot_loss(rows, r"B(?P<x>\d+)-M\d+-(?P<panel>d\d+)", "batch (queries)")
    elif suite == "merge":
        fig = _plot_merge(rows)
    elif suite == "compile":
        fig = _plot_compile(rows)
    else:
        fig = _plot_bars(rows)
    fig.suptitle(_title(suite, rows), fontsize=9)
    fig.tight_layout()
    out = Path(output) if output else results_file.parent / f"{suite}-{results_file.stem}.png"
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(out)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="a results .jsonl file")
    p.add_argument("suite", help="the suite to chart")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    print(plot_suite(args.results, args.suite, args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
