"""Lean runtime, one subpackage per concern: `models` (Qwen3/Gemma3 encoders, checkpoint I/O),
`training` (loop, configs, data, checkpoints), `merging` (streaming checkpoint merges),
`evaluation` (retrieval metrics and tasks) and `embedded` (offline corpora and the tiny model).
Single modules below them all, shared across folders: `outputs` (atomic outputs, locks),
`safetensors_io` (the safetensors header reader), `retrieval_task` (`RetrievalTask`) and `jsonl`
(the JSON Lines reader). Imports point down only: evaluation -> training, merging -> models,
embedded -> those single modules (tests/test_imports.py checks it).

Names resolve lazily (PEP 562): importing `bidirlm.runtime` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# `merge` is imported eagerly: the function shares its name with the module
# `bidirlm.runtime.merging.merge`. merging imports only torch and the stdlib, so this stays cheap.
from .merging import merge as merge

_EXPORTS = {
    "load_model": "models",
    "Encoder": "models",
    "compose_omni": "merging.compose",
}

__all__ = sorted([*_EXPORTS, "merge"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bidirlm.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
