"""The demo's measurements beside retrieval: every variant fine-tuned and probed, the held-out
LM loss of every checkpoint (`measure`), the results' task/sweep tables (`assemble`) and the
goals and orderings checked on them (`checks`). The scoring itself is `demo_eval`'s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bidirlm.recipe import demo_eval as de
from bidirlm.recipe.demo_config import (
    MAIN_CODE_SHARE,
    MERGE_RATIOS,
    TASK_METRIC,
    TASKS,
    VARIANTS,
    DemoSize,
    base_phase,
    eval_phase,
    mix_phase,
    phase_of,
    sweep_phase,
)


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def finetune_protocol(size: DemoSize) -> Any:
    """The demo size's fine-tuning protocol (`demo_eval.FinetuneProtocol`)."""
    seq_steps, tok_steps, seeds = size.finetune
    return de.FinetuneProtocol(
        {"sequence": seq_steps, "token": tok_steps}, seeds=seeds, max_seq_len=size.eval_length
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def measure(
    paths: dict[str, Path],
    size: DemoSize,
    log: Callable[[str], None],
    out: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tuning and probes of every variant and sweep merge, held-out LM loss of every
    distinct checkpoint (the data-mix MNTP runs included).

    `paths`: pipeline phase (and "base") -> checkpoint folder; `out`: the demo folder (the
    fine-tuning data and runs go under it; default: next to the pipeline's runs); `seed`: the
    demo's seed: the fine-tuning seeds are `seed * S ... seed * S + S - 1` for S protocol seeds
    (demo seed 0 fine-tunes with 0 and 1, seed 1 with 2 and 3).
    """
    out = out if out is not None else paths["base"].parent
    data = de.ProbeData.load(*size.probe)
    task_files = de.write_task_files(out / "data" / "tasks", size.finetune_data)
    protocol = finetune_protocol(size)
    texts = {kind: de.heldout_texts(kind, size.lm_texts) for kind in ("docs", "code")}
    models: dict[str, tuple[str, bool]] = {
        v: (phase_of(v, size), bi) for v, (_, bi) in VARIANTS.items()
    }
    for ratio in (0.25, 0.75):
        models[f"merge {ratio:g}"] = (sweep_phase(ratio), True)
    probes: dict[str, Any] = {}
    finetuned: dict[str, Any] = {}
    fine_tune_seeds = range(seed * protocol.seeds, (seed + 1) * protocol.seeds)
    for name, (phase, bidirectional) in models.items():
        t0 = time.perf_counter()
        probes[name] = de.probe_scores(
            paths[phase], data, bidirectional=bidirectional, max_length=size.eval_length
        )
        finetuned[name] = {}
        for task in ("sequence", "token"):
            runs = [
                de.finetune_score(
                    paths[phase],
                    task,
                    task_files[task],
                    out / "finetune" / eval_phase(name)[5:] / f"{task}-seed{ft_seed}",
                    causal=not bidirectional,
                    seed=ft_seed,
                    protocol=protocol,
                    device=device,
                )
                for ft_seed in fine_tune_seeds
            ]
            f1 = [r["macro_f1"] for r in runs]
            mean, sd = _mean_sd(f1)
            finetuned[name][task] = {
                "macro_f1": mean,
                "macro_f1_sd": sd,
                "accuracy": _mean_sd([r["accuracy"] for r in runs])[0],
                "seeds": f1,
            }
        ft = finetuned[name]
        log(
            f"    {name}: fine-tuned sequence F1 {ft['sequence']['macro_f1']:.3f} "
            f"± {ft['sequence']['macro_f1_sd']:.3f}, token F1 {ft['token']['macro_f1']:.3f} "
            f"± {ft['token']['macro_f1_sd']:.3f} ({protocol.seeds} seeds); probe sequence "
            f"{probes[name]['sequence']['macro_f1']:.3f}, token "
            f"{probes[name]['token']['macro_f1']:.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    losses: dict[str, dict[str, float]] = {}
    phases = [p for p, _ in models.values()] + [mix_phase(s) for s in size.mix_shares]
    for phase in dict.fromkeys(phases):
        losses[phase] = {
            kind: de.lm_loss(paths[phase], texts[kind], max_length=size.max_seq_len)
            for kind in texts
        }
        log(
            f"    held-out LM loss {phase}: docs {losses[phase]['docs']:.3f}, code "
            f"{losses[phase]['code']:.3f}"
        )
    return {
        "probes": probes,
        "finetuned": finetuned,
        "losses": losses,
        "probe_sizes": {
            "sequence": [len(data.seq_train), len(data.seq_test)],
            "token_lines": [len(data.tok_train), len(data.tok_test)],
        },
        "finetune_sizes": {
            task: [_count_lines(f[split]) for split in ("train", "test")]
            for task, f in task_files.items()
        },
        "finetune_protocol": {**dataclasses.asdict(protocol), "seed_values": list(fine_tune_seeds)},
        "lm_texts": {k: len(v) for k, v in texts.items()},
    }


def assemble(results: dict[str, Any], measured: dict[str, Any], size: DemoSize) -> None:
    """Add the task table (fine-tuned scores), the probes, changes relative to Base, forgetting,
    the merge-ratio sweep and the data-mix sweep."""
    probes, losses, ft = measured["probes"], measured["losses"], measured["finetuned"]
    tasks: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        tasks[v] = {
            "retrieval": results["variants"][v],
            "sequence": ft[v]["sequence"]["macro_f1"],
            "token": ft[v]["token"]["macro_f1"],
        }
    results["tasks"] = tasks
    results["task_metrics"] = dict(TASK_METRIC)
    results["relative"] = {v: {t: tasks[v][t] - tasks["Base"][t] for t in TASKS} for v in VARIANTS}
    results["finetuned"] = {v: ft[v] for v in VARIANTS}
    results["finetune_protocol"] = measured["finetune_protocol"]
    results["probes"] = {v: probes[v] for v in VARIANTS}
    results["forgetting"] = {v: losses[phase_of(v, size)] for v in VARIANTS}
    sweep = []
    for ratio in MERGE_RATIOS:
        name = {0.0: "Bi+Base", 0.5: "Bi+MNTP (merged 50/50)", 1.0: "Bi+MNTP"}.get(
            ratio, f"merge {ratio:g}"
        )
        phase = base_phase(size) if ratio == 0.0 else "mntp" if ratio == 1.0 else sweep_phase(ratio)
        retrieval = results["variants"].get(name, results["sweep_retrieval"].get(name))
        sweep.append(
            {
                "ratio": ratio,
                "retrieval": retrieval,
                "sequence": ft[name]["sequence"]["macro_f1"],
                "token": ft[name]["token"]["macro_f1"],
                "sequence_probe": probes[name]["sequence"]["macro_f1"],
                "token_probe": probes[name]["token"]["macro_f1"],
                "docs_loss": losses[phase]["docs"],
                "code_loss": losses[phase]["code"],
            }
        )
    results["merge_sweep"] = sweep
    mix = {share: mix_phase(share) for share in size.mix_shares}
    mix[MAIN_CODE_SHARE] = "mntp"
    results["mix_sweep"] = [
        {
            "code_share": share,
            "phase": mix[share],
            "retrieval": results["variants"]["Bi+MNTP"]
            if mix[share] == "mntp"
            else results["mix_retrieval"][f"code share {share:g}"],
            "docs_loss": losses[mix[share]]["docs"],
            "code_loss": losses[mix[share]]["code"],
        }
        for share in sorted(mix)
    ]
    results["measure_sizes"] = {
        "probe": measured["probe_sizes"],
        "finetune": measured["finetune_sizes"],
        "lm_texts": measured["lm_texts"],
    }


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's goals and the paper's orderings, each computed on the results: {claim, met,
    margin (how far above (>0) or below (<0) the bar), detail}."""
    t, ref, bm25 = results["tasks"], results["reference"]["ndcg@10"], results["bm25"]["ndcg@10"]
    out: list[dict[str, Any]] = []

    def add(claim: str, margin: float, detail: str) -> None:
        out.append({"claim": claim, "met": bool(margin >= 0), "margin": margin, "detail": detail})

    worst = min(VARIANTS, key=lambda v: t[v]["retrieval"])
    add(
        "every trained variant beats the untrained reference on retrieval",
        t[worst]["retrieval"] - ref,
        f"lowest trained: {worst} nDCG@10 {t[worst]['retrieval']:.4f} vs reference {ref:.4f}",
    )
    best = max(VARIANTS, key=lambda v: t[v]["retrieval"])
    add(
        "the best variant beats BM25 on retrieval",
        t[best]["retrieval"] - bm25,
        f"best: {best} nDCG@10 {t[best]['retrieval']:.4f} vs BM25 {bm25:.4f}",
    )
    a, b = t["Bi+MNTP+Contrastive"]["retrieval"], t["Bi+Contrastive"]["retrieval"]
    add(
        "Bi+MNTP+Contrastive >= Bi+Contrastive on retrieval",
        a - b,
        f"nDCG@10 {a:.4f} vs {b:.4f}",
    )
    ft = results.get("finetuned", {})

    def f1(v: str, task: str) -> str:
        sd = ft.get(v, {}).get(task, {}).get("macro_f1_sd")
        return f"{t[v][task]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")

    seeds = results.get("finetune_protocol", {}).get("seeds")
    over = f" (fine-tuned, mean ± sd over {seeds} seeds)" if seeds else ""
    for v in ("Bi+MNTP", "Bi+MNTP+Contrastive"):
        a, b = t[v]["token"], t["Bi+Contrastive"]["token"]
        add(
            f"{v} beats Bi+Contrastive on the token task",
            a - b,
            f"macro-F1 {f1(v, 'token')} vs {f1('Bi+Contrastive', 'token')}{over}",
        )
    a, b = t["Bi+MNTP"]["token"], t["Bi+Base"]["token"]
    add(
        "Bi+MNTP beats Bi+Base on the token task",
        a - b,
        f"macro-F1 {f1('Bi+MNTP', 'token')} vs {f1('Bi+Base', 'token')}{over}",
    )
    f = results["forgetting"]
    for kind in ("docs", "code"):
        base, mntp = f["Base"][kind], f["Bi+MNTP"][kind]
        merged = f["Bi+MNTP (merged 50/50)"][kind]
        lost = mntp - base
        recovered = (mntp - merged) / lost if lost > 0 else float("nan")
        if lost > 0:
            add(
                f"the 50/50 merge recovers most (>= 50%) of the held-out {kind} LM loss MNTP lost",
                recovered - 0.5,
                f"loss base {base:.3f}, Bi+MNTP {mntp:.3f}, merged {merged:.3f}: "
                f"{100 * recovered:.0f}% recovered",
            )
        else:
            add(
                f"MNTP raises the held-out {kind} LM loss (forgetting to recover)",
                lost,
                f"loss base {base:.3f}, Bi+MNTP {mntp:.3f}, merged {merged:.3f}",
            )
    mix = {row["code_share"]: row for row in results.get("mix_sweep", [])}
    if 0.0 in mix and MAIN_CODE_SHARE in mix:
        none, main = mix[0.0]["code_loss"], mix[MAIN_CODE_SHARE]["code_loss"]
        add(
            "code in the MNTP mix lowers the held-out code LM loss (share 0 vs "
            f"{MAIN_CODE_SHARE:g})",
            none - main,
            f"code loss {none:.3f} (docs only) vs {main:.3f} ({MAIN_CODE_SHARE:g} code)",
        )
    return out
