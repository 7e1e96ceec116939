"""The demo: the BidirLM recipe end to end on the embedded corpora, measured on held-out data.

`run_demo(out, size)`:

1. data: JSON Lines files of the stdlib's *training* packages only (docstrings, sources, and
   docstring summary -> body pairs with a hard negative from the same module), see
   `bidirlm.runtime.evaluation.split_of`; the held-out packages are never trained on.
2. the base: for `quick` and `full`, the pre-trained causal model shipped with the package
   (`bidirlm.recipe.demo_base`: 4 layers, width 128, made by `bidirlm demo --pretrain-base`);
   for the CI-sized `tiny`, a random model trained for a few causal steps here.
3. the paper's five adaptation variants and the merge, as one pipeline recipe
   (`bidirlm.recipe.pipeline`): Base (causal attention), Bi+Base (same weights, bidirectional),
   Bi+MNTP, Bi+Contrastive, Bi+MNTP+Contrastive, and Bi+MNTP merged 50/50 with its base (plus
   the 25/75 and 75/25 merges of the merge-ratio sweep).
4. measurements (`bidirlm.recipe.demo_eval`): held-out retrieval (docstring summary -> body,
   mean pooling, nDCG@10) with a BM25 row and the untrained random-init model as references;
   the embedded sequence task (docstring -> package) and token task (source token -> token
   class), every variant fine-tuned with the same small protocol (the fine-tuning training
   phases, a few seeds), and a linear probe on each frozen variant beside it; forgetting: each
   checkpoint's causal-LM loss on held-out stdlib docs and code; the merge-ratio sweep (0,
   0.25, 0.5, 0.75, 1 of Bi+MNTP) on those losses and on the tasks; the data-mix sweep (MNTP
   with another share of code in its data) on those losses and on retrieval.
5. `results.json`, `report.md` (tables, the change relative to Base, the paper's orderings and
   the demo's goals checked on the numbers), `results.png` (the paper's Figure 2 in miniature),
   `forgetting.png` (Figures 3-4), and the best bidirectional variant exported as a
   sentence-transformers model, loaded back with `SentenceTransformer(path)`.

Re-running with the same `out` skips completed phases (the pipeline resumes). The tokenizer was
trained on the whole stdlib corpus (vocabulary only; no model weights see held-out text).

One module per concern: `demo_config` (sizes, variants, phase names), `demo_data` (1, 2),
`demo_runs` (3), `demo_measure` (4, with `demo_eval`'s scoring), `demo_report` and `demo_charts`
(5); this module runs them in order (`run_demo`) and exports the best variant. Their public names
stay importable from here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bidirlm.integrations.sentence_transformers import export_sentence_transformers
from bidirlm.kernels.dispatch import decide
from bidirlm.recipe.demo_base import SHIPPED_BASE
from bidirlm.recipe.demo_charts import plot_forgetting, plot_results
from bidirlm.recipe.demo_config import (
    BM25,
    EXAMPLE_DOCS,
    EXAMPLE_QUERY,
    MAIN_CODE_SHARE,
    MERGE_RATIOS,
    METRIC,
    REFERENCE,
    SIZES,
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
from bidirlm.recipe.demo_data import (
    build_initial_model,
    build_reference_model,
    pairs_with_hard_negatives,
    prepare_data,
    prepare_pretrained_base,
    subsample,
)
from bidirlm.recipe.demo_eval import bm25_metrics
from bidirlm.recipe.demo_measure import assemble, checks, finetune_protocol, measure
from bidirlm.recipe.demo_report import format_report
from bidirlm.recipe.demo_runs import demo_recipe, lm_data
from bidirlm.recipe.pipeline import parse_recipe, run_pipeline
from bidirlm.runtime import evaluation as ev

__all__ = [  # the demo's public names, from the modules that hold them
    "BM25",
    "EXAMPLE_DOCS",
    "EXAMPLE_QUERY",
    "MAIN_CODE_SHARE",
    "MERGE_RATIOS",
    "METRIC",
    "REFERENCE",
    "SIZES",
    "TASKS",
    "TASK_METRIC",
    "VARIANTS",
    "DemoSize",
    "assemble",
    "base_phase",
    "build_initial_model",
    "build_reference_model",
    "checks",
    "demo_recipe",
    "eval_phase",
    "export_best",
    "finetune_protocol",
    "format_report",
    "lm_data",
    "measure",
    "mix_phase",
    "pairs_with_hard_negatives",
    "phase_of",
    "plot_forgetting",
    "plot_results",
    "prepare_data",
    "prepare_pretrained_base",
    "run_demo",
    "subsample",
    "sweep_phase",
]


def _log(msg: str) -> None:
    print(f"[bidirlm demo] {msg}", file=sys.stderr, flush=True)


def export_best(model_path: Path, out: Path, max_length: int) -> dict[str, Any]:
    """Export a (bidirectional) variant as a sentence-transformers folder, embed with it."""
    from sentence_transformers import SentenceTransformer  # optional dependency ([st] extra)

    # force: the folder is the demo's own export (a re-run replaces it, atomically)
    export_sentence_transformers(model_path, out, pooling="mean", max_length=max_length, force=True)
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    emb = torch.as_tensor(st.encode([EXAMPLE_QUERY, *EXAMPLE_DOCS], normalize_embeddings=True))
    cosines = (emb[1:] @ emb[0]).tolist()
    return {"path": str(out), "shape": list(emb.shape), "cosines": cosines}


def _device(prefer_gpu: bool) -> str:
    return "cuda" if prefer_gpu and torch.cuda.is_available() else "cpu"


def _metrics(m: dict[str, Any], name: str) -> dict[str, Any]:
    return {"name": name, **{key: m[key] for key in (METRIC, "mrr@10", "recall@10")}}


def run_demo(
    out: str | Path,
    size: str | DemoSize = "quick",
    *,
    prefer_gpu: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Run the demo into `out`; return the results (also written to `out/results.json`)."""
    size = SIZES[size] if isinstance(size, str) else size
    shares = size.mix_shares
    if len(set(shares)) != len(shares) or any(
        not 0.0 <= s <= 1.0 or s == MAIN_CODE_SHARE for s in shares
    ):
        raise ValueError(
            f"mix_shares must be distinct code shares in [0, 1] other than the main "
            f"{MAIN_CODE_SHARE:g}, got {shares}"
        )
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = _device(prefer_gpu)
    start = time.perf_counter()
    threads = f" ({torch.get_num_threads()} torch threads)" if device == "cpu" else ""
    log(f"size {size.name}, seed {seed}, on {device}{threads}; outputs in {out}")
    log("1/5 data: stdlib training packages -> JSON Lines; held-out task")
    files = prepare_data(out / "data")
    task = subsample(ev.embedded_task(max_queries=size.eval_queries), size.eval_documents)
    ev.save_task(task, out / "data" / "heldout")
    log(
        f"    {len(task.queries)} held-out queries, {len(task.corpus)} documents from "
        f"{len(task.metadata['heldout_packages'])} held-out packages"
    )
    if size.pretrained:
        log(f"2/5 base: the shipped pre-trained model ({SHIPPED_BASE})")
        base_dir = prepare_pretrained_base(out / "base-pretrained")
        reference_dir = build_reference_model(out / "reference-init")
        log_file = SHIPPED_BASE / "training_log.json"
        info = json.loads(log_file.read_text("utf-8")) if log_file.is_file() else {}
        base_desc = (
            f"the shipped pre-trained causal model ({info.get('parameters', 0) / 1e6:.2f}M "
            f"parameters, {info.get('steps', '?')} steps of {info.get('tokens_per_step', '?')} "
            f"tokens on {info.get('machine', '?')}, `{info.get('command', '?')}`)"
        )
    else:
        log("2/5 initial model: random Qwen3 with the embedded tokenizer (causal phase below)")
        base_dir = reference_dir = build_initial_model(out / "base-init", size)
        base_desc = f"a random width-{size.hidden} model trained {size.causal_steps} causal steps"
    log("3/5 pipeline: MNTP, merges, contrastive x2, data-mix MNTP -> retrieval evaluations")
    recipe = parse_recipe(demo_recipe(out, size, files, device, seed))
    report = run_pipeline(recipe, log=log)
    phases = {p["name"]: p for p in report["phases"]}
    paths = {name: Path(p["output"]) for name, p in phases.items() if p["kind"] != "eval"}
    paths["base"] = base_dir
    results: dict[str, Any] = {"metric": METRIC, "variants": {}, "mrr@10": {}, "recall@10": {}}
    for variant in VARIANTS:
        metrics = phases[eval_phase(variant)]["result"]
        results["variants"][variant] = metrics[METRIC]
        results["mrr@10"][variant] = metrics["mrr@10"]
        results["recall@10"][variant] = metrics["recall@10"]
    results["sweep_retrieval"] = {
        f"merge {r:g}": phases[eval_phase(f"merge {r:g}")]["result"][METRIC] for r in (0.25, 0.75)
    }
    results["mix_retrieval"] = {
        f"code share {s:g}": phases[eval_phase(f"code share {s:g}")]["result"][METRIC]
        for s in size.mix_shares
    }
    t0 = time.perf_counter()
    log(
        "4/5 references (untrained model, BM25); fine-tuning and probes of every variant; "
        "held-out LM loss"
    )
    reference = ev.evaluate(
        reference_dir,
        task,
        bidirectional=True,
        pooling="mean",
        max_length=size.eval_length,
        batch_size=64,
    )
    results["reference"] = _metrics(reference, REFERENCE)
    results["bm25"] = _metrics(bm25_metrics(task), BM25)
    measured = measure(paths, size, log, out, device, seed)
    results["measure_seconds"] = round(time.perf_counter() - t0, 1)
    assemble(results, measured, size)
    best = max(results["variants"], key=results["variants"].get)
    # sentence-transformers exports are bidirectional: export the best bidirectional variant.
    exported = max((v for v in VARIANTS if VARIANTS[v][1]), key=lambda v: results["variants"][v])
    log(f"5/5 export: best bidirectional variant {exported} -> sentence-transformers")
    export = export_best(
        paths[phase_of(exported, size)], out / "best-sentence-transformer", size.eval_length
    )
    export["variant"] = exported
    results.update(
        task=task.name,
        num_queries=len(task.queries),
        num_documents=len(task.corpus),
        size=size.name,
        size_config=dataclasses.asdict(size),
        seed=seed,
        base=base_desc,
        best=best,
        export=export,
        phase_seconds={p["name"]: p["seconds"] for p in report["phases"] if p["kind"] != "eval"},
        seconds=round(time.perf_counter() - start, 1),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        device=torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name(),
        python=platform.python_version(),
        torch=torch.__version__,
        kernels="{0.impl} ({0.reason})".format(decide(device)),
    )
    results["checks"] = checks(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_results(results, out / "results.png")
    plot_forgetting(results, out / "forgetting.png")
    (out / "report.md").write_text(format_report(results), encoding="utf-8")
    log(f"done in {results['seconds']:.0f} s")  # (the command prints where the outputs are)
    return results


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    return f"CPU {name} ({os.cpu_count()} cores)"
