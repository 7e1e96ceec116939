"""The demo: the BidirLM recipe end to end on the embedded corpora, measured on held-out data.

`run_demo(out, size)`:

1. data: JSON Lines files of the stdlib's *training* packages only (docstrings, sources, and
   docstring summary -> body pairs with a hard negative from the same module), see
   `bidirlm.runtime.evaluation.split_of`; the held-out packages are never trained on.
2. a small random Qwen3 with the embedded BPE tokenizer (`bidirlm.runtime.embedded`), trained
   as a causal LM (the training engine's `causal` phase): our own "pretrained" base.
3. the paper's five adaptation variants and the merge, as one pipeline recipe
   (`bidirlm.recipe.pipeline`): Base (causal attention), Bi+Base (same weights, bidirectional),
   Bi+MNTP, Bi+Contrastive, Bi+MNTP+Contrastive, and Bi+MNTP merged 50/50 with its base;
   every variant evaluated on the held-out retrieval task (docstring summary -> body, mean
   pooling, nDCG@10 and MRR@10), and the untrained random-init model as a reference row (not a
   variant: the floor a trained variant has to beat).
4. `results.json`, `report.md`, `results.png` (a bar chart like the paper's Figure 2), and the
   best variant exported as a sentence-transformers model, loaded back with
   `SentenceTransformer(path)` to embed a query and two documents.

Re-running with the same `out` skips completed phases (the pipeline resumes). The tokenizer was
trained on the whole stdlib corpus (vocabulary only; no model weights see held-out text).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bidirlm.runtime import evaluation as ev

METRIC = "ndcg@10"


@dataclass(frozen=True)
class DemoSize:
    """Model shape and training budget of one demo size."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    causal_steps: int
    mntp_steps: int
    contrastive_steps: int
    tokens_per_batch: int  # causal/MNTP micro-batch, packed
    max_seq_len: int
    pair_batch: int  # contrastive pairs per step
    query_len: int
    doc_len: int
    eval_queries: int | None  # None: every held-out query
    eval_documents: int | None  # None: every held-out document (else a subset with the answers)
    eval_length: int
    lr_causal: float
    lr_mntp: float
    lr_contrastive: float
    temperature: float  # InfoNCE temperature of the contrastive phase (the recipe's default 0.05)


SIZES: dict[str, DemoSize] = {
    # CI: the whole chain on a 2-core CPU in about a minute; numbers are noise at this size.
    "tiny": DemoSize("tiny", 32, 1, 2, 1, 16, 64, 6, 3, 3, 1024, 128, 8, 24, 64, 40, 120, 32,
                     3e-3, 1e-3, 1e-3, 0.05),
    # `--quick`: under 10 minutes on a 2-core CPU. Contrastive lr 3e-3 and temperature 0.02
    # measured better than 1e-3 / 0.05 at this size (held-out nDCG@10 0.057 vs 0.033 for
    # Bi+Contrastive); longer contrastive training (400 steps) overfits the ~2,000 pairs.
    "quick": DemoSize("quick", 96, 2, 4, 2, 24, 256, 300, 100, 250, 2048, 128, 32, 24, 64,
                      None, None, 64, 2e-3, 1e-3, 3e-3, 0.02),
    # The default: a larger model and budget, meant for a GPU (runs anywhere, slowly on a CPU).
    "full": DemoSize("full", 512, 8, 8, 4, 64, 1536, 3000, 800, 1000, 16384, 512, 128, 64, 256,
                     None, None, 256, 1e-3, 2e-4, 2e-4, 0.05),
}  # fmt: skip

# Variant name (as in the paper's Figure 2) -> (pipeline phase whose model it is, bidirectional).
VARIANTS: dict[str, tuple[str, bool]] = {
    "Base": ("causal", False),
    "Bi+Base": ("causal", True),
    "Bi+MNTP": ("mntp", True),
    "Bi+MNTP (merged 50/50)": ("merge", True),
    "Bi+Contrastive": ("contrastive", True),
    "Bi+MNTP+Contrastive": ("mntp_contrastive", True),
}

# Not a variant: the random-init model before any training (bidirectional, mean pooling), the
# floor a trained variant has to beat (mean-pooled random embeddings already match words).
REFERENCE = "Untrained (random init)"
REFERENCE_PHASE = ("base", True)

EXAMPLE_QUERY = "Return the number of items in a queue."
EXAMPLE_DOCS = [
    "The count is approximate: other threads may add or remove items at the same time.",
    "Parse a date string and return a datetime object in the local time zone.",
]


def eval_phase(variant: str) -> str:
    """The pipeline phase that evaluates a variant: "Bi+MNTP" -> "eval_bi_mntp"."""
    return "eval_" + re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")


def _log(msg: str) -> None:
    print(f"[bidirlm demo] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Data and the initial model
# ------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    tmp.replace(path)


def pairs_with_hard_negatives(pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Add one hard negative per pair: the body of the next documented object of its module."""
    by_module: dict[str, list[dict[str, str]]] = {}
    for p in pairs:
        by_module.setdefault(p["id"].split(":", 1)[0], []).append(p)
    out = []
    for group in by_module.values():
        for i, p in enumerate(group):
            record: dict[str, Any] = {"query": p["query"], "positive": p["positive"]}
            if len(group) > 1:
                record["negatives"] = [group[(i + 1) % len(group)]["positive"]]
            out.append(record)
    return out


def prepare_data(folder: Path) -> dict[str, Path]:
    """Training files from the stdlib's training packages (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.jsonl" for name in ("docs", "code", "pairs")}
    if not all(p.is_file() for p in files.values()):
        _write_jsonl(files["docs"], [{"text": t} for t in ev.stdlib_texts("train", "docs")])
        _write_jsonl(files["code"], [{"text": t} for t in ev.stdlib_texts("train", "code")])
        _write_jsonl(files["pairs"], pairs_with_hard_negatives(ev.stdlib_pairs("train")))
    return files


def subsample(task: ev.RetrievalTask, max_documents: int | None) -> ev.RetrievalTask:
    """Keep every relevant document and the first other ones up to `max_documents` (CI size)."""
    if max_documents is None or len(task.corpus) <= max_documents:
        return task
    keep = {d for docs in task.qrels.values() for d in docs}
    for doc_id in task.corpus:
        if len(keep) >= max_documents:
            break
        keep.add(doc_id)
    corpus = {d: t for d, t in task.corpus.items() if d in keep}
    return dataclasses.replace(task, corpus=corpus)


def build_initial_model(folder: Path, size: DemoSize) -> Path:
    """A random Qwen3 of the demo size with the embedded tokenizer (seed 0), written once."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    from bidirlm.runtime.embedded import embedded_tiny_model, save_random_qwen3

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
    tmp = folder.with_name(f".{folder.name}.tmp")
    save_random_qwen3(
        tmp,
        tokenizer,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
    )
    tmp.replace(folder)
    return folder


# ------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------


def _train_table(
    model: str, phase: str, steps: int, lr: float, device: str, data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "kind": "train",
        "model": model,
        "phase": phase,
        "train": {
            "steps": steps,
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


def demo_recipe(out: Path, size: DemoSize, files: dict[str, Path], device: str) -> dict[str, Any]:
    """The demo as raw pipeline tables: causal base, MNTP, merge, contrastive x2, evaluations."""
    lm_data = {
        "tokens_per_batch": size.tokens_per_batch,
        "max_seq_len": size.max_seq_len,
        "sources": [
            {"path": str(files["docs"]), "weight": 0.5, "name": "stdlib-docs"},
            {"path": str(files["code"]), "weight": 0.5, "name": "stdlib-code"},
        ],
    }
    pair_data = {
        "batch_size": size.pair_batch,
        "query_max_len": size.query_len,
        "document_max_len": size.doc_len,
        "negatives_per_query": 1,
        "sources": [{"path": str(files["pairs"]), "name": "stdlib-pairs"}],
    }
    contrastive = {"temperature": size.temperature, "pooling": "mean"}
    tables: dict[str, Any] = {
        "causal": _train_table(
            "@base", "causal", size.causal_steps, size.lr_causal, device, lm_data
        ),
        "mntp": _train_table("@causal", "mntp", size.mntp_steps, size.lr_mntp, device, lm_data),
        "merge": {"kind": "merge", "models": ["@mntp", "@causal"], "weights": [0.5, 0.5]},
        "contrastive": _train_table(
            "@causal", "contrastive", size.contrastive_steps, size.lr_contrastive, device, pair_data
        ),
        "mntp_contrastive": _train_table(
            "@mntp", "contrastive", size.contrastive_steps, size.lr_contrastive, device, pair_data
        ),
    }
    tables["mntp"]["mntp"] = {"mask_ratio": 0.3}
    for name in ("contrastive", "mntp_contrastive"):
        tables[name]["contrastive"] = dict(contrastive)
    task_dir = out / "data" / "heldout"
    for variant, (phase, bidirectional) in {**VARIANTS, REFERENCE: REFERENCE_PHASE}.items():
        tables[eval_phase(variant)] = {
            "kind": "eval",
            "model": f"@{phase}",
            "task": str(task_dir),
            "bidirectional": bidirectional,
            "pooling": "mean",
            "max_length": size.eval_length,
            "batch_size": 64,
        }
    return {
        "recipe": {
            "name": f"demo-{size.name}",
            "base": str(out / "base-init"),
            "output": str(out / "runs"),
            "phases": list(tables),
            "description": "the embedded BidirLM demo",
        },
        **tables,
    }


# ------------------------------------------------------------------------------------------
# Results: JSON, Markdown, chart, export
# ------------------------------------------------------------------------------------------


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Grouped bars (nDCG@10, MRR@10) per variant, in the style of the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    ndcg = [results["variants"][n] for n in names]
    mrr = [results["mrr@10"][n] for n in names]
    fig, ax = plt.subplots(figsize=(9.5, 4.2), dpi=120)
    xs = list(range(len(names)))
    width = 0.38
    bars1 = ax.bar([x - width / 2 for x in xs], ndcg, width, label="nDCG@10", color="#3b6ea8")
    bars2 = ax.bar([x + width / 2 for x in xs], mrr, width, label="MRR@10", color="#9cc3e6")
    groups = [bars1, bars2]
    reference = results.get("reference")
    if reference:  # a grey, hatched pair after a gap, and a dashed line at its nDCG@10
        x = len(names) + 0.4
        style = {"color": "#d9d9d9", "hatch": "//", "edgecolor": "#808080"}
        groups.append(ax.bar([x - width / 2], [reference["ndcg@10"]], width, **style))
        groups.append(ax.bar([x + width / 2], [reference["mrr@10"]], width, **style))
        ax.axhline(reference["ndcg@10"], color="#808080", linestyle="--", linewidth=0.8)
        xs.append(x)
        names = [*names, f"reference:\n{reference['name']}"]
        ndcg.append(reference["ndcg@10"])
        mrr.append(reference["mrr@10"])
    for bars in groups:
        for bar in bars:
            ax.annotate(
                f"{bar.get_height():.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(xs, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("score")
    top = max([*ndcg, *mrr, 0.05])
    ax.set_ylim(0, top * 1.2)
    ax.set_title(
        f"Adaptation variants on held-out stdlib retrieval ({results['num_queries']} queries, "
        f"demo size {results['size']})",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(results: dict[str, Any]) -> str:
    """report.md: the table, the chart and how the numbers were made."""
    lines = [
        f"# bidirlm demo ({results['size']})",
        "",
        f"Held-out retrieval task `{results['task']}`: {results['num_queries']} queries "
        f"(docstring summaries of held-out stdlib packages) against {results['num_documents']} "
        "documents (docstring bodies); mean pooling, cosine similarity.",
        "",
        "| variant | nDCG@10 | MRR@10 | recall@10 |",
        "|---|---:|---:|---:|",
    ]
    for name, score in results["variants"].items():
        lines.append(
            f"| {name} | {score:.4f} | {results['mrr@10'][name]:.4f} | "
            f"{results['recall@10'][name]:.4f} |"
        )
    reference = results.get("reference")
    if reference:
        lines.append(
            f"| *reference, not a variant: {reference['name']}* | {reference['ndcg@10']:.4f} | "
            f"{reference['mrr@10']:.4f} | {reference['recall@10']:.4f} |"
        )
    lines += [
        "",
        "![results](results.png)",
        "",
        f"Best variant: **{results['best']}**. Best bidirectional variant "
        f"**{results['export']['variant']}** exported as a sentence-transformers model to "
        f"`{Path(results['export']['path']).name}/`; `SentenceTransformer(path).encode` gave "
        "embeddings of "
        f"shape {results['export']['shape']} (query/document cosines "
        f"{', '.join(f'{c:.3f}' for c in results['export']['cosines'])}).",
        "",
        "Phases (seconds): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["phase_seconds"].items()),
        "",
        f"Total {sum(results['phase_seconds'].values()):.0f} s of phase time (the sum above; a "
        "phase skipped on a re-run counts the time it took when it ran); this run took "
        f"{results['seconds']:.0f} s on {results['device']}; Python {results['python']}, "
        f"torch {results['torch']}; kernels: {results['kernels']}.",
        "",
    ]
    return "\n".join(lines)


def export_best(model_path: Path, out: Path, max_length: int) -> dict[str, Any]:
    """Export a (bidirectional) variant as a sentence-transformers folder, embed with it."""
    import torch
    from sentence_transformers import SentenceTransformer

    from bidirlm.integrations.sentence_transformers import export_sentence_transformers

    # force: the folder is the demo's own export (a re-run replaces it, atomically)
    export_sentence_transformers(model_path, out, pooling="mean", max_length=max_length, force=True)
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    emb = torch.as_tensor(st.encode([EXAMPLE_QUERY, *EXAMPLE_DOCS], normalize_embeddings=True))
    cosines = (emb[1:] @ emb[0]).tolist()
    return {"path": str(out), "shape": list(emb.shape), "cosines": cosines}


def _device(prefer_gpu: bool) -> str:
    import torch

    return "cuda" if prefer_gpu and torch.cuda.is_available() else "cpu"


def run_demo(
    out: str | Path,
    size: str | DemoSize = "quick",
    *,
    prefer_gpu: bool = True,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Run the demo into `out`; return the results (also written to `out/results.json`)."""
    import torch

    from bidirlm.kernels.dispatch import decide
    from bidirlm.recipe.pipeline import parse_recipe, run_pipeline

    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = _device(prefer_gpu)
    start = time.perf_counter()
    threads = f" ({torch.get_num_threads()} torch threads)" if device == "cpu" else ""
    log(f"size {size.name} on {device}{threads}; outputs in {out}")
    log("1/4 data: stdlib training packages -> JSON Lines; held-out task")
    files = prepare_data(out / "data")
    task = subsample(ev.embedded_task(max_queries=size.eval_queries), size.eval_documents)
    ev.save_task(task, out / "data" / "heldout")
    log(
        f"    {len(task.queries)} held-out queries, {len(task.corpus)} documents from "
        f"{len(task.metadata['heldout_packages'])} held-out packages"
    )
    log("2/4 initial model: random Qwen3 with the embedded tokenizer")
    build_initial_model(out / "base-init", size)
    log("3/4 pipeline: causal base -> MNTP, merge, contrastive x2 -> evaluations")
    recipe = parse_recipe(demo_recipe(out, size, files, device))
    report = run_pipeline(recipe, log=log)
    phases = {p["name"]: p for p in report["phases"]}
    results: dict[str, Any] = {"metric": METRIC, "variants": {}, "mrr@10": {}, "recall@10": {}}
    for variant in VARIANTS:
        metrics = phases[eval_phase(variant)]["result"]
        results["variants"][variant] = metrics[METRIC]
        results["mrr@10"][variant] = metrics["mrr@10"]
        results["recall@10"][variant] = metrics["recall@10"]
    metrics = phases[eval_phase(REFERENCE)]["result"]
    results["reference"] = {
        "name": REFERENCE,
        **{key: metrics[key] for key in (METRIC, "mrr@10", "recall@10")},
    }
    best = max(results["variants"], key=results["variants"].get)
    # sentence-transformers exports are bidirectional: export the best bidirectional variant.
    exported = max((v for v in VARIANTS if VARIANTS[v][1]), key=lambda v: results["variants"][v])
    log(f"4/4 export: best bidirectional variant {exported} -> sentence-transformers")
    best_path = Path(phases[VARIANTS[exported][0]]["output"])
    export = export_best(best_path, out / "best-sentence-transformer", size.eval_length)
    export["variant"] = exported
    results.update(
        task=task.name,
        num_queries=len(task.queries),
        num_documents=len(task.corpus),
        size=size.name,
        size_config=dataclasses.asdict(size),
        best=best,
        export=export,
        phase_seconds={p["name"]: p["seconds"] for p in report["phases"] if p["kind"] != "eval"},
        seconds=round(time.perf_counter() - start, 1),
        device=torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        python=platform.python_version(),
        torch=torch.__version__,
        kernels="{0.impl} ({0.reason})".format(decide(device)),
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_results(results, out / "results.png")
    (out / "report.md").write_text(format_report(results), encoding="utf-8")
    log(f"done in {results['seconds']:.0f} s: {out / 'results.json'}, report.md, results.png")
    return results


def _cpu_name() -> str:
    import os

    name = platform.processor() or platform.machine()
    return f"CPU {name} ({os.cpu_count()} cores)"
