"""The demo's charts: `results.png` (the paper's Figure 2 in miniature) and `forgetting.png`
(Figures 3-4: held-out LM loss per variant, the merge-ratio and data-mix sweeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bidirlm.recipe.demo_config import TASKS


def plot_results(results: dict[str, Any], path: Path) -> None:
    """The paper's Figure 2 in miniature: each variant's change relative to Base per task, and
    absolute retrieval with the BM25 and untrained-reference lines."""
    import matplotlib  # optional dependency ([train] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
    ax = axes[0]
    width = 0.26
    colors = {"retrieval": "#3b6ea8", "sequence": "#e08a3c", "token": "#5a9e5a"}
    xs = list(range(len(names)))
    for j, task in enumerate(TASKS):
        vals = [results["relative"][n][task] for n in names]
        bars = ax.bar(
            [x + (j - 1) * width for x in xs], vals, width, label=task, color=colors[task]
        )
        for bar, val in zip(bars, vals):
            ax.annotate(
                f"{val:+.3f}",
                (bar.get_x() + bar.get_width() / 2, val),
                ha="center",
                va="bottom" if val >= 0 else "top",
                fontsize=6,
            )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("change vs Base (nDCG@10 / macro-F1)")
    ax.set_title("Change relative to Base", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    ndcg = [results["variants"][n] for n in names]
    bars = ax.bar(xs, ndcg, 0.6, color="#3b6ea8")
    for bar in bars:
        ax.annotate(
            f"{bar.get_height():.3f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.axhline(
        results["bm25"]["ndcg@10"],
        color="#c0392b",
        linestyle="--",
        linewidth=1,
        label=f"BM25 {results['bm25']['ndcg@10']:.3f}",
    )
    ax.axhline(
        results["reference"]["ndcg@10"],
        color="#808080",
        linestyle=":",
        linewidth=1,
        label=f"untrained {results['reference']['ndcg@10']:.3f}",
    )
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("nDCG@10")
    ax.set_ylim(0, max([*ndcg, results["bm25"]["ndcg@10"], 0.05]) * 1.2)
    ax.set_title(f"Held-out retrieval ({results['num_queries']} queries)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"bidirlm demo ({results['size']}, seed {results['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_SCORE_COLORS = {"retrieval": "#7b4fa0", "sequence": "#c0392b", "token": "#5a9e5a"}


def _sweep_panel(
    ax: Any,
    rows: list[dict[str, Any]],
    x: str,
    scores: dict[str, str],
    xlabel: str,
    score_label: str,
    title: str,
) -> None:
    """One sweep chart: held-out docs/code losses over `x`, task `scores` (name -> line style)
    on a second axis."""
    xs = [row[x] for row in rows]
    ax.plot(xs, [r["docs_loss"] for r in rows], "o-", color="#3b6ea8", label="docs loss")
    ax.plot(xs, [r["code_loss"] for r in rows], "o-", color="#e08a3c", label="code loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out causal-LM loss")
    twin = ax.twinx()
    for task, style in scores.items():
        color = _SCORE_COLORS[task]
        twin.plot(xs, [r[task] for r in rows], style, color=color, label=task, alpha=0.8)
    twin.set_ylabel(score_label)
    lines, more = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_forgetting(results: dict[str, Any], path: Path) -> None:
    """Figures 3-4 in miniature: held-out LM loss per variant; the merge-ratio sweep."""
    import matplotlib  # optional dependency ([train] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mix = results.get("mix_sweep") or []
    fig, axes = plt.subplots(1, 3 if mix else 2, figsize=(17 if mix else 12, 4.2), dpi=110)
    ax = axes[0]
    names = [n for n in results["variants"] if n != "Bi+Base"]  # same weights as Base
    xs = list(range(len(names)))
    for j, (kind, color) in enumerate((("docs", "#3b6ea8"), ("code", "#e08a3c"))):
        vals = [results["forgetting"][n][kind] for n in names]
        ax.bar(
            [x + (j - 0.5) * 0.38 for x in xs], vals, 0.38, label=f"held-out {kind}", color=color
        )
    low = min(min(results["forgetting"][n].values()) for n in names)
    ax.set_ylim(low * 0.9, None)
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("causal-LM loss (nats/token)")
    ax.set_title("Forgetting: held-out causal-LM loss", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _sweep_panel(
        axes[1],
        results["merge_sweep"],
        "ratio",
        {"retrieval": "s--", "sequence": "^--", "token": "v--"},
        "share of Bi+MNTP in the merge with the base",
        "task score (nDCG@10 / macro-F1)",
        "Merge-ratio sweep",
    )
    if mix:
        _sweep_panel(
            axes[2],
            mix,
            "code_share",
            {"retrieval": "s--"},
            "share of code in the MNTP data",
            "retrieval nDCG@10 (Bi+MNTP)",
            "Data-mix sweep (MNTP)",
        )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
