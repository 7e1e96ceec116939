"""Retrieval tasks: user data in JSON Lines, `load_task`, `save_task` (`RetrievalTask` itself
lives in `bidirlm.runtime.retrieval_task`, below `embedded/` and `evaluation/`).

User data (`load_retrieval_jsonl`): either one ``.jsonl`` file of pairs, one object per line,
``{"query": str, "positive": str | [str, ...], "negatives": [str, ...]}`` (corpus = every
positive and negative, deduplicated by text), or a folder in the BEIR layout: ``queries.jsonl``
(``{"_id", "text"}``), ``corpus.jsonl`` (``{"_id", "text", "title"?}``; the title, when present,
is prepended) and ``qrels.jsonl`` (``{"query-id", "corpus-id", "score"}``) or ``qrels/test.tsv``.
`load_task("embedded")` is the embedded held-out task (`bidirlm.runtime.embedded.embedded_task`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bidirlm.runtime.embedded.heldout import embedded_task
from bidirlm.runtime.jsonl import iter_jsonl
from bidirlm.runtime.retrieval_task import RetrievalTask

__all__ = ["RetrievalTask", "load_retrieval_jsonl", "load_task", "save_task"]


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

    for lineno, record in iter_jsonl(path):
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
        for n, r in iter_jsonl(files["queries.jsonl"])
    }
    corpus: dict[str, str] = {}
    for n, r in iter_jsonl(files["corpus.jsonl"]):
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
        for n, r in iter_jsonl(jsonl):
            where = f"{jsonl}:{n}"
            score = r.get("score", 1)
            if not isinstance(score, (int, float)):
                raise ValueError(f"{where}: field 'score' must be a number")
            yield _id(r, where, "query-id", "query_id"), _id(r, where, "corpus-id", "doc_id"), score
        return
    if not tsv.is_file():
        raise FileNotFoundError(f"retrieval set {folder}: missing qrels.jsonl (or qrels/test.tsv)")
    with tsv.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{tsv}:{n}: not UTF-8 text ({exc.reason})") from None
            cols = line.rstrip("\r\n").split("\t")
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
