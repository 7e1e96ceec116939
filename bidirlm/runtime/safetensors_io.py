"""The one safetensors header reader, below both `models/` and `merging/`.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. `read_safetensors_header` parses the header with the
stdlib and checks every range lies inside the file, so a truncated or corrupt shard is reported
before any tensor is read. Imports only torch and the stdlib.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype codes -> torch dtypes (the ones a checkpoint can hold that torch can view)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of an input checkpoint lives."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class HeaderError(ValueError):
    """A safetensors file that is truncated or corrupt; the message continues "FILE ..."."""


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check every tensor lies inside the file.

    Shared by the merger (`merging.io`) and `load_model` (`models.checkpoint`): a truncated
    file, a header whose offsets run past the end, a huge header length or a corrupt entry
    raises `HeaderError("is truncated ...")` (callers prefix the file and model), before any
    tensor is read. OSError passes through.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise HeaderError(f"is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise HeaderError(
                f"is truncated or not a safetensors file (header of {n} bytes, file of "
                f"{size} bytes)"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderError(f"has a corrupt header: {exc}") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HeaderError(
                f"has a corrupt or unsupported entry for tensor {name}: {entry!r}"
            ) from None
        info = TensorInfo(name, path, dtype, shape, base + start, end - start)
        if start < 0 or end < start or info.nbytes != info.numel * dtype.itemsize:
            raise HeaderError(
                f"is corrupt: tensor {name} has {info.nbytes} bytes for shape {list(shape)} "
                f"{entry['dtype']}"
            )
        if base + end > size:
            raise HeaderError(
                f"is truncated: tensor {name} ends at byte {base + end} but the file has "
                f"{size} bytes"
            )
        out[name] = info
    return out
