"""The config a run was made with, and what a resume may change.

`OUTPUT/config.toml` is written once, when the run starts. Resuming with a config that differs
(`config_changes`) is refused with the list of differing keys unless
`train.allow_config_change = true`; an allowed change is appended to
`OUTPUT/config-changes.jsonl` (time, step, the changes, the full new config) and the next resume
compares against that one. Keys that only change the console output are ignored.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bidirlm.runtime.jsonl import read_jsonl

from .config import TrainConfig, tomllib
from .distributed import DistInfo

VOLATILE_KEYS = ("train.progress_bar", "train.log_every", "train.allow_config_change")
CONFIG_CHANGES = "config-changes.jsonl"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, (list, tuple)) and any(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}.{i}"))
        return out
    return {prefix: list(data) if isinstance(data, tuple) else data}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dicts -> (old, new); None = absent.

    Keys that only change the console output (`train.progress_bar`, `train.log_every`) and
    `train.allow_config_change` itself are ignored.
    """
    a, b = _flatten(old), _flatten(new)
    return {
        key: (a.get(key), b.get(key))
        for key in sorted(a.keys() | b.keys())
        if key not in VOLATILE_KEYS and a.get(key) != b.get(key)
    }


def run_config(output: Path) -> dict[str, Any] | None:
    """The config the run in `output` last ran with: config.toml, or the last recorded change."""
    changes = output / CONFIG_CHANGES
    if changes.is_file():
        # a torn last line (a crash mid-write) is skipped: the change before it holds
        for _, record in reversed(read_jsonl(changes, torn_tail_ok=True)):
            if isinstance(record.get("config"), dict):
                return record["config"]
    path = output / "config.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path}: not a readable config ({exc}); use another train.output"
        ) from None


def check_config_change(
    config: TrainConfig, output: Path, step: int, log: Callable[[str], None], main: bool
) -> None:
    """Refuse to resume under a changed config unless allowed; record an allowed change."""
    old = run_config(output)
    if old is None:
        return
    changes = config_changes(old, config.to_dict())
    if not changes:
        return
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if not config.train.allow_config_change:
        raise ValueError(
            f"{output} holds a run (step {step}) made with another config: {shown}; resume "
            "with the same config, use another train.output, or set "
            "train.allow_config_change=true (--allow-config-change) to continue with this one"
        )
    log(f"continuing {output} with a changed config: {shown}")
    if main:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "step": step,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
            "config": config.to_dict(),
        }
        with (output / CONFIG_CHANGES).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def write_config(path: Path, text: str) -> None:
    """Write the run's config atomically (a temporary sibling, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def config_summary(config: TrainConfig, info: DistInfo, output: Path) -> str:
    """The run on one line; the full resolved config is in OUTPUT/config.toml."""
    t, o = config.train, config.optim
    return (
        f"{config.phase} | model {config.model} | {t.steps} steps | lr {o.lr:g} {o.schedule} | "
        f"dtype {t.dtype} | {info.device} x{info.world_size} | "
        f"full config: {output / 'config.toml'}"
    )
