"""The demo's runs: its pipeline recipe (causal base, MNTP, the merges, contrastive x2, the
data-mix MNTP runs and the retrieval evaluations) as raw tables for `recipe.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bidirlm.recipe.demo_config import (
    MAIN_CODE_SHARE,
    MERGE_RATIOS,
    VARIANTS,
    DemoSize,
    base_phase,
    eval_phase,
    mix_phase,
    phase_of,
    sweep_phase,
)


def _train_table(
    model: str, phase: str, steps: int, lr: float, device: str, data: dict[str, Any], seed: int
) -> dict[str, Any]:
    return {
        "kind": "train",
        "model": model,
        "phase": phase,
        "train": {
            "steps": steps,
            "seed": seed,
            "checkpoint_every": max(steps // 2, 1),
            "keep_checkpoints": 1,
            "log_every": 10,
            "device": device,
        },
        "optim": {
            "lr": lr,
            "schedule": "wsd",
            "warmup_steps": max(steps // 10, 1),
            "decay_fraction": 0.2,
        },
        "data": data,
    }


def lm_data(size: DemoSize, files: dict[str, Path], code_share: float) -> dict[str, Any]:
    """Causal / MNTP data: the training packages' docs and code, `code_share` of it code."""
    sources = [
        {"path": str(files["docs"]), "weight": 1.0 - code_share, "name": "stdlib-docs"},
        {"path": str(files["code"]), "weight": code_share, "name": "stdlib-code"},
    ]
    return {
        "tokens_per_batch": size.tokens_per_batch,
        "max_seq_len": size.max_seq_len,
        "sources": [src for src in sources if src["weight"] > 0],
    }


def demo_recipe(
    out: Path, size: DemoSize, files: dict[str, Path], device: str, seed: int = 0
) -> dict[str, Any]:
    """The demo as raw pipeline tables: (causal base,) MNTP, merges, contrastive x2, the
    data-mix MNTP runs, evaluations."""
    main_data = lm_data(size, files, MAIN_CODE_SHARE)
    pair_data = {
        "batch_size": size.pair_batch,
        "query_max_len": size.query_len,
        "document_max_len": size.doc_len,
        "negatives_per_query": 1,
        "sources": [{"path": str(files["pairs"]), "name": "stdlib-pairs"}],
    }
    contrastive = {"temperature": size.temperature, "pooling": "mean"}
    base = "@" + base_phase(size)
    tables: dict[str, Any] = {}
    if not size.pretrained:
        tables["causal"] = _train_table(
            "@base", "causal", size.causal_steps, size.lr_causal, device, main_data, seed
        )
    tables["mntp"] = _train_table(
        base, "mntp", size.mntp_steps, size.lr_mntp, device, main_data, seed
    )
    tables["mntp"]["mntp"] = {"mask_ratio": 0.3}
    for ratio in MERGE_RATIOS[1:-1]:
        tables[sweep_phase(ratio)] = {
            "kind": "merge",
            "models": ["@mntp", base],
            "weights": [ratio, 1.0 - ratio],
        }
    for name, start in (("contrastive", base), ("mntp_contrastive", "@mntp")):
        tables[name] = _train_table(
            start,
            "contrastive",
            size.contrastive_steps,
            size.lr_contrastive,
            device,
            pair_data,
            seed,
        )
        tables[name]["contrastive"] = dict(contrastive)
    for share in size.mix_shares:
        data = lm_data(size, files, share)
        tables[mix_phase(share)] = _train_table(
            base, "mntp", size.mntp_steps, size.lr_mntp, device, data, seed
        )
        tables[mix_phase(share)]["mntp"] = {"mask_ratio": 0.3}
    task_dir = out / "data" / "heldout"
    evals = {v: (phase_of(v, size), bi) for v, (_, bi) in VARIANTS.items()}
    for ratio in (0.25, 0.75):
        evals[f"merge {ratio:g}"] = (sweep_phase(ratio), True)
    for share in size.mix_shares:
        evals[f"code share {share:g}"] = (mix_phase(share), True)
    for name, (phase, bidirectional) in evals.items():
        tables[eval_phase(name)] = {
            "kind": "eval",
            "model": f"@{phase}",
            "task": str(task_dir),
            "bidirectional": bidirectional,
            "pooling": "mean",
            "max_length": size.eval_length,
            "batch_size": 64,
        }
    base_dir = out / ("base-pretrained" if size.pretrained else "base-init")
    return {
        "recipe": {
            "name": f"demo-{size.name}",
            "base": str(base_dir),
            "output": str(out / "runs"),
            "phases": list(tables),
            "description": "the embedded BidirLM demo",
        },
        **tables,
    }
