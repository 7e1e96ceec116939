"""The demo's data and starting models: JSON Lines training files from the stdlib's training
packages, the held-out task's subsample, the random initial model, the shipped pre-trained base
(as float32) and its untrained reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from bidirlm.recipe.demo_base import BASE_SHAPE, SHIPPED_BASE
from bidirlm.recipe.demo_config import DemoSize
from bidirlm.runtime import evaluation as ev
from bidirlm.runtime.embedded import embedded_tiny_model, save_random_qwen3


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
    from transformers import AutoTokenizer  # optional dependency ([train] extra)

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
    from transformers import AutoTokenizer  # optional dependency ([train] extra)

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
    tmp = folder.with_name(f".{folder.name}.tmp")
    save_random_qwen3(tmp, tokenizer, **BASE_SHAPE)
    tmp.replace(folder)
    return folder
