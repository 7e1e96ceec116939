"""Embedded corpora: training text available offline on every machine.

Python's own standard library is text every machine has: `pydoc` topics and docstrings (English
prose about code) and the stdlib sources (code). They feed the examples, the demo and the tests,
since nothing may be downloaded.

- `python_docs_texts()`: the pydoc topics, then every module/class/function docstring of the
  stdlib sources (headed by its qualified name), in sorted file order.
- `python_code_texts()`: the stdlib `.py` sources, one document per file, in sorted path order.
- `python_pairs()`: contrastive pairs from docstrings: query = the summary line, positive = the
  rest of the docstring, one hard negative = the rest of the next docstring of the same module.

Orders are deterministic for a given Python installation (files and keys are sorted). Docstrings
are extracted with `ast` (nothing is imported: some stdlib modules act on import), which takes
seconds, so the extraction is built once and cached under `$BIDIRLM_CACHE`
(default `~/.cache/bidirlm`). Creation is atomic (temporary folder + rename): concurrent builders
are safe, the first rename wins and the others reuse it.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import platform
import pydoc_data.topics
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

# Folders of the stdlib that are tests, demos, tools or vendored packages, not library code.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "__phello__",
    }
)
# Bump when the extraction changes, so stale caches are not reused.
_CORPUS_VERSION = 1


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else `$BIDIRLM_CACHE`, else `~/.cache/bidirlm`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BIDIRLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bidirlm"


def _build_atomic(final: Path, build: Callable[[Path], None]) -> Path:
    """Create `final` (a folder) by running `build(tmp)` then renaming; safe under concurrency."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (the target exists and is not empty).
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def stdlib_files() -> list[Path]:
    """The stdlib `.py` files that count as library code, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")
        )
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, docstring) for the module and its classes/functions, in source order."""
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    out.append((name, doc))
                visit(child, name)

    doc = ast.get_docstring(tree)
    if doc:
        out.append((module, doc))
    visit(tree, module)
    return out


def _extract_corpus() -> dict[str, list]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    pairs: list[dict] = []
    for path in stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        try:
            tree = ast.parse(_read(path))
        except (SyntaxError, ValueError):
            continue
        entries = _docstrings(tree, module)
        docs.extend(f"{name}\n\n{doc}" for name, doc in entries)
        pairs.extend(_pairs_of_module(entries))
    return {"docs": docs, "pairs": pairs}


def _pairs_of_module(entries: list[tuple[str, str]]) -> list[dict]:
    """Summary line -> rest of the docstring, with the next entry's rest as hard negative."""
    split = []
    for _, doc in entries:
        head, _, rest = doc.strip().partition("\n\n")
        summary = " ".join(head.split())
        rest = rest.strip()
        if 10 <= len(summary) <= 200 and len(rest) >= 40:
            split.append((summary, rest))
    if len(split) < 2:
        return []
    return [
        {"query": q, "positive": p, "negatives": [split[(i + 1) % len(split)][1]]}
        for i, (q, p) in enumerate(split)
    ]


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, list]:
    tag = f"py{platform.python_version()}-v{_CORPUS_VERSION}"
    folder = cache_root() / "corpus" / tag

    def build(tmp: Path) -> None:
        (tmp / "corpus.json").write_text(json.dumps(_extract_corpus()), encoding="utf-8")

    folder = _build_atomic(folder, build)
    return json.loads((folder / "corpus.json").read_text(encoding="utf-8"))


def python_docs_texts() -> list[str]:
    """pydoc topics and stdlib docstrings (prose), deterministic order. Cached on disk."""
    return list(_corpus()["docs"])


@functools.lru_cache(maxsize=1)
def _code() -> tuple[str, ...]:
    return tuple(text for text in (_read(p) for p in stdlib_files()) if text.strip())


def python_code_texts() -> list[str]:
    """stdlib sources, one text per file, sorted by path."""
    return list(_code())


def python_pairs() -> list[dict]:
    """Contrastive pairs `{"query", "positive", "negatives": [one]}` from stdlib docstrings."""
    return [dict(p, negatives=list(p["negatives"])) for p in _corpus()["pairs"]]
