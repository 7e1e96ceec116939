"""Retrieval evaluation: exact metrics, the embedded held-out task, user JSON Lines sets.

Metrics (binary relevance: a document is relevant to a query iff the qrels list it with a
score > 0). For a query with relevant set R and a ranking d_1, d_2, ... of the whole corpus:

- ``nDCG@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{i<=k, d_i in R} 1 / log2(i + 1)`` and the ideal
  ``IDCG@k = sum_{i <= min(k, |R|)} 1 / log2(i + 1)`` (the ideal ranking puts all of R first).
- ``MRR@k = 1 / rank`` of the first relevant document when that rank is <= k, else 0.
- ``recall@k = |R ∩ {d_1..d_k}| / |R|``.

Each metric is averaged over the queries that have at least one relevant document (queries
without one are dropped, as pytrec_eval does). Rankings sort by cosine similarity, highest
first; ties keep corpus order (a stable sort), so results are deterministic.

The embedded task (`embedded_task()`) is built from the Python standard library's own sources,
parsed with `ast` (nothing is imported or downloaded): for every module, class and function
docstring whose first paragraph is a summary of >= 4 words followed by a body of >= 40
characters, the summary is a query and the body its one relevant document. Modules are split
into train and held-out by a stable hash of their top-level package name (`split_of`), so a
package and all its submodules fall on the same side; the task uses held-out packages only, and
`stdlib_pairs("train")` / `stdlib_texts("train")` give training data drawn only from the others.
The task depends on the Python version's stdlib (its name records the version).

User data (`load_retrieval_jsonl`): either one ``.jsonl`` file of pairs, one object per line,
``{"query": str, "positive": str | [str, ...], "negatives": [str, ...]}`` (corpus = every
positive and negative, deduplicated by text), or a folder in the BEIR layout: ``queries.jsonl``
(``{"_id", "text"}``), ``corpus.jsonl`` (``{"_id", "text", "title"?}``; the title, when present,
is prepended) and ``qrels.jsonl`` (``{"query-id", "corpus-id", "score"}``) or ``qrels/test.tsv``.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
import os
import sys
import sysconfig
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

Split = Literal["train", "heldout"]

HELDOUT_FRACTION = 0.3  # share of top-level stdlib packages held out (by hash, see split_of)
_SPLIT_SALT = "bidirlm-heldout-v1:"
# Folders of the stdlib that are not library code (tests, vendored packages, caches).
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_MIN_SUMMARY_WORDS = 4
_MIN_BODY_CHARS = 40


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def ndcg_at_k(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """nDCG@k of one ranking with binary relevance (ideal DCG from min(k, |relevant|))."""
    _check_k(k)
    if not relevant:
        raise ValueError("nDCG is undefined for a query without relevant documents")
    dcg = sum(1.0 / math.log2(i + 2) for i, doc in enumerate(ranking[:k]) if doc in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def mrr_at_k(ranking: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document within the top k (0 if none)."""
    _check_k(k)
    for i, doc in enumerate(ranking[:k]):
        if doc in relevant:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranking: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Fraction of the relevant documents found in the top k."""
    _check_k(k)
    if not relevant:
        raise ValueError("recall is undefined for a query without relevant documents")
    return len(set(ranking[:k]) & set(relevant)) / len(relevant)


def retrieval_metrics(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Collection[str]],
    *,
    k: int = 10,
    recall_ks: Sequence[int] = (1, 10, 100),
) -> dict[str, float]:
    """Mean nDCG@k, MRR@k and recall@each of `recall_ks` over queries with relevant documents.

    `rankings[q]` is query q's ranked document ids (best first, at least max(k, recall_ks) long
    when the corpus allows); `qrels[q]` its relevant ids. A query in qrels without a ranking is
    an error (it would silently inflate the score if skipped).
    """
    judged = [q for q, rel in qrels.items() if rel]
    if not judged:
        raise ValueError("no query has a relevant document: nothing to evaluate")
    missing = [q for q in judged if q not in rankings]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no ranking (e.g. {missing[0]!r})")
    out = {
        f"ndcg@{k}": sum(ndcg_at_k(rankings[q], qrels[q], k) for q in judged) / len(judged),
        f"mrr@{k}": sum(mrr_at_k(rankings[q], qrels[q], k) for q in judged) / len(judged),
    }
    for r in recall_ks:
        out[f"recall@{r}"] = sum(recall_at_k(rankings[q], qrels[q], r) for q in judged) / len(
            judged
        )
    return out


def rank_by_similarity(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_ids: Sequence[str],
    *,
    top_k: int = 100,
    chunk: int = 256,
) -> list[list[str]]:
    """Rank documents for each query by cosine similarity (ties keep corpus order).

    `query_emb [Q, d]`, `doc_emb [D, d]`; returns Q lists of at most `top_k` document ids.
    """
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(
            f"embeddings must be [Q, d] and [D, d], got {tuple(query_emb.shape)} and "
            f"{tuple(doc_emb.shape)}"
        )
    if doc_emb.shape[0] != len(doc_ids):
        raise ValueError(f"{doc_emb.shape[0]} document embeddings but {len(doc_ids)} ids")
    q = torch.nn.functional.normalize(query_emb.float(), dim=-1)
    d = torch.nn.functional.normalize(doc_emb.float(), dim=-1)
    top_k = min(top_k, d.shape[0])
    out: list[list[str]] = []
    for start in range(0, q.shape[0], chunk):
        scores = q[start : start + chunk] @ d.T
        # A stable sort (not topk) so equal scores rank in corpus order on every platform.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
        out.extend([doc_ids[j] for j in row] for row in order.tolist())
    return out


# ------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------


@dataclass
class RetrievalTask:
    """Queries, a corpus and binary relevance judgments (`qrels[query_id]` = relevant doc ids)."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, set[str]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.queries or not self.corpus:
            raise ValueError(f"task {self.name!r}: queries and corpus must not be empty")
        for qid, docs in self.qrels.items():
            if qid not in self.queries:
                raise ValueError(f"task {self.name!r}: qrels name unknown query {qid!r}")
            unknown = [d for d in docs if d not in self.corpus]
            if unknown:
                raise ValueError(
                    f"task {self.name!r}: qrels of query {qid!r} name unknown document "
                    f"{unknown[0]!r}"
                )
        if not any(self.qrels.values()):
            raise ValueError(f"task {self.name!r}: no query has a relevant document")


def _stable_unit(text: str) -> float:
    """A number in [0, 1) from sha256, identical on every platform and Python version."""
    return int(hashlib.sha256((_SPLIT_SALT + text).encode()).hexdigest()[:12], 16) / 16**12


def split_of(module: str) -> Split:
    """Which side a stdlib module falls on: decided by its top-level package name."""
    top = module.split(".", 1)[0]
    return "heldout" if _stable_unit(top) < HELDOUT_FRACTION else "train"


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every stdlib .py file, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            parts = [*rel] if stem == "__init__" else [*rel, stem]
            if parts and all(p.isidentifier() for p in parts):
                yield ".".join(parts), Path(dirpath) / name


@dataclass(frozen=True)
class _Doc:
    module: str
    qualname: str
    summary: str
    body: str


@lru_cache(maxsize=1)
def _stdlib_docs() -> tuple[tuple[_Doc, ...], tuple[tuple[str, str], ...]]:
    """All docstring (summary, body) records and (module, source) pairs of the stdlib."""
    docs: list[_Doc] = []
    sources: list[tuple[str, str]] = []
    for module, path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a few stdlib files are templates or deliberately invalid
        sources.append((module, source))
        for node, qualname in _walk_documented(tree, ""):
            text = ast.get_docstring(node, clean=False)
            if not text:
                continue
            summary, _, body = inspect.cleandoc(text).partition("\n\n")
            summary, body = " ".join(summary.split()), body.strip()
            if len(summary.split()) >= _MIN_SUMMARY_WORDS and len(body) >= _MIN_BODY_CHARS:
                docs.append(_Doc(module, qualname or module, summary, body))
    return tuple(docs), tuple(sources)


def _walk_documented(node: ast.AST, prefix: str) -> Iterator[tuple[ast.AST, str]]:
    """The module node and every class/function inside it, with dotted qualified names."""
    if isinstance(node, ast.Module):
        yield node, prefix
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}.{child.name}" if prefix else child.name
            yield child, name
            yield from _walk_documented(child, name)


def _unique_pairs(split: Split) -> list[_Doc]:
    """Docstring records on one side of the split, without ambiguous duplicates.

    A summary or a body that occurs more than once anywhere in the stdlib (e.g. inherited
    boilerplate such as "Return self==value.") is dropped, so every query has exactly one
    relevant document and no train text reappears verbatim in the held-out task.
    """
    docs, _ = _stdlib_docs()
    summaries: dict[str, int] = {}
    bodies: dict[str, int] = {}
    for d in docs:
        summaries[d.summary] = summaries.get(d.summary, 0) + 1
        bodies[d.body] = bodies.get(d.body, 0) + 1
    return [
        d
        for d in docs
        if split_of(d.module) == split and summaries[d.summary] == 1 and bodies[d.body] == 1
    ]


def _with_ids(docs: Sequence[_Doc]) -> list[tuple[str, _Doc]]:
    """Ids "module:qualname", made unique with "#n" (a name can be defined twice in a module)."""
    seen: dict[str, int] = {}
    out = []
    for d in docs:
        base = f"{d.module}:{d.qualname}"
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base}#{seen[base]}", d))
    return out


def stdlib_pairs(split: Split = "train") -> list[dict[str, str]]:
    """(query, positive) pairs from the stdlib docstrings of one side of the split.

    Records are ``{"query": summary, "positive": body, "id": "module:qualname"}``, the JSON
    Lines format of the contrastive training phase.
    """
    return [
        {"query": d.summary, "positive": d.body, "id": i}
        for i, d in _with_ids(_unique_pairs(split))
    ]


def stdlib_texts(split: Split = "train", kind: Literal["docs", "code"] = "docs") -> list[str]:
    """Pretraining texts from one side of the split: full docstrings ("docs") or sources."""
    docs, sources = _stdlib_docs()
    if kind == "code":
        return [src for module, src in sources if split_of(module) == split]
    if kind == "docs":
        return [f"{d.summary}\n\n{d.body}" for d in docs if split_of(d.module) == split]
    raise ValueError(f"kind must be 'docs' or 'code', got {kind!r}")


def embedded_task(max_queries: int | None = None) -> RetrievalTask:
    """The held-out retrieval task: docstring summary -> docstring body of held-out packages.

    The corpus holds every held-out body (596 on Python 3.11); `max_queries` keeps a
    deterministic subset of the queries (by hash of their id), the other bodies staying in the
    corpus as distractors. None keeps all queries.
    """
    docs = _unique_pairs("heldout")
    records = _with_ids(docs)
    corpus = {i: d.body for i, d in records}
    ids = sorted(corpus, key=_stable_unit)
    if max_queries is not None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
        ids = ids[:max_queries]
    by_id = {i: d.summary for i, d in records}
    queries = {i: by_id[i] for i in sorted(ids)}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return RetrievalTask(
        name=f"embedded:python{version}-docstrings",
        queries=queries,
        corpus=corpus,
        qrels={i: {i} for i in queries},
        metadata={
            "python": version,
            "heldout_fraction": HELDOUT_FRACTION,
            "heldout_packages": sorted({d.module.split(".")[0] for d in docs}),
        },
    )


# ------------------------------------------------------------------------------------------
# User data: JSON Lines
# ------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, record


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return value


def _id(record: dict[str, Any], where: str, *keys: str) -> str:
    for key in keys:
        if key in record and isinstance(record[key], (str, int)):
            return str(record[key])
    raise ValueError(f"{where}: missing id field ({' or '.join(repr(k) for k in keys)})")


def _load_pairs(path: Path) -> RetrievalTask:
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    doc_id_of: dict[str, str] = {}
    qrels: dict[str, set[str]] = {}

    def doc(text: str) -> str:
        if text not in doc_id_of:
            doc_id_of[text] = f"d{len(doc_id_of)}"
            corpus[doc_id_of[text]] = text
        return doc_id_of[text]

    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        query = _text(record, "query", where)
        positives = record.get("positive", record.get("positives"))
        if isinstance(positives, str):
            positives = [positives]
        if not isinstance(positives, list) or not positives:
            raise ValueError(f"{where}: field 'positive' must be a string or a non-empty list")
        negatives = record.get("negatives", [])
        if not isinstance(negatives, list):
            raise ValueError(f"{where}: field 'negatives' must be a list of strings")
        for text in [*positives, *negatives]:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: positives and negatives must be non-empty strings")
        qid = str(record.get("id", f"q{lineno}"))
        if qid in queries:
            raise ValueError(f"{where}: duplicate query id {qid!r}")
        queries[qid] = query
        qrels[qid] = {doc(t) for t in positives}
        for t in negatives:
            doc(t)
    if not queries:
        raise ValueError(f"{path}: no records")
    return RetrievalTask(name=path.stem, queries=queries, corpus=corpus, qrels=qrels)


def _load_beir(folder: Path) -> RetrievalTask:
    files = {name: folder / name for name in ("queries.jsonl", "corpus.jsonl")}
    for name, p in files.items():
        if not p.is_file():
            raise FileNotFoundError(f"retrieval set {folder}: missing {name}")
    queries = {
        _id(r, f"{files['queries.jsonl']}:{n}", "_id", "id"): _text(
            r, "text", f"{files['queries.jsonl']}:{n}"
        )
        for n, r in _read_jsonl(files["queries.jsonl"])
    }
    corpus: dict[str, str] = {}
    for n, r in _read_jsonl(files["corpus.jsonl"]):
        where = f"{files['corpus.jsonl']}:{n}"
        text = _text(r, "text", where)
        title = r.get("title")
        corpus[_id(r, where, "_id", "id")] = f"{title}\n{text}" if title else text
    qrels: dict[str, set[str]] = {}
    for qid, did, score in _read_qrels(folder):
        if score > 0:
            qrels.setdefault(qid, set()).add(did)
    return RetrievalTask(name=folder.name, queries=queries, corpus=corpus, qrels=qrels)


def _read_qrels(folder: Path) -> Iterator[tuple[str, str, float]]:
    jsonl, tsv = folder / "qrels.jsonl", folder / "qrels" / "test.tsv"
    if jsonl.is_file():
        for n, r in _read_jsonl(jsonl):
            where = f"{jsonl}:{n}"
            score = r.get("score", 1)
            if not isinstance(score, (int, float)):
                raise ValueError(f"{where}: field 'score' must be a number")
            yield _id(r, where, "query-id", "query_id"), _id(r, where, "corpus-id", "doc_id"), score
        return
    if not tsv.is_file():
        raise FileNotFoundError(f"retrieval set {folder}: missing qrels.jsonl (or qrels/test.tsv)")
    with tsv.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            cols = line.rstrip("\n").split("\t")
            if n == 1 and cols[0] == "query-id":
                continue  # BEIR header
            if len(cols) != 3:
                raise ValueError(f"{tsv}:{n}: expected query-id, corpus-id, score")
            try:
                yield cols[0], cols[1], float(cols[2])
            except ValueError:
                raise ValueError(f"{tsv}:{n}: score {cols[2]!r} is not a number") from None


def load_retrieval_jsonl(path: str | Path) -> RetrievalTask:
    """Load a user's retrieval set: a pairs ``.jsonl`` file or a BEIR-style folder (see top)."""
    path = Path(path)
    if path.is_dir():
        return _load_beir(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval set {path} does not exist")
    return _load_pairs(path)


def save_task(task: RetrievalTask, folder: str | Path) -> Path:
    """Write a task as a BEIR-style folder that `load_retrieval_jsonl` reads back unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "queries.jsonl": [{"_id": q, "text": t} for q, t in task.queries.items()],
        "corpus.jsonl": [{"_id": d, "text": t} for d, t in task.corpus.items()],
        "qrels.jsonl": [
            {"query-id": q, "corpus-id": d, "score": 1}
            for q, docs in task.qrels.items()
            for d in sorted(docs)
        ],
    }
    for name, records in files.items():
        with (folder / name).open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return folder


def load_task(task: str | Path | RetrievalTask) -> RetrievalTask:
    """`"embedded"` (the held-out stdlib task), a path to a user set, or a task as is."""
    if isinstance(task, RetrievalTask):
        return task
    if str(task) == "embedded":
        return embedded_task()
    return load_retrieval_jsonl(task)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def embed(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    pooling: str = "mean",
    max_length: int = 512,
) -> torch.Tensor:
    """L2-normalized float32 embeddings `[len(texts), d]` from an `Encoder`."""
    out = model.encode(
        list(texts), batch_size=batch_size, pooling=pooling, normalize=True, max_length=max_length
    )
    return torch.as_tensor(out).float().cpu()


def evaluate(
    model_or_path: Any,
    task: str | Path | RetrievalTask = "embedded",
    *,
    pooling: str = "mean",
    batch_size: int = 32,
    max_length: int = 512,
    query_prefix: str = "",
    bidirectional: bool = True,
    device: str | torch.device | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """Evaluate an `Encoder` (or a checkpoint folder) on a retrieval task.

    Returns ``{"task", "ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100",
    "num_queries", "num_documents"}`` (k sets the cut-off of nDCG and MRR). A path is loaded
    with `load_model(path, bidirectional=..., device=...)`; `query_prefix` is prepended to every
    query (an instruction, as in the contrastive phase).
    """
    retrieval = load_task(task)
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        from bidirlm.runtime import load_model

        model = load_model(model_or_path, bidirectional=bidirectional, device=device)
    doc_ids = list(retrieval.corpus)
    query_ids = [q for q, rel in retrieval.qrels.items() if rel]
    opts = {"batch_size": batch_size, "pooling": pooling, "max_length": max_length}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            docs = embed(model, [retrieval.corpus[d] for d in doc_ids], **opts)
            queries = embed(model, [query_prefix + retrieval.queries[q] for q in query_ids], **opts)
    finally:
        if was_training:
            model.train()
    ranked = rank_by_similarity(queries, docs, doc_ids, top_k=max(100, k))
    metrics = retrieval_metrics(dict(zip(query_ids, ranked)), retrieval.qrels, k=k)
    return {
        "task": retrieval.name,
        **metrics,
        "num_queries": len(query_ids),
        "num_documents": len(doc_ids),
    }
