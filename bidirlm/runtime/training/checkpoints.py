"""Training checkpoints: atomic, safetensors for tensors, the last K kept, resumable exactly.

Layout of one checkpoint, `OUTPUT/checkpoints/step-00000042/`:

- `model.safetensors`: the full (unsharded) model state dict; tensors that share storage (tied
  embeddings) are written once and their aliases recorded in the file's metadata;
- `optimizer.safetensors` + the `optimizer` entry of `state.json`: the optimizer state keyed by
  parameter name (`torch.distributed.checkpoint.state_dict` layout), tensors in safetensors,
  everything else (param groups, scalar state) in JSON;
- `rng-rank{r}.safetensors` + the `rng` entry of `state.json`: every rank's torch (CPU and CUDA),
  numpy and Python RNG states;
- `state.json`: step, data-stream position, counters, and whatever the trainer adds.

Writing is atomic: everything goes to a temporary sibling folder that is renamed into place once
complete, so a checkpoint folder with the final name is always whole, even after SIGKILL. With
several processes all ranks write into the same temporary folder (a shared filesystem is needed
across nodes) and rank 0 renames it after a barrier. A write that fails (disk full, read-only
folder) removes the temporary folder and raises a one-line `CheckpointWriteError` (an
`OutputError`, a ValueError); the complete checkpoints are untouched, so the run resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bidirlm.runtime.jsonl import read_jsonl
from bidirlm.runtime.outputs import OutputError

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `OUTPUT/checkpoints`, oldest first."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------------------------
# Tensor dict <-> safetensors, with shared storage written once
# --------------------------------------------------------------------------------------------


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save to safetensors; aliases (same storage, shape and offset) are stored once."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.cpu().contiguous()
    # safetensors refuses tensors sharing memory even in different shapes: copy those.
    ptrs: set[int] = set()
    for name, tensor in unique.items():
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in ptrs:
            unique[name] = tensor.clone()
        ptrs.add(ptr)
    save_file(unique, str(path), metadata={"aliases": json.dumps(aliases)})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


# --------------------------------------------------------------------------------------------
# Optimizer state (torch.distributed.checkpoint layout: {"state": {fqn: {...}}, "param_groups"})
# --------------------------------------------------------------------------------------------


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors -> `{"state/<fqn>/<key>": tensor}`; the rest -> JSON-able data."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entry in state.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state.get("param_groups", [])}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, rest = name.split("/", 1)
        fqn, key = rest.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = tensor
    for fqn, entry in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(entry)
    return {"state": state, "param_groups": meta.get("param_groups", [])}


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG this process uses: tensors (torch CPU/CUDA) and JSON-able (numpy, Python)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    data = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, data


def restore_rng(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint (model and optimizer state are full, unsharded, on the CPU)."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_data: dict[str, Any] | None = None


def temp_path(output: str | Path, step: int) -> Path:
    return checkpoint_dir(output) / f".{step_name(step)}.tmp"


class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (disk full, read-only folder): one line; the partial
    temporary folder is removed and the previous checkpoints are untouched, so the same command
    resumes from the last complete one once there is room."""


@contextlib.contextmanager
def _writing(tmp: Path) -> Iterator[None]:
    """Turn an OSError while writing into `tmp` into a one-line `CheckpointWriteError`, after
    removing `tmp` (a half-written checkpoint is never left behind)."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        final = tmp.with_name(tmp.name.removeprefix(".").removesuffix(".tmp"))
        done = [p.name for _, p in list_checkpoints(tmp.parent.parent)]
        last = f"resumes from {done[-1]}" if done else "starts over (no complete checkpoint yet)"
        reason = exc.strerror or str(exc)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {reason}; the partial {tmp.name} was removed, "
            f"free space and run the same command again (it {last})"
        ) from None


def write_rank_files(tmp: Path, rank: int) -> dict[str, Any]:
    """Write this rank's RNG tensors into `tmp`; returns the JSON part for state.json."""
    tensors, data = capture_rng()
    with _writing(tmp):
        save_tensors(tensors, tmp / f"rng-rank{rank}.safetensors")
        (tmp / f"rng-rank{rank}.json").write_text(json.dumps(data), encoding="utf-8")
    return data


def write_main_files(
    tmp: Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Rank 0's part: model, optimizer and state.json (written last: it marks completeness)."""
    with _writing(tmp):
        save_tensors(model_state, tmp / "model.safetensors")
        opt_tensors, opt_meta = split_optimizer_state(optimizer_state)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        payload = {"step": step, "optimizer": opt_meta, **state}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1), encoding="utf-8")


def publish(output: str | Path, step: int, keep: int) -> Path:
    """Rename the finished temporary folder into place and delete all but the last `keep`."""
    tmp, final = temp_path(output, step), checkpoint_dir(output) / step_name(step)
    with _writing(tmp):
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
    for _, old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prepare_temp(output: str | Path, step: int) -> Path:
    tmp = temp_path(output, step)
    with _writing(tmp):
        if tmp.exists():  # leftover of a crash while writing
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def load_checkpoint(path: str | Path, *, rank: int = 0) -> Checkpoint:
    """Read a checkpoint folder; `rank` selects whose RNG states to return (if saved)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    model = load_tensors(path / "model.safetensors")
    optimizer = join_optimizer_state(
        load_tensors(path / "optimizer.safetensors"), state.pop("optimizer")
    )
    rng_tensors, rng_data = {}, None
    if (path / f"rng-rank{rank}.safetensors").is_file():
        rng_tensors = load_tensors(path / f"rng-rank{rank}.safetensors")
        rng_data = json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8"))
    return Checkpoint(path, int(state["step"]), model, optimizer, state, rng_tensors, rng_data)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of `metrics.jsonl` logged after the checkpoint we resume from (they will
    be redone). An incomplete last line (a crash in the middle of writing it) is dropped; a bad
    line elsewhere is a ValueError naming the file and line. The file is rewritten atomically."""
    if not path.is_file():
        return
    keep = [row for _, row in read_jsonl(path, torn_tail_ok=True) if row.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep), encoding="utf-8")
    os.replace(tmp, path)


def check_shapes(
    path: Path, state: dict[str, torch.Tensor], own_state: dict[str, torch.Tensor], model: str
) -> None:
    """A checkpoint `state` of another model than the encoder whose state dict is `own_state`
    (other shapes or tensors) is a one-line ValueError."""
    own = {f"encoder.{k}": tuple(v.shape) for k, v in own_state.items()}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(own.keys() & saved.keys()):
        if own[key] != saved[key]:
            raise ValueError(
                f"{path} is a checkpoint of another model: {key} is {list(saved[key])} there but "
                f"{list(own[key])} in {model}; use another train.output"
            )
    missing = sorted(own.keys() - saved.keys())
    if missing and saved.keys() & own.keys():
        raise ValueError(
            f"{path} is a checkpoint of another model: it lacks {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; use another "
            "train.output"
        )
