"""The one resolver of `embedded:` names (offline models, corpora and tasks built here).

| name                                       | kind     | what                                   |
|--------------------------------------------|----------|----------------------------------------|
| `embedded:tiny`                            | model    | the tiny Qwen3 folder (`tiny.py`)      |
| `embedded:python-docs`, `-code`            | source   | `{"text": ...}` records (`corpus.py`)  |
| `embedded:python-pairs`                    | source   | contrastive pairs (`corpus.py`)        |
| `embedded:python-packages:train/heldout`   | task     | sequence-classification records        |
| `embedded:python-tokens:train/heldout`     | task     | token-classification records           |

Config paths that name one are never resolved against a folder (`is_embedded`); an unknown name
of a kind is a ValueError listing that kind's names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .corpus import python_code_texts, python_docs_texts, python_pairs
from .tasks import EMBEDDED_TASKS, package_task, token_task
from .tiny import embedded_tiny_model

PREFIX = "embedded:"

EMBEDDED_SOURCES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "embedded:python-docs": lambda: [{"text": t} for t in python_docs_texts()],
    "embedded:python-code": lambda: [{"text": t} for t in python_code_texts()],
    "embedded:python-pairs": python_pairs,
}


def _task(name: str) -> Callable[[], list[dict[str, Any]]]:
    kind, split = EMBEDDED_TASKS[name]
    return (lambda: package_task(split)) if kind == "packages" else (lambda: token_task(split))


EMBEDDED_NAMES: dict[str, dict[str, Callable[[], Any]]] = {
    "model": {"embedded:tiny": embedded_tiny_model},
    "source": dict(EMBEDDED_SOURCES),
    "task": {name: _task(name) for name in EMBEDDED_TASKS},
}


def is_embedded(name: str | Path) -> bool:
    """True for a name of the `embedded:` namespace (known or not)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def resolve_embedded(name: str, kind: str) -> Any:
    """Build (or read from the cache) what the embedded `name` of `kind` ("model": a folder
    Path; "source" / "task": a list of record dicts)."""
    table = EMBEDDED_NAMES[kind]
    if name not in table:
        raise ValueError(f"unknown embedded {kind} {name!r}; choose one of {', '.join(table)}")
    return table[name]()


def resolve_model_path(name: str | Path) -> Path:
    """`embedded:tiny` -> its cached folder (built on first use); any other name -> a Path."""
    if is_embedded(name):
        return resolve_embedded(str(name), "model")
    return Path(name).expanduser()
