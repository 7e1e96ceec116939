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
    pretrained: bool  # start from the shipped pre-trained base (else: random + causal_steps)
    hidden: int  # the random base's shape (unused when pretrained)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    causal_steps: int  # (unused when pretrained)
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
    temperature: float  # InfoNCE temperature of the contrastive phase
    probe: tuple[int, int, int, int]  # sequence train/test docstrings, token train/test lines
    lm_texts: int  # held-out docs and code texts for the forgetting loss (each)
    # The fine-tuning protocol of every variant: sequence steps, token steps, seeds (averaged)
    finetune: tuple[int, int, int] = (60, 60, 3)
    # Fine-tuning data: sequence train/test docstrings, token train/test lines (None: all)
    finetune_data: tuple[int | None, int | None, int | None, int | None] = (None,) * 4
    # The data-mix sweep: shares of code (vs docs) in extra MNTP runs (the main one has 0.5)
    mix_shares: tuple[float, ...] = (0.0, 0.2, 1.0)


SIZES: dict[str, DemoSize] = {
    # CI: the whole chain on a 2-core CPU in well under a minute; numbers are noise at this size.
    "tiny": DemoSize("tiny", False, 32, 1, 2, 1, 16, 64, 6, 3, 3, 1024, 128, 8, 24, 64, 40, 120,
                     32, 3e-3, 1e-3, 1e-3, 0.05, (24, 24, 16, 16), 4, (3, 3, 1),
                     (32, 32, 16, 16), (0.0,)),
    # `make demo`: the shipped pre-trained base, under 15 minutes on a (shared) 2-core CPU.
    # Contrastive lr on a 450-step base (120 steps x 16 pairs, held-out nDCG@10): 1e-4 0.070,
    # 3e-4 0.089, 6e-4 0.099, 2e-3 0.033 (too high: it also wipes out the token task).
    # 240 contrastive steps: 120 gave Bi+Contrastive 0.156 / Bi+MNTP+Contrastive 0.149 nDCG@10,
    # 240 gave 0.162 / 0.168 (seed 0). Fine-tuning 8 models x 2 tasks x 3 seeds took 329 s of
    # a 605 s demo (12:50 with the fresh-clone set-up): 2 seeds keep `make demo` near 12 minutes.
    # Token steps 60, not 40: at 40, 2 of 48 runs left a rare class unlearned (macro-F1 0.90 /
    # 0.96 vs 0.99); 60 steps gave 0.990-0.997 on the same checkpoints and seeds.
    "quick": DemoSize("quick", True, 0, 0, 0, 0, 0, 0, 0, 80, 240, 2048, 128, 16, 24, 64,
                      None, None, 64, 0.0, 5e-4, 6e-4, 0.05, (240, 240, 300, 200), 32,
                      (60, 60, 2)),
    # The default: the same base with a larger budget, meant for a GPU (runs anywhere, slowly).
    "full": DemoSize("full", True, 0, 0, 0, 0, 0, 0, 0, 600, 600, 8192, 256, 128, 32, 128,
                     None, None, 128, 0.0, 5e-4, 3e-4, 0.05, (918, 632, 1500, 500), 128),
}  # fmt: skip

# Variant name (as in the paper's Figure 2) -> (pipeline phase whose model it is, bidirectional).
# "causal" is the base: the shipped pre-trained model (recipe.base) or, for `tiny`, the causal
# phase trained here (`base_phase`).
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
BM25 = "BM25 (lexical)"
# The merge-ratio sweep: share of Bi+MNTP in a linear merge with the base (0 = the base).
MERGE_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASKS = ("retrieval", "sequence", "token")
# Primary score of each task: retrieval nDCG@10, the fine-tuned held-out macro-F1.
TASK_METRIC = {"retrieval": "ndcg@10", "sequence": "macro_f1", "token": "macro_f1"}

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


def prepare_pretrained_base(folder: Path) -> Path:
    """The shipped pre-trained base (bfloat16 on disk) as a float32 folder, written once."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    from safetensors.torch import load_file, save_file

    from bidirlm.recipe.demo_base import SHIPPED_BASE

    if not (SHIPPED_BASE / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the shipped demo base is missing ({SHIPPED_BASE}); make it with "
            "`bidirlm demo --pretrain-base --output " + str(SHIPPED_BASE) + "`"
        )
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in SHIPPED_BASE.iterdir():
        if item.name == "model.safetensors":
            state = {k: v.float().contiguous() for k, v in load_file(str(item)).items()}
            save_file(state, str(tmp / item.name), metadata={"format": "pt"})
        elif item.name == "config.json":
            config = json.loads(item.read_text(encoding="utf-8"))
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = "float32"
            (tmp / item.name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        elif item.is_file():
            shutil.copy2(item, tmp / item.name)
    tmp.replace(folder)
    return folder


def build_reference_model(folder: Path) -> Path:
    """The untrained reference of the shipped base: its shape, random init (seed 0)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    from bidirlm.recipe.demo_base import BASE_SHAPE
    from bidirlm.runtime.embedded import embedded_tiny_model, save_random_qwen3

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
    tmp = folder.with_name(f".{folder.name}.tmp")
    save_random_qwen3(tmp, tokenizer, **BASE_SHAPE)
    tmp.replace(folder)
    return folder


# ------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------


def base_phase(size: DemoSize) -> str:
    """The pipeline name of the base model: the recipe's @base when pre-trained, else "causal"."""
    return "base" if size.pretrained else "causal"


def phase_of(variant: str, size: DemoSize) -> str:
    phase = VARIANTS[variant][0]
    return base_phase(size) if phase == "causal" else phase


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


def sweep_phase(ratio: float) -> str:
    """The phase holding the merge with `ratio` of Bi+MNTP: "merge_25" (0.5 is "merge")."""
    return "merge" if ratio == 0.5 else f"merge_{round(ratio * 100):02d}"


def mix_phase(share: float) -> str:
    """The MNTP phase of the data-mix sweep with `share` of code: "mntp_code_20"."""
    return f"mntp_code_{round(share * 100):02d}"


MAIN_CODE_SHARE = 0.5  # the share of code (vs docs) in the main MNTP and causal data


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


# ------------------------------------------------------------------------------------------
# Measurements beside retrieval
# ------------------------------------------------------------------------------------------


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def finetune_protocol(size: DemoSize) -> Any:
    """The demo size's fine-tuning protocol (`demo_eval.FinetuneProtocol`)."""
    from bidirlm.recipe.demo_eval import FinetuneProtocol

    seq_steps, tok_steps, seeds = size.finetune
    return FinetuneProtocol(
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
    from bidirlm.recipe import demo_eval as de

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


# ------------------------------------------------------------------------------------------
# Results: JSON, Markdown, charts, export
# ------------------------------------------------------------------------------------------


def plot_results(results: dict[str, Any], path: Path) -> None:
    """The paper's Figure 2 in miniature: each variant's change relative to Base per task, and
    absolute retrieval with the BM25 and untrained-reference lines."""
    import matplotlib

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
    import matplotlib

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
        empty = " | | | | | |"
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
    import torch

    from bidirlm.kernels.dispatch import decide
    from bidirlm.recipe.demo_eval import bm25_metrics
    from bidirlm.recipe.pipeline import parse_recipe, run_pipeline

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
        from bidirlm.recipe.demo_base import SHIPPED_BASE

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
    log(f"done in {results['seconds']:.0f} s: {out / 'results.json'}, report.md, results.png")
    return results


def _cpu_name() -> str:
    import os

    name = platform.processor() or platform.machine()
    return f"CPU {name} ({os.cpu_count()} cores)"
