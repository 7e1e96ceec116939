"""The paper's fine-tuning protocol and its domain-transfer recipe, on top of `bidirlm train`.

`finetune_sweep(config, lrs, models=...)`: every model x learning rate is fine-tuned with the
config's task (a `sequence-classification` / `token-classification` config with `task.dev`),
10% linear warmup and linear decay to 0 (`optim.schedule = "linear"`, `warmup_steps` = 10% of
`train.steps`); the best dev score of each run (`best.json`) is collected and each model's best
over the grid reported, so adaptation variants (Base, Bi, Bi+MNTP, ...) compare on fine-tuning
fairly. Runs live in `OUTPUT/<model>/lr-<lr>/` and resume (a finished run is not redone); the
report is `OUTPUT/sweep.json` and a text table (`format_sweep`).

`domain_transfer(config, encoder=..., specialist=..., steps=[10, 20, 50, 100])`: merge the
encoder (e.g. a Bi+MNTP checkpoint) 50/50 with a specialist of the same backbone (any causal
checkpoint, e.g. a domain classifier's LM) with `bidirlm.runtime.merge`, then fine-tune with the
same config for `max(steps)` steps, evaluating the dev set at each of `steps`, the paper's three
models: the merged one (`merged`), the encoder alone (`unmerged`) and the specialist itself with
bidirectional attention (`specialist`, the paper's Bi+Specialist) (`OUTPUT/merged-model/`,
`OUTPUT/finetune-{merged,unmerged,specialist}/`). The report (`OUTPUT/domain_transfer.json`,
chart `OUTPUT/curve.png`) gives the three learning curves, each one's peak, the fraction of its
peak reached at every step, and an exponential moving average of each curve beside the raw one
(`ema`, `ema_alpha` 0.4 by default: `s_1 = x_1`, `s_k = alpha * x_k + (1 - alpha) * s_(k-1)`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bidirlm.runtime.jsonl import read_jsonl
from bidirlm.runtime.merging import merge
from bidirlm.runtime.training import trainer
from bidirlm.runtime.training.config import TrainConfig
from bidirlm.runtime.training.task_config import TASK_PHASES
from bidirlm.runtime.training.task_metrics import json_text

WARMUP_FRACTION = 0.1
EMA_ALPHA = 0.4  # the smoothing of the domain-transfer curves (weight of the newest point)
# The domain-transfer runs: report key -> what the curve is
TRANSFER_RUNS = {
    "merged": "Bi+MNTP x specialist, merged",
    "unmerged": "Bi+MNTP alone",
    "specialist": "Bi+Specialist",
}


def _check(config: TrainConfig) -> None:
    if config.phase not in TASK_PHASES:
        raise ValueError(f"phase={config.phase!r}: the sweep needs one of {', '.join(TASK_PHASES)}")
    if not config.task.dev:
        raise ValueError("task.dev is empty: the sweep selects by dev score, set task.dev")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def protocol_config(config: TrainConfig, *, model: str, lr: float, output: Path) -> TrainConfig:
    """`config` with the protocol's schedule: `lr`, 10% warmup, linear decay, dev-only patience."""
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate {lr} must be a finite number > 0")
    out = copy.deepcopy(config)
    out.model = model
    out.optim.lr = float(lr)
    out.optim.schedule = "linear"
    out.optim.min_lr_ratio = 0.0
    out.optim.warmup_steps = round(WARMUP_FRACTION * out.train.steps)
    out.train.output = str(output)
    return out


def _best(output: Path) -> dict[str, Any]:
    return json.loads((output / "best.json").read_text(encoding="utf-8"))


def finetune_sweep(
    config: TrainConfig,
    lrs: Sequence[float],
    *,
    models: Mapping[str, str] | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune every model at every learning rate; returns (and writes) the report.

    `models`: name -> checkpoint (default: {"model": config.model}). `output`: the sweep folder
    (default: `train.output`). Report: `{"metric", "lrs", "models": {name: {"model", "scores":
    {lr: best dev score}, "best_lr", "best_score", "best_step"}}}`.
    """
    _check(config)
    if not lrs:
        raise ValueError("lrs is empty: give at least one learning rate")
    models = dict(models or {"model": config.model})
    root = Path(output or config.train.output)
    report: dict[str, Any] = {"lrs": [float(x) for x in lrs], "models": {}}
    for name, path in models.items():
        entry: dict[str, Any] = {"model": str(path), "scores": {}, "runs": {}}
        for lr in lrs:
            run_dir = root / _slug(name) / f"lr-{lr:g}"
            trainer.train(protocol_config(config, model=str(path), lr=lr, output=run_dir))
            best = _best(run_dir)
            report["metric"] = best["metric"]
            entry["scores"][f"{lr:g}"] = best["score"]
            entry["runs"][f"{lr:g}"] = {"output": str(run_dir), "best_step": best["step"]}
        # a run whose dev metric was never finite (null in best.json) ranks last
        best_lr = max(entry["scores"], key=lambda k: _rank(entry["scores"][k]))
        entry.update(
            best_lr=float(best_lr),
            best_score=entry["scores"][best_lr],
            best_step=entry["runs"][best_lr]["best_step"],
        )
        report["models"][name] = entry
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".sweep.json.tmp"
    tmp.write_text(json_text(report) + "\n", encoding="utf-8")
    tmp.replace(root / "sweep.json")
    return report


def _rank(score: float | None) -> float:
    return score if score is not None and math.isfinite(score) else -math.inf


def _cell(score: float | None) -> str:
    return "nan" if score is None else f"{score:.4f}"


def format_sweep(report: Mapping[str, Any]) -> str:
    """The sweep report as a text table: one row per model, one column per learning rate."""
    lrs = [f"{x:g}" for x in report["lrs"]]
    names = list(report["models"])
    width = max([5, *(len(n) for n in names)])
    head = f"{'model':<{width}}  " + "  ".join(f"{lr:>8}" for lr in lrs)
    lines = [f"dev {report.get('metric', 'score')} (best over each run)", head + "  best"]
    for name in names:
        e = report["models"][name]
        cells = "  ".join(f"{_cell(e['scores'][lr]):>8}" for lr in lrs)
        lines.append(f"{name:<{width}}  {cells}  {_cell(e['best_score'])} @ {e['best_lr']:g}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Domain transfer
# --------------------------------------------------------------------------------------------


def ema(values: Sequence[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Exponential moving average: `s_1 = x_1`, `s_k = alpha * x_k + (1 - alpha) * s_(k-1)`."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ema alpha must be in (0, 1], got {alpha}")
    out: list[float] = []
    for x in values:
        out.append(float(x) if not out else alpha * float(x) + (1.0 - alpha) * out[-1])
    return out


def domain_transfer(
    config: TrainConfig,
    *,
    encoder: str,
    specialist: str,
    steps: Sequence[int] = (10, 20, 50, 100),
    weight: float = 0.5,
    output: str | Path | None = None,
    chart: bool = True,
    ema_alpha: float = EMA_ALPHA,
) -> dict[str, Any]:
    """Merged (encoder x specialist), unmerged and Bi+Specialist learning curves; returns and
    writes the report.

    The merge is linear: `weight * encoder + (1 - weight) * specialist`, the encoder's config
    (bidirectional) and tokenizer. The three runs use `config` with `train.steps = max(steps)`,
    `task.eval_steps = steps` (and no early stopping); the specialist's runs with bidirectional
    attention (`task.attention`), whatever the config says. Report: `{"steps", "metric",
    "ema_alpha", "merged": {"model", "label", "curve": {step: score}, "ema": {step: smoothed},
    "peak", "fraction_of_peak": {step: f}}, "unmerged": ..., "specialist": ...}`.
    """
    _check(config)
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    if not 0.0 < weight < 1.0:
        raise ValueError(f"weight must be in (0, 1), got {weight}")
    if not 0.0 < ema_alpha <= 1.0:
        raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
    root = Path(output or config.train.output)
    merged = root / "merged-model"
    if not (merged / "config.json").is_file():
        merge(
            [encoder, specialist],
            [weight, 1.0 - weight],
            merged,
            config_from=encoder,
            tokenizer_from=encoder,
        )
    report: dict[str, Any] = {"steps": steps, "weight": weight, "ema_alpha": ema_alpha}
    models = {"merged": str(merged), "unmerged": str(encoder), "specialist": str(specialist)}
    for name, model in models.items():
        run = copy.deepcopy(config)
        run.model = model
        if name == "specialist":  # Bi+Specialist: the specialist made bidirectional
            run.task.attention = "bidirectional"
        run.train.steps = steps[-1]
        run.train.output = str(root / f"finetune-{name}")
        run.task.eval_steps = list(steps)
        run.task.eval_every = 0
        run.task.patience = 0
        trainer.train(run)
        rows = [row for _, row in read_jsonl(Path(run.train.output, "metrics.jsonl"))]
        curve = {
            int(r["step"]): float(r["dev_score"]) if r["dev_score"] is not None else 0.0
            for r in rows
            if "dev_score" in r
        }
        peak = max(curve.values())
        report["metric"] = _best(Path(run.train.output))["metric"]
        smooth = ema([curve[s] for s in steps], ema_alpha)
        report[name] = {
            "model": model,
            "label": TRANSFER_RUNS[name],
            "output": run.train.output,
            "curve": {str(s): curve[s] for s in steps},
            "ema": {str(s): v for s, v in zip(steps, smooth)},
            "peak": peak,
            "fraction_of_peak": {str(s): (curve[s] / peak if peak > 0 else 0.0) for s in steps},
        }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".domain_transfer.json.tmp"
    tmp.write_text(json_text(report) + "\n", encoding="utf-8")
    tmp.replace(root / "domain_transfer.json")
    if chart:
        plot_curves(report, root / "curve.png")
    return report


def plot_curves(report: Mapping[str, Any], path: str | Path) -> Path:
    """Dev score vs fine-tuning step: each run's raw curve (markers) and its EMA (a line of the
    same colour), matplotlib's Agg backend."""
    import matplotlib  # optional dependency ([train] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    alpha = report.get("ema_alpha", EMA_ALPHA)
    for name, marker in (("merged", "o"), ("unmerged", "s"), ("specialist", "^")):
        if name not in report:
            continue
        entry = report[name]
        curve = entry["curve"]
        xs = [int(s) for s in curve]
        label = entry.get("label", name)
        (raw,) = ax.plot(xs, [curve[s] for s in curve], marker, alpha=0.45, label=f"{label} (raw)")
        if "ema" in entry:
            smooth = entry["ema"]
            ax.plot(xs, [smooth[s] for s in curve], "-", color=raw.get_color(),
                    label=f"{label} (EMA {alpha:g})")  # fmt: skip
    ax.set_xscale("log")
    steps = [int(s) for s in report["steps"]]
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"dev {report.get('metric', 'score')}")
    ax.set_title("domain transfer: merged, unmerged, Bi+Specialist")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def format_transfer(report: Mapping[str, Any]) -> str:
    """The curves as a table: per run the raw score (fraction of its peak) and its EMA."""
    names = [n for n in TRANSFER_RUNS if n in report]
    alpha = report.get("ema_alpha", EMA_ALPHA)
    lines = [
        f"dev {report.get('metric', 'score')} by fine-tuning step: raw (fraction of peak) / "
        f"EMA (alpha {alpha:g})"
    ]
    lines.append(f"{'step':>6}  " + "  ".join(f"{n:>23}" for n in names))
    for s in report["steps"]:
        cells = []
        for name in names:
            e = report[name]
            cell = f"{e['curve'][str(s)]:.4f} ({e['fraction_of_peak'][str(s)]:.0%})"
            if "ema" in e:
                cell += f" / {e['ema'][str(s)]:.4f}"
            cells.append(f"{cell:>23}")
        lines.append(f"{s:>6}  " + "  ".join(cells))
    return "\n".join(lines)
