"""The demo's report.md: tables, charts, the goals and orderings checked, how the numbers were
made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bidirlm.recipe.demo_config import MAIN_CODE_SHARE


def format_report(results: dict[str, Any]) -> str:
    """report.md: tables, charts, the goals and orderings checked, how the numbers were made.

    The task, forgetting and check sections appear when `results` has them (a retrieval-only
    results dict gives the retrieval table alone).
    """
    seed = f", seed {results['seed']}" if "seed" in results else ""
    lines = [f"# bidirlm demo ({results['size']}{seed})", ""]
    if "base" in results:
        lines += [f"Base: {results['base']}.", ""]
    retrieval = (
        f"Retrieval: held-out task `{results['task']}`, {results['num_queries']} queries "
        f"(docstring summaries of held-out stdlib packages) against {results['num_documents']} "
        "documents (docstring bodies); mean pooling, cosine similarity, nDCG@10."
    )
    if "tasks" in results:
        t, rel = results["tasks"], results["relative"]
        sizes = results["measure_sizes"]
        proto = results["finetune_protocol"]
        ft_sizes = sizes["finetune"]
        lines += [
            retrieval + " Sequence task: docstring -> stdlib package "
            f"({ft_sizes['sequence'][0]} training docstrings, {ft_sizes['sequence'][1]} from "
            "held-out packages); token task: source token -> token class "
            f"({ft_sizes['token'][0]} training lines, {ft_sizes['token'][1]} held-out). Every "
            "variant is fine-tuned with the same protocol (`bidirlm train`, phases "
            "sequence-classification / token-classification): all weights plus a fresh head, "
            f"{proto['steps']['sequence']} / {proto['steps']['token']} steps of "
            f"{proto['batch_size']} examples (sequence / token), lr {proto['lr']:g} (head "
            f"x{proto['head_lr_multiplier']:g}), 10% warmup then linear decay, "
            f"{proto['pooling']} pooling, the Base variant with causal attention; scored by "
            "held-out macro-F1 after the last step (no checkpoint picked on the held-out "
            f"split), mean ± sd over {proto['seeds']} fine-tuning seeds "
            f"({', '.join(str(v) for v in proto.get('seed_values', []))}).",
            "",
            "| variant | retrieval nDCG@10 | MRR@10 | sequence F1 | token F1 | "
            "Δ retrieval | Δ sequence | Δ token |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ft = results["finetuned"]
        for v in results["variants"]:
            lines.append(
                f"| {v} | {t[v]['retrieval']:.4f} | {results['mrr@10'][v]:.4f} | "
                f"{t[v]['sequence']:.4f} ± {ft[v]['sequence']['macro_f1_sd']:.4f} | "
                f"{t[v]['token']:.4f} ± {ft[v]['token']['macro_f1_sd']:.4f} | "
                f"{rel[v]['retrieval']:+.4f} | {rel[v]['sequence']:+.4f} | "
                f"{rel[v]['token']:+.4f} |"
            )
        empty = " | | | | |"  # sequence, token and the three Δ columns
    else:
        lines += [
            retrieval,
            "",
            "| variant | nDCG@10 | MRR@10 | recall@10 |",
            "|---|---:|---:|---:|",
        ]
        for v, score in results["variants"].items():
            lines.append(
                f"| {v} | {score:.4f} | {results['mrr@10'][v]:.4f} | "
                f"{results['recall@10'][v]:.4f} |"
            )
        empty = ""
    for key in ("bm25", "reference"):
        row = results.get(key)
        if row:
            recall = "" if empty else f" {row['recall@10']:.4f} |"
            lines.append(
                f"| *reference, not a variant: {row['name']}* | {row['ndcg@10']:.4f} | "
                f"{row['mrr@10']:.4f} |{recall}{empty}"
            )
    lines += ["", "Δ: change relative to Base (the paper's Figure 2 form)." if empty else ""]
    lines += ["", "![results](results.png)", ""]
    if "probes" in results:
        sizes = results["measure_sizes"]["probe"]
        lines += [
            "Before fine-tuning moves the weights: a linear probe (logistic regression) on each "
            f"frozen variant's features ({sizes['sequence'][0]} / {sizes['sequence'][1]} "
            f"docstrings, {sizes['token_lines'][0]} / {sizes['token_lines'][1]} lines), "
            "held-out macro-F1:",
            "",
            "| variant | sequence probe F1 | token probe F1 |",
            "|---|---:|---:|",
        ]
        for v in results["variants"]:
            p = results["probes"][v]
            lines.append(
                f"| {v} | {p['sequence']['macro_f1']:.4f} | {p['token']['macro_f1']:.4f} |"
            )
        lines.append("")
    if "forgetting" in results:
        sizes = results["measure_sizes"]
        lines += [
            "## Forgetting",
            "",
            "Causal-LM loss (nats/token, causal attention, the model's tied LM head) on held-out "
            f"stdlib packages: {sizes['lm_texts']['docs']} docstring texts and "
            f"{sizes['lm_texts']['code']} source files (first "
            f"{results['size_config']['max_seq_len']} tokens each).",
            "",
            "| variant | docs loss | code loss |",
            "|---|---:|---:|",
        ]
        for v in results["variants"]:
            f = results["forgetting"][v]
            lines.append(f"| {v} | {f['docs']:.4f} | {f['code']:.4f} |")
        lines += [
            "",
            "Merge-ratio sweep (share of Bi+MNTP in a linear merge with the base):",
            "",
            "| ratio | docs loss | code loss | retrieval nDCG@10 | sequence F1 | token F1 | "
            "sequence probe | token probe |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["merge_sweep"]:
            lines.append(
                f"| {r['ratio']:g} | {r['docs_loss']:.4f} | {r['code_loss']:.4f} | "
                f"{r['retrieval']:.4f} | {r['sequence']:.4f} | {r['token']:.4f} | "
                f"{r['sequence_probe']:.4f} | {r['token_probe']:.4f} |"
            )
        if results.get("mix_sweep"):
            lines += [
                "",
                "Data-mix sweep (the paper's Figure 5 in miniature): MNTP from the base with the "
                "same budget and a different share of code (vs docstrings) in its data; the "
                f"main runs use {MAIN_CODE_SHARE:g}.",
                "",
                "| code share | docs loss | code loss | retrieval nDCG@10 |",
                "|---:|---:|---:|---:|",
            ]
            for r in results["mix_sweep"]:
                lines.append(
                    f"| {r['code_share']:g} | {r['docs_loss']:.4f} | {r['code_loss']:.4f} | "
                    f"{r['retrieval']:.4f} |"
                )
        lines += ["", "![forgetting](forgetting.png)", ""]
    if "checks" in results:
        lines += [
            "## Goals and the paper's orderings, checked on these numbers",
            "",
            "| claim | holds here | margin | numbers |",
            "|---|---|---:|---|",
        ]
        for c in results["checks"]:
            lines.append(
                f"| {c['claim']} | {'yes' if c['met'] else '**no**'} | {c['margin']:+.4f} | "
                f"{c['detail']} |"
            )
        missed = [c["claim"] for c in results["checks"] if not c["met"]]
        lines += [
            "",
            (
                f"{len(missed)} of {len(results['checks'])} do not reproduce at this scale: "
                + "; ".join(missed)
                + "."
            )
            if missed
            else "All hold at this scale.",
            "",
        ]
    measured = (
        f"measurements {results['measure_seconds']:.0f} s; " if "measure_seconds" in results else ""
    )
    date = f" ({results['date']})" if "date" in results else ""
    lines += [
        f"Best variant on retrieval: **{results['best']}**. Best bidirectional variant "
        f"**{results['export']['variant']}** exported as a sentence-transformers model to "
        f"`{Path(results['export']['path']).name}/`; `SentenceTransformer(path).encode` gave "
        f"embeddings of shape {results['export']['shape']} (query/document cosines "
        f"{', '.join(f'{c:.3f}' for c in results['export']['cosines'])}).",
        "",
        "Phases (seconds): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["phase_seconds"].items()),
        "",
        f"Total {sum(results['phase_seconds'].values()):.0f} s of phase time (the sum above; a "
        f"phase skipped on a re-run counts the time it took when it ran); {measured}this run "
        f"took {results['seconds']:.0f} s on {results['device']}{date}{seed}; Python "
        f"{results['python']}, torch {results['torch']}; kernels: {results['kernels']}.",
        "",
    ]
    return "\n".join(lines)
