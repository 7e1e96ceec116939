"""The one JSON Lines reader (`runtime/jsonl.py`) and the one resolver of `embedded:` names
(`runtime/embedded/names.py`): every error names the file and the 1-based line / the names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bidirlm.runtime.embedded import EMBEDDED_TASKS, package_task, python_pairs
from bidirlm.runtime.embedded.names import is_embedded, resolve_embedded, resolve_model_path
from bidirlm.runtime.jsonl import (
    JsonLinesError,
    index_jsonl,
    iter_jsonl,
    parse_line,
    read_jsonl,
    read_record,
)


def test_records_keep_their_file_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": "é"}\n')
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"a": "é"})]
    assert list(iter_jsonl(path)) == read_jsonl(path)
    offsets, lines = index_jsonl(path)
    assert lines.tolist() == [1, 4]
    assert read_record(path, offsets[1], lines[1]) == {"a": "é"}


@pytest.mark.parametrize(
    ("raw", "short", "sentence"),
    [
        (b'{"a": 1', r"x.jsonl:3: invalid JSON: Expecting", "x.jsonl: line 3 is not valid JSON: "),
        (
            b'{"a": "caf\xe9"}',
            r"x.jsonl:3: not UTF-8 \(byte 0xe9 at column 11\)",
            "is not valid UTF-8",
        ),
        (b"[1, 2]", r"x.jsonl:3: expected a JSON object$", "x.jsonl: line 3 is not a JSON object"),
    ],
)
def test_each_problem_names_the_file_and_line(
    tmp_path: Path, raw: bytes, short: str, sentence: str
) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"ok": 1}\n\n' + raw + b'\n{"ok": 2}\n')
    with pytest.raises(JsonLinesError, match=short) as info:
        read_jsonl(path)
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert sentence in info.value.sentence and isinstance(info.value, ValueError)
    with pytest.raises(JsonLinesError, match=short):
        list(iter_jsonl(path))
    offsets, lines = index_jsonl(path)
    with pytest.raises(JsonLinesError, match=short):
        read_record(path, offsets[1], lines[1])


def test_a_torn_last_line_is_dropped_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert read_jsonl(path, torn_tail_ok=True) == [(1, {"step": 1})]
    with pytest.raises(JsonLinesError, match="log.jsonl:2: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1\n{"step": 2}\n')  # a bad line that is not the last one
    with pytest.raises(JsonLinesError, match="log.jsonl:1: invalid JSON"):
        read_jsonl(path, torn_tail_ok=True)
    assert parse_line('{"x": []}', path, 7) == {"x": []}


def test_embedded_names_resolve_in_one_place(tmp_path: Path) -> None:
    assert is_embedded("embedded:anything") and not is_embedded("data/embedded:x.jsonl")
    assert resolve_model_path("~/m") == Path("~/m").expanduser()
    assert resolve_embedded("embedded:python-pairs", "source") == python_pairs()
    name = next(iter(EMBEDDED_TASKS))
    assert resolve_embedded(name, "task") == package_task(EMBEDDED_TASKS[name][1])
    with pytest.raises(ValueError, match=r"unknown embedded source 'embedded:nope'; choose one"):
        resolve_embedded("embedded:nope", "source")
    with pytest.raises(ValueError, match=r"unknown embedded model 'embedded:big'.*embedded:tiny"):
        resolve_model_path("embedded:big")
    with pytest.raises(ValueError, match=r"unknown embedded task 'embedded:python-docs'"):
        resolve_embedded("embedded:python-docs", "task")
