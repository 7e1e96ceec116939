"""The one JSON Lines reader of the package: training data, fine-tuning tasks, retrieval and
cross-modal evaluation sets, a run's metrics and config-change logs.

A line is one JSON object; blank lines are skipped but counted, so line numbers are the 1-based
lines of the file as an editor shows them. Every problem raises `JsonLinesError` (a
`ValueError`) naming the file and the line: `PATH:LINE: not UTF-8 (...)`, `PATH:LINE: invalid
JSON: ...`, `PATH:LINE: expected a JSON object`. Readers that report records of
several kinds of source by position (`line N`, `row N`) use `error.sentence`, the same problem
worded `PATH: line LINE is not valid JSON: ...`.

- `read_jsonl(path)` / `iter_jsonl(path)`: every record with its line number;
  `torn_tail_ok=True` drops an incomplete last line (a crash while appending to a log);
- `index_jsonl(path)` + `read_record(path, offset, line)`: lazy random access (the byte offset
  of each record) for files too large to hold in memory;
- `parse_line(raw, path, line)`: one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class JsonLinesError(ValueError):
    """A line that is not a JSON object: `path`, 1-based `line`, `kind` ("utf-8", "json",
    "object") and `detail`."""

    _SHORT = {"utf-8": "not UTF-8", "json": "invalid JSON", "object": "expected a JSON object"}
    _LONG = {
        "utf-8": "is not valid UTF-8",
        "json": "is not valid JSON",
        "object": "is not a JSON object",
    }

    def __init__(self, path: str | Path, line: int, kind: str, detail: str = "") -> None:
        self.path, self.line, self.kind, self.detail = str(path), int(line), kind, detail
        sep = ": " if kind == "json" else " "
        extra = f"{sep}{detail}" if detail else ""
        super().__init__(f"{self.path}:{self.line}: {self._SHORT[kind]}{extra}")
        self.sentence = f"{self.path}: line {self.line} {self._LONG[kind]}{extra}"


def parse_line(raw: bytes | str, path: str | Path, line: int) -> dict[str, Any]:
    """The JSON object on one line (bytes are decoded as UTF-8); `JsonLinesError` otherwise."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            detail = f"(byte {exc.object[exc.start]:#04x} at column {exc.start + 1})"
            raise JsonLinesError(path, line, "utf-8", detail) from None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise JsonLinesError(path, line, "json", str(exc)) from None
    if not isinstance(record, dict):
        raise JsonLinesError(path, line, "object")
    return record


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line of `path`, in order."""
    path = Path(path)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if raw.strip():
                yield number, parse_line(raw, path, number)


def read_jsonl(path: str | Path, *, torn_tail_ok: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Every (line number, record) of `path`. With `torn_tail_ok`, a last line that does not
    parse (an append cut by a crash) is dropped instead of raising."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    out = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            out.append((i + 1, parse_line(raw, path, i + 1)))
        except JsonLinesError:
            if not (torn_tail_ok and i == last):
                raise
    return out


def index_jsonl(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets, 1-based line numbers) of the non-blank lines of `path` (int64 arrays)."""
    offsets, numbers = [], []
    with Path(path).open("rb") as fh:
        pos = 0
        for number, raw in enumerate(fh, 1):
            if raw.strip():
                offsets.append(pos)
                numbers.append(number)
            pos += len(raw)
    return np.asarray(offsets, dtype=np.int64), np.asarray(numbers, dtype=np.int64)


def read_record(path: str | Path, offset: int, line: int) -> dict[str, Any]:
    """The record at byte `offset` (from `index_jsonl`), which is on line `line`."""
    with Path(path).open("rb") as fh:
        fh.seek(int(offset))
        raw = fh.readline()
    return parse_line(raw, path, line)
