"""Checkpoint I/O for the streaming merger: safetensors headers, memory-mapped reads, shard writes,
and an output folder that appears only when complete.

Reading parses each shard's header with the stdlib (so a truncated or corrupt file is reported
with the model and shard before any work starts) and maps the data with `mmap`: a tensor slice is
a zero-copy `torch.frombuffer` view, read by the page cache on demand, and its pages are dropped
from the process (`MADV_DONTNEED`) once merged, so resident memory stays bounded whatever the
model size. Writing streams tensors into safetensors shards whose headers are planned up front
(shapes and dtypes are known from the inputs), so no output shard is ever held in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import outputs
from ..safetensors_io import (  # the one header reader, shared with models/checkpoint.py
    MAX_HEADER,
    ST_DTYPES,
    TORCH_TO_ST,
    HeaderError,
    TensorInfo,
    read_safetensors_header,
)
from .config import MergeError

__all__ = [  # MAX_HEADER and ST_DTYPES stay importable from here (they lived here before)
    "INDEX_NAME",
    "MAX_HEADER",
    "PAGE",
    "SINGLE_NAME",
    "ST_DTYPES",
    "TORCH_TO_ST",
    "AtomicFolder",
    "HeaderError",
    "MappedFiles",
    "OutEntry",
    "TensorInfo",
    "copy_file",
    "plan_shards",
    "read_checkpoint",
    "read_header",
    "read_safetensors_header",
    "shard_header",
    "shard_names",
    "write_json",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PAGE = mmap.PAGESIZE


def read_header(path: Path, label: str) -> dict[str, TensorInfo]:
    """`read_safetensors_header` with errors as `MergeError` naming the shard and the model."""
    try:
        return read_safetensors_header(path)
    except HeaderError as exc:
        raise MergeError(f"shard {path.name} of model {label} {exc}") from None
    except OSError as exc:
        raise MergeError(f"cannot read shard {path} of model {label}: {exc.strerror}") from None


def read_checkpoint(folder: Path, label: str) -> dict[str, TensorInfo]:
    """All tensors of a Hugging Face folder (index + shards, model.safetensors, *.safetensors)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"model {label}: {INDEX_NAME} is unreadable: {exc}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v for v in weight_map.values()
        ):
            raise MergeError(f"model {label}: {INDEX_NAME} has no valid weight_map")
        files = sorted(set(weight_map.values()))
        # A shard path must name a file of this folder, not ../x or /x (checked on the text:
        # the files of a Hugging Face cache snapshot are symlinks into ../../blobs, legitimately).
        for fname in files:
            if Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise MergeError(
                    f"model {label}: {INDEX_NAME} lists shard {fname!r}, a path outside the model "
                    f"folder {folder}: refusing to read it (shard paths must be file names in "
                    "that folder)"
                )
    elif (folder / SINGLE_NAME).is_file():
        weight_map, files = None, [SINGLE_NAME]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
        if not files:
            bins = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
            raise MergeError(
                f"model {label} has no .safetensors weights in {folder}"
                + (" (.bin/.pt checkpoints are not supported: convert them)" if bins else "")
            )
    tensors: dict[str, TensorInfo] = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise MergeError(f"model {label}: shard {fname} listed in {INDEX_NAME} is missing")
        for name, info in read_header(path, label).items():
            if name in tensors:
                raise MergeError(f"model {label}: tensor {name} appears in two shards")
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file != folder / fname:
                raise MergeError(
                    f"model {label}: tensor {name} is listed in {INDEX_NAME} under {fname} "
                    "but that shard does not hold it"
                )
    return tensors


class MappedFiles:
    """Read-only memory maps of input shards, opened on first use and shared by reader threads."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as fh:
                # ACCESS_COPY gives a writable buffer (torch.frombuffer warns on read-only ones);
                # nothing is ever written, so pages stay shared with the page cache.
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            mm = self._maps.setdefault(path, mm)
        return mm

    def view(self, info: TensorInfo, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, as a zero-copy view of the mapped file."""
        if hi <= lo:  # empty tensors have no bytes to map
            return torch.empty(0, dtype=info.dtype)
        mm = self._map(info.file)
        isz = info.dtype.itemsize
        start = info.offset + lo * isz
        # Ask the kernel to read the range ahead (cold page cache: overlaps disk and compute).
        a = start - start % PAGE
        mm.madvise(mmap.MADV_WILLNEED, a, start + (hi - lo) * isz - a)
        return torch.frombuffer(mm, dtype=info.dtype, count=hi - lo, offset=start)

    def release(self, info: TensorInfo, lo: int, hi: int) -> None:
        """Drop the pages of a merged range from this process (they stay in the page cache)."""
        mm = self._maps.get(info.file)
        if mm is None or hi <= lo:
            return
        isz = info.dtype.itemsize
        start = info.offset + lo * isz
        a = start - start % PAGE
        mm.madvise(mmap.MADV_DONTNEED, a, start + (hi - lo) * isz - a)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it later
                pass
        self._maps.clear()


@dataclass(frozen=True)
class OutEntry:
    """One output tensor as planned: name, dtype, shape, size."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def plan_shards(entries: list[OutEntry], max_bytes: int) -> list[list[OutEntry]]:
    """Greedy, order-preserving packing into shards of at most `max_bytes` (a larger tensor gets a
    shard of its own), like transformers' `save_pretrained`."""
    shards: list[list[OutEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def shard_header(entries: list[OutEntry]) -> bytes:
    """The 8-byte length + JSON header of a safetensors file, padded so data starts 8-aligned."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for e in entries:
        header[e.name] = {
            "dtype": TORCH_TO_ST[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_json(path: Path, data: object) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


class AtomicFolder(outputs.AtomicFolder):
    """`bidirlm.runtime.outputs.AtomicFolder` raising `MergeError` (see there): the output
    appears only when complete, never replaces an input or the working directory, and leftovers
    of killed runs are removed by the next run in the same parent folder."""

    error = MergeError
