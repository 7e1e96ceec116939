"""The similarity report of a merge: cosine similarity of each input to the reference model (the
base, else the first), over all merged weights and per layer, as JSON and a text table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MergeConfig


class Stats:
    """Running sums for the cosine similarity of each input to the reference: the dot product
    with the reference (`dot`) and the squared norm (`sq`), per input, in float64."""

    def __init__(self, n: int) -> None:
        self.dot = [0.0] * n
        self.sq = [0.0] * n

    def add(self, other: Stats) -> None:
        for i in range(len(self.dot)):
            self.dot[i] += other.dot[i]
            self.sq[i] += other.sq[i]


def build_report(config: MergeConfig, stats: Mapping[str, Stats]) -> dict[str, Any]:
    """The report as JSON data: per compared model, `overall` and one cosine per layer group."""
    ref = config.reference_index
    total = Stats(len(config.models))
    for s in stats.values():
        total.add(s)

    def cos(s: Stats, i: int) -> float | None:
        den = math.sqrt(s.sq[i] * s.sq[ref])
        return s.dot[i] / den if den > 0 else None

    models = []
    for i, spec in enumerate(config.models):
        if i == ref:
            continue
        models.append(
            {
                "model": spec.label,
                "overall": cos(total, i),
                "groups": {g: cos(s, i) for g, s in stats.items()},
            }
        )
    return {
        "reference": config.models[ref].label,
        "metric": "cosine similarity of the flattened weights of merged tensors",
        "models": models,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A text table: one row per layer group (and `overall`), one column per compared model."""
    models = report["models"]
    if not models:
        return f"similarity: only the reference model {report['reference']}\n"
    heads = [Path(m["model"]).name or m["model"] for m in models]
    groups = ["overall", *models[0]["groups"]]
    width = max(len(g) for g in groups)
    lines = [f"cosine similarity to {report['reference']}"]
    lines.append(f"{'':<{width}}  " + "  ".join(f"{h:>12.12}" for h in heads))
    for g in groups:
        vals = [m["overall"] if g == "overall" else m["groups"][g] for m in models]
        cells = ["           -" if v is None else f"{v:12.4f}" for v in vals]
        lines.append(f"{g:<{width}}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"
