"""Checks a merge runs before writing: inputs of different architectures, and a `config_from`
whose architecture does not fit the merged tensors (a checkpoint that would fail only when
loaded)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import MergeConfig, MergeError


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json ({} when absent or unreadable)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def architecture(folder: Path) -> str | None:
    """`model_type` (with the first of `architectures`) of a model folder, None if unknown."""
    cfg = read_config(folder)
    kind = cfg.get("model_type")
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if not isinstance(kind, str):
        return arch
    return f"{kind} ({arch})" if arch else kind


def architectures_differ(config: MergeConfig, i: int, j: int) -> str | None:
    """'architectures differ: ...' when models i and j have different config.json model types
    and neither renames its tensors (then their names cannot correspond), else None."""
    a, b = config.models[i], config.models[j]
    if a.rename or b.rename:
        return None
    kind_a, kind_b = architecture(a.path), architecture(b.path)
    if kind_a is None or kind_b is None or kind_a.split()[0] == kind_b.split()[0]:
        return None
    return (
        f"architectures differ: model {a.label} is {kind_a} but model {b.label} is {kind_b}; "
        "merging averages tensors of one architecture (same names and shapes)"
    )


def _expected_tensors(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors a transformers model built from `cfg` holds: {name: shape}, a tied weight once
    (under its first name). Empty when transformers cannot build the architecture (unknown or
    custom model type)."""
    try:  # an extra (not in the core install): without it there is nothing to build
        import transformers
    except ImportError:
        return {}

    archs = cfg.get("architectures")
    cls = None
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        cls = getattr(transformers, archs[0], None)
    kind = cfg.get("model_type")
    if cls is None or not isinstance(kind, str):
        return {}
    try:
        hf_config = transformers.AutoConfig.for_model(kind, **{k: v for k, v in cfg.items()
                                                               if k != "model_type"})  # fmt: skip
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception:  # noqa: BLE001 - a config transformers cannot build is not ours to judge
        return {}
    distinct: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            distinct[name] = tuple(tensor.shape)
    return distinct


def check_config_fits(
    cfg: Mapping[str, Any], tensors: Iterable[tuple[str, tuple[int, ...]]], source: str
) -> None:
    """Refuse a `config_from` config whose architecture does not hold the merged tensors (names
    and shapes), naming the first difference; nothing is checked when transformers cannot build
    the architecture (or is not installed: the core install merges without it)."""
    expected = _expected_tensors(cfg)
    if not expected:
        return
    out = dict(tensors)
    kind = cfg.get("model_type")
    for name, shape in out.items():
        if name in expected and tuple(expected[name]) != tuple(shape):
            raise MergeError(
                f"config_from {source} ({kind}) does not fit the merged tensors: {name} is "
                f"{list(shape)} but that config makes it {list(expected[name])}; take the "
                "config of the merged models' architecture"
            )
    # Tensors the config has no place for are only unexpected keys to transformers (towers a
    # merge carries along); tensors it needs and does not get would be random at load time.
    missing = [n for n in expected if n not in out]
    if missing:
        raise MergeError(
            f"config_from {source} ({kind}) does not fit the merged tensors: {len(missing)} "
            f"tensor(s) that config needs are not in the merge, e.g. {missing[0]}; take the "
            "config of the merged models' architecture"
        )
