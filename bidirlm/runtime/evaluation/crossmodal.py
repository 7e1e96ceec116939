"""Cross-modal retrieval of an omnimodal encoder: image->text, text->image, audio->text.

A task is a JSON Lines file of pairs, one per line: `{"image": PATH, "text": CAPTION}` or
`{"audio": PATH, "text": TRANSCRIPT}` (relative paths are relative to the file's folder; both
kinds may mix in one file). Each direction ranks the other side's items of the same kind of pair
by cosine similarity; the relevant item of query i is its own pair. Reported per direction:
recall@1, recall@5, recall@10, nDCG@10, MRR@10 and the counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime.jsonl import JsonLinesError, iter_jsonl
from bidirlm.runtime.models import load_model

from .metrics import rank_by_similarity, retrieval_metrics
from .retrieval import embed

KINDS = ("image", "audio")


def is_crossmodal_task(task: Any) -> bool:
    """True for a .jsonl file whose first record holds an `image` or `audio` key."""
    if not isinstance(task, (str, Path)):
        return False
    path = Path(task)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    try:
        first = next(iter_jsonl(path), None)
    except JsonLinesError:
        return False
    return first is not None and any(k in first[1] for k in KINDS)


def load_pairs(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """{"image": [(path, text)], "audio": [(path, text)]}; ValueError naming the bad line."""
    path = Path(path)
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    for n, record in iter_jsonl(path):
        where = f"{path}:{n}"
        kinds = [k for k in KINDS if k in record]
        if len(kinds) != 1 or not isinstance(record.get("text"), str):
            raise ValueError(f"{where}: expected {{'image' or 'audio': PATH, 'text': CAPTION}}")
        media = Path(record[kinds[0]])
        if not media.is_absolute():
            media = path.parent / media
        out[kinds[0]].append((str(media), record["text"]))
    if not any(out.values()):
        raise ValueError(f"{path}: no image or audio pairs")
    return out


def _direction(queries: torch.Tensor, docs: torch.Tensor, k: int) -> dict[str, float]:
    ids = [str(i) for i in range(docs.shape[0])]
    rankings = rank_by_similarity(queries, docs, ids, top_k=max(k, 10))
    qrels = {str(i): {str(i)} for i in range(queries.shape[0])}
    metrics = retrieval_metrics(dict(zip(qrels, rankings)), qrels, k=k, recall_ks=(1, 5, 10))
    metrics["num_queries"] = int(queries.shape[0])
    metrics["num_documents"] = int(docs.shape[0])
    return metrics


def evaluate_crossmodal(
    model_or_path: Any,
    task: str | Path,
    *,
    pooling: str = "mean",
    batch_size: int = 32,
    max_length: int = 512,
    device: str | torch.device | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """`{"task", "image->text", "text->image", "audio->text"}` (directions with pairs only),
    each a dict of recall@1/5/10, ndcg@10, mrr@10, num_queries, num_documents."""
    pairs = load_pairs(task)
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model = load_model(model_or_path, device=device)
    if not hasattr(model, "embed_items"):
        raise ValueError(
            "cross-modal retrieval needs an omnimodal model (bidirlm compose); this one is "
            "text-only"
        )
    opts = {"batch_size": batch_size, "pooling": pooling, "max_length": max_length}
    out: dict[str, Any] = {"task": str(task)}
    with torch.inference_mode():
        for kind in KINDS:
            if not pairs[kind]:
                continue
            media = embed(model, [Path(p) for p, _ in pairs[kind]], **opts)  # paths, never text
            texts = embed(model, [t for _, t in pairs[kind]], **opts)
            out[f"{kind}->text"] = _direction(media, texts, k)
            if kind == "image":
                out["text->image"] = _direction(texts, media, k)
    return out
