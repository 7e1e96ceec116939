"""Embedded fine-tuning tasks: a sequence task and a token task from Python's standard library.

Both need no download, are deterministic for a Python installation and come as records in the
JSON Lines formats of the fine-tuning phases (`bidirlm.runtime.training.task_data`):

- `package_task(split)`: which top-level package a docstring belongs to, records
  `{"text": docstring, "label": package, "id": "module:qualname"}`. The label set is fixed:
  `PACKAGES`, six stdlib packages with many documented modules. The split is by *module inside
  the packages* (not by package as in the retrieval task, so both sides share the label set):
  `split_of` applied to the full dotted module name with its dots replaced by `/` (so the hash
  covers the whole name, not only the top-level package); ~30% of the modules are held out.
  Docstrings are cleaned (`inspect.cleandoc`), their first 600 characters kept, those shorter
  than 30 characters dropped. Chance is the majority class's share (32% on the held-out side on
  Python 3.11: 632 held-out / 918 training docstrings).
- `token_task(split)`: tag every token of a stdlib source line with its Python token class,
  records `{"tokens": [...], "tags": [...]}` with tags from `TOKEN_TAGS` (NAME, keyword, OP,
  NUMBER, STRING, COMMENT) as the `tokenize` module classifies them (keywords are the NAME tokens
  that `keyword.iskeyword` accepts). Lines with 3 to 40 such tokens, without f-strings or
  tokens spanning lines, at most 6 lines per file, 1500 training / 500 held-out lines. Files are
  split by top-level package (`split_of`), as in the retrieval task.

As training sources: `embedded:python-packages:train` / `:heldout` and
`embedded:python-tokens:train` / `:heldout` (`EMBEDDED_TASKS`, resolved by `names.py`). The
records are built once per Python installation and cached under `$BIDIRLM_CACHE` (default
`~/.cache/bidirlm`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import keyword
import platform
import sysconfig
import tokenize
from pathlib import Path
from typing import Any, Literal

from .corpus import _build_atomic, cache_root, stdlib_files
from .heldout import split_of

Split = Literal["train", "heldout"]

PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "xml")
TOKEN_TAGS = ("NAME", "keyword", "OP", "NUMBER", "STRING", "COMMENT")
EMBEDDED_TASKS = {
    "embedded:python-packages:train": ("packages", "train"),
    "embedded:python-packages:heldout": ("packages", "heldout"),
    "embedded:python-tokens:train": ("tokens", "train"),
    "embedded:python-tokens:heldout": ("tokens", "heldout"),
}
_VERSION = 1  # bump when the extraction changes, so stale caches are not reused
_MIN_DOC_CHARS = 30
_MAX_DOC_CHARS = 600
_LINES_PER_FILE = 6
_TOKEN_LINES = {"train": 1500, "heldout": 500}
_KINDS = {
    tokenize.NAME: "NAME",
    tokenize.OP: "OP",
    tokenize.NUMBER: "NUMBER",
    tokenize.STRING: "STRING",
    tokenize.COMMENT: "COMMENT",
}
_SKIPPED = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT}


def _module_split(module: str) -> Split:
    """The side of a module inside a package: `split_of` over the whole dotted name."""
    return split_of(module.replace(".", "/"))


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_records() -> dict[str, list[dict[str, Any]]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for path in stdlib_files():
        module = _module_name(path, root)
        top = module.split(".", 1)[0]
        if top not in PACKAGES:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        nodes: list[tuple[str, ast.AST]] = [(module, tree)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes.append((f"{module}:{node.name}@{node.lineno}", node))
        for ident, node in nodes:
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            text = inspect.cleandoc(doc).strip()[:_MAX_DOC_CHARS]
            if len(text) >= _MIN_DOC_CHARS:
                out[_module_split(module)].append({"text": text, "label": top, "id": ident})
    return out


def _line_tokens(source: str) -> dict[int, list[tuple[str, str]]]:
    """Line number -> [(token, tag)] for lines whose tokens all sit on that one line."""
    lines: dict[int, list[tuple[str, str]]] = {}
    bad: set[int] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in _SKIPPED or tok.type == tokenize.ENDMARKER:
                continue
            row = tok.start[0]
            kind = _KINDS.get(tok.type)
            if kind is None or tok.end[0] != row:  # f-string parts, multi-line strings, ...
                bad.update(range(tok.start[0], tok.end[0] + 1))
                continue
            if kind == "NAME" and keyword.iskeyword(tok.string):
                kind = "keyword"
            lines.setdefault(row, []).append((tok.string, kind))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return {}
    return {row: toks for row, toks in lines.items() if row not in bad}


def _token_records() -> dict[str, list[dict[str, Any]]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for path in stdlib_files():
        side = split_of(_module_name(path, root) or path.stem)
        if len(out[side]) >= _TOKEN_LINES[side]:
            if all(len(out[s]) >= _TOKEN_LINES[s] for s in out):
                break
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rows = [toks for _, toks in sorted(_line_tokens(source).items()) if 3 <= len(toks) <= 40]
        if not rows:
            continue
        stride = max(1, len(rows) // _LINES_PER_FILE)  # spread the kept lines over the file
        for toks in rows[::stride][:_LINES_PER_FILE]:
            if len(out[side]) < _TOKEN_LINES[side]:
                out[side].append({"tokens": [t for t, _ in toks], "tags": [k for _, k in toks]})
    return out


@functools.lru_cache(maxsize=1)
def _all_records() -> dict[str, dict[str, list[dict[str, Any]]]]:
    tag = f"py{platform.python_version()}-v{_VERSION}"
    folder = cache_root() / "tasks" / tag

    def build(tmp: Path) -> None:
        data = {"packages": _package_records(), "tokens": _token_records()}
        (tmp / "tasks.json").write_text(json.dumps(data), encoding="utf-8")

    folder = _build_atomic(folder, build)
    return json.loads((folder / "tasks.json").read_text(encoding="utf-8"))


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def package_task(split: Split = "train") -> list[dict[str, Any]]:
    """Docstring -> top-level package records of one side (labels: `PACKAGES`)."""
    _check_split(split)
    return [dict(r) for r in _all_records()["packages"][split]]


def token_task(split: Split = "train") -> list[dict[str, Any]]:
    """Source line tokens -> Python token class records of one side (tags: `TOKEN_TAGS`)."""
    _check_split(split)
    return [
        {"tokens": list(r["tokens"]), "tags": list(r["tags"])}
        for r in _all_records()["tokens"][split]
    ]
