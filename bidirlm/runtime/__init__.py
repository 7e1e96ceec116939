"""Lean runtime: models, checkpoint I/O, merging, data and training.

Names resolve lazily (PEP 562): importing `bidirlm.runtime` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# `merge` is imported eagerly: the function shares its name with the submodule
# `bidirlm.runtime.merge`, and importing that submodule later would otherwise rebind the package
# attribute to the module. merge.py imports only torch and the stdlib, so this stays cheap.
from .merge import merge as merge

_EXPORTS = {
    "load_model": "models",
    "Encoder": "models",
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
