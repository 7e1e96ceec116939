"""Lengths against the model's position limit, checked before anything is allocated.

A `--max-length` above the model's `max_position_embeddings` buys nothing (the model never saw
those positions) and lets one long input allocate far more than the machine has: inference
commands clamp it with a one-line notice on stderr. A training `data.max_seq_len` above it is
refused (the recorded config must say what ran).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bidirlm.cli import CommandError
from bidirlm.runtime.embedded.names import is_embedded, resolve_model_path


def max_positions(model: str | Path) -> int | None:
    """`max_position_embeddings` of a checkpoint folder's config.json (its `text_config`'s for a
    composite model); None when the folder or field cannot be read (loading reports that)."""
    from bidirlm.runtime.models import checkpoint as ckpt

    try:
        if is_embedded(str(model)):
            model = resolve_model_path(str(model))
        hf: dict[str, Any] = ckpt.read_config(ckpt.resolve(model))
    except (ValueError, OSError):
        return None
    for config in (hf, hf.get("text_config")):
        if isinstance(config, dict):
            value = config.get("max_position_embeddings")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def clamp_max_length(command: str, model: str | Path, value: int) -> int:
    """`value` (a `--max-length`), at most the model's position limit, with a notice."""
    if value < 1:
        raise CommandError(f"--max-length must be >= 1, got {value}")
    limit = max_positions(model)
    if limit is not None and value > limit:
        print(
            f"bidirlm {command}: --max-length {value} is above the model's "
            f"max_position_embeddings ({limit}): using {limit}",
            file=sys.stderr,
        )
        return limit
    return value


def check_max_seq_len(config: Any, model: str | Path | None = None, *, where: str = "") -> None:
    """Refuse a training config whose `data.max_seq_len` exceeds the model's position limit
    (`where` prefixes the message, e.g. a recipe phase's `[mntp] `)."""
    model = config.model if model is None else model
    limit = max_positions(model)
    value = config.data.max_seq_len
    if limit is not None and value > limit:
        raise CommandError(
            f"{where}data.max_seq_len = {value} is above the model's max_position_embeddings "
            f"({limit}, {model}): set data.max_seq_len <= {limit}"
        )
