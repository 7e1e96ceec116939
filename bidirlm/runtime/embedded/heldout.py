"""The held-out split of the standard library and the embedded retrieval task.

The embedded task (`embedded_task()`) is built from the Python standard library's own sources,
parsed with `ast` (nothing is imported or downloaded): for every module, class and function
docstring whose first paragraph is a summary of >= 4 words followed by a body of >= 40
characters, the summary is a query and the body its one relevant document. Modules are split
into train and held-out by a stable hash of their top-level package name (`split_of`), so a
package and all its submodules fall on the same side; the task uses held-out packages only, and
`stdlib_pairs("train")` / `stdlib_texts("train")` give training data drawn only from the others.
The task depends on the Python version's stdlib (its name records the version).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from bidirlm.runtime.retrieval_task import RetrievalTask

Split = Literal["train", "heldout"]

HELDOUT_FRACTION = 0.3  # share of top-level stdlib packages held out (by hash, see split_of)
_SPLIT_SALT = "bidirlm-heldout-v1:"
# Folders of the stdlib that are not library code (tests, vendored packages, caches).
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_MIN_SUMMARY_WORDS = 4
_MIN_BODY_CHARS = 40


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
