"""Fine-tuning data: JSON Lines readers, labels, subword alignment, packed task batches.

Record formats (one JSON object per line; blank lines are skipped, line numbers count them):

| phase                     | record                                                         |
|---------------------------|----------------------------------------------------------------|
| `sequence-classification` | `{"text": str, "label": L}` or `{"text", "text_pair", "label"}`  |
|                           | on an omni model also `{"image": path, "text", "label"}` or      |
|                           | `{"audio": path, "text", "label"}` (media, then the text)        |
| `token-classification`    | `{"tokens": [str, ...], "tags": [T, ...]}` (one tag per word)    |

`L` is a label name or index (single-label), a list of names / indices (multi-label), or a
finite number / list of finite numbers (regression; NaN and Inf are refused); `T` is a tag name
or index. Media paths are relative to the data file's folder (or absolute); a missing file is an
error naming the file and line before training starts. Media records keep their path in
`TaskExample.media`; the image / audio is read when its batch is built
(`training.multimodal.task_inputs`, which puts the media tokens before the text's). Sources
may also be the embedded tasks `embedded:python-packages:{train,heldout}` and
`embedded:python-tokens:{...}`.
Every problem is a one-line `ValueError` naming the file and line: an unknown label, a tokens /
tags length mismatch, a missing field, invalid JSON, an empty file.

Tokenization: the tokenizer's own special tokens (`add_special_tokens=True`), truncation to
`max_len` tokens (pairs: longest first). Token tasks join the words with single spaces,
tokenize once with offsets and give every subword the word its characters fall in: the first
subword of each word carries the word's tag and the others are ignored (-100), or, with
`label_all_subwords`, carry the tag too (`B-X` continuing as `I-X` when that tag exists, as in
transformers' `run_ner.py`). Special tokens are never labelled. Words cut by truncation have no
subword: evaluation predicts them as `O` (or label 0 when there is no `O`).

`TaskBatches` yields packed micro-batches (`cu_seqlens`, no padding) of `batch_size` examples
drawn from the weighted mixture of sources, deterministic from the seed and resumable
(`state_dict()` / `load_state_dict()`), like the other phases' streams.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime.embedded.names import is_embedded, resolve_embedded
from bidirlm.runtime.jsonl import read_jsonl

from .data import _Mixture
from .task_config import TaskConfig
from .task_metrics import metric_names

IGNORE_INDEX = -100


@dataclass
class TaskRecords:
    """The raw records of one source: `name` (path or embedded name) and (line, record) pairs."""

    name: str
    rows: list[tuple[int, dict[str, Any]]]
    base: Path | None = None  # the data file's folder: relative media paths start there

    def __len__(self) -> int:
        return len(self.rows)


def read_records(spec: str) -> TaskRecords:
    """Read a JSON Lines file or an embedded task; errors name the file and line."""
    if is_embedded(spec):
        records = resolve_embedded(spec, "task")
        return TaskRecords(spec, [(i + 1, r) for i, r in enumerate(records)])
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"task data {spec} {what} (expected a JSON Lines file)")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{spec}: empty file (no records)")
    return TaskRecords(spec, rows, path.resolve().parent)


# --------------------------------------------------------------------------------------------
# Fields and labels
# --------------------------------------------------------------------------------------------


MEDIA_FIELDS = ("image", "audio")


def media_of(records: TaskRecords, line: int, record: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, absolute path) of a record's `image` / `audio` field, None without one; the file
    must exist (one-line error naming the data file and line)."""
    where = f"{records.name}:{line}"
    keys = [k for k in MEDIA_FIELDS if k in record]
    if not keys:
        return None
    if len(keys) > 1:
        raise ValueError(f'{where}: a record holds one of "image" or "audio", not both')
    kind = keys[0]
    value = record[kind]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'{where}: "{kind}" must be a file path (a non-empty string)')
    path = Path(value).expanduser()
    if not path.is_absolute() and records.base is not None:
        path = records.base / path
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{where}: {kind} file {path} {what}")
    return kind, str(path)


def check_fields(records: TaskRecords, kind: str, *, need_labels: bool = True) -> None:
    """Check every record has the fields of `kind` (`sequence` / `token`) with the right types
    (and that every media file of a sequence record exists)."""
    for line, r in records.rows:
        where = f"{records.name}:{line}"
        if kind == "sequence":
            if not isinstance(r.get("text"), str):
                raise ValueError(f'{where}: expected a "text" string field')
            if "text_pair" in r and not isinstance(r["text_pair"], str):
                raise ValueError(f'{where}: "text_pair" must be a string')
            media_of(records, line, r)
            if need_labels and "label" not in r:
                raise ValueError(f'{where}: missing "label"')
        else:
            tokens = r.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError(f'{where}: expected "tokens", a list of strings')
            if not tokens:
                raise ValueError(f'{where}: "tokens" is empty')
            if any(k in r for k in MEDIA_FIELDS):
                raise ValueError(f"{where}: token-classification records take no image / audio")
            if need_labels:
                tags = r.get("tags")
                if not isinstance(tags, list):
                    raise ValueError(f'{where}: expected "tags", a list with one tag per token')
                if len(tags) != len(tokens):
                    raise ValueError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def infer_labels(records: Sequence[TaskRecords], kind: str, problem_type: str) -> list[str]:
    """Label names read from the training data (see `TaskConfig.labels`)."""
    if kind == "sequence" and problem_type == "regression":
        widths = set()
        for src in records:
            for _line, r in src.rows:
                v = r["label"]
                widths.add(len(v) if isinstance(v, list) else 1)
        if len(widths) != 1:
            raise ValueError(
                f"regression labels have different lengths {sorted(widths)} across records"
            )
        return [f"LABEL_{i}" for i in range(widths.pop())]
    names: set[str] = set()
    top = -1
    for src in records:
        for line, r in src.rows:
            values = r["tags"] if kind == "token" else r["label"]
            if kind == "token" or (problem_type == "multi_label" and isinstance(values, list)):
                items = values
            else:
                items = [values]
            for v in items:
                if isinstance(v, str):
                    names.add(v)
                elif _is_int(v) and v >= 0:
                    top = max(top, v)
                else:
                    raise ValueError(
                        f"{src.name}:{line}: label {v!r} is neither a name nor an index >= 0"
                    )
    if names and top >= 0:
        raise ValueError(
            "the data mixes label names and indices: list the names in task.labels (index i "
            "is the i-th name)"
        )
    if top >= 0:
        return [f"LABEL_{i}" for i in range(top + 1)]
    ordered = sorted(names)
    if kind == "token" and "O" in names:
        ordered = ["O", *[n for n in ordered if n != "O"]]
    if len(ordered) < 2 and not (kind == "sequence" and problem_type == "multi_label"):
        raise ValueError(f"the data has only the label(s) {ordered}: need at least 2")
    return ordered


def _index(value: Any, labels: Sequence[str], lookup: dict[str, int], where: str) -> int:
    if isinstance(value, str):
        if value not in lookup:
            shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
            raise ValueError(f"{where}: unknown label {value!r} (labels: {shown})")
        return lookup[value]
    if _is_int(value):
        if not 0 <= value < len(labels):
            raise ValueError(f"{where}: label index {value} is out of range [0, {len(labels)})")
        return value
    raise ValueError(f"{where}: label {value!r} is neither a name nor an index")


def encode_label(
    value: Any, labels: Sequence[str], problem_type: str, where: str
) -> int | list[float]:
    """One record's label as an index (single-label), multi-hot list or list of floats."""
    lookup = {name: i for i, name in enumerate(labels)}
    if problem_type == "single_label":
        return _index(value, labels, lookup, where)
    if problem_type == "multi_label":
        items = value if isinstance(value, list) else [value]
        hot = [0.0] * len(labels)
        for v in items:
            hot[_index(v, labels, lookup, where)] = 1.0
        return hot
    items = value if isinstance(value, list) else [value]
    if not all(_is_number(v) for v in items):
        raise ValueError(f"{where}: regression label {value!r} is not a number (or numbers)")
    if not all(math.isfinite(v) for v in items):
        raise ValueError(f"{where}: regression label {value!r} is not finite (NaN / Infinity)")
    if len(items) != len(labels):
        raise ValueError(f"{where}: {len(items)} regression targets, expected {len(labels)}")
    return [float(v) for v in items]


# --------------------------------------------------------------------------------------------
# Encoded examples
# --------------------------------------------------------------------------------------------


@dataclass
class TaskExample:
    """One tokenized example.

    `input_ids`: token ids; `label`: the sequence label (index, multi-hot or floats) or None;
    token tasks: `token_labels` (per subword, -100 ignored), `word_starts` (index of each word's
    first subword, -1 when truncated away) and `word_labels` (per word, None without tags);
    media records: `media` = (kind, absolute path, "file:line"), placed before `input_ids`.
    """

    input_ids: list[int]
    label: int | list[float] | None = None
    token_labels: list[int] | None = None
    word_starts: list[int] | None = None
    word_labels: list[int] | None = None
    media: tuple[str, str, str] | None = None


def _continuation_map(labels: Sequence[str]) -> list[int]:
    """Index of the tag a continuation subword takes: B-X -> I-X when it exists, else itself."""
    lookup = {name: i for i, name in enumerate(labels)}
    return [lookup.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(labels)]


def encode_records(
    records: TaskRecords,
    tokenizer: Any,
    *,
    kind: str,
    labels: Sequence[str],
    problem_type: str,
    max_len: int,
    label_all_subwords: bool = False,
    with_labels: bool = True,
) -> list[TaskExample]:
    """Tokenize and label every record of a source (labels checked against `labels`)."""
    check_fields(records, kind, need_labels=with_labels)
    if kind == "sequence":
        return _encode_sequences(records, tokenizer, labels, problem_type, max_len, with_labels)
    return _encode_tokens(records, tokenizer, labels, max_len, label_all_subwords, with_labels)


def _encode_sequences(records, tokenizer, labels, problem_type, max_len, with_labels):
    texts = [r["text"] for _, r in records.rows]
    pairs = [r.get("text_pair") for _, r in records.rows]
    has_pair = [p is not None for p in pairs]
    ids: list[list[int]] = [[] for _ in texts]
    for paired in (False, True):  # the tokenizer takes pairs for all texts of a call or none
        idx = [i for i, h in enumerate(has_pair) if h == paired]
        if not idx:
            continue
        enc = tokenizer(
            [texts[i] for i in idx],
            [pairs[i] for i in idx] if paired else None,
            add_special_tokens=True,
            truncation=True,
            max_length=max_len,
        )["input_ids"]
        for i, seq in zip(idx, enc):
            ids[i] = list(seq)
    out = []
    for (line, r), seq in zip(records.rows, ids):
        where = f"{records.name}:{line}"
        if not seq:
            raise ValueError(f"{where}: the text tokenizes to nothing")
        label = encode_label(r["label"], labels, problem_type, where) if with_labels else None
        found = media_of(records, line, r)
        media = (found[0], found[1], where) if found else None
        out.append(TaskExample(input_ids=seq, label=label, media=media))
    return out


def _encode_tokens(records, tokenizer, labels, max_len, label_all_subwords, with_labels):
    lookup = {name: i for i, name in enumerate(labels)}
    cont = _continuation_map(labels)
    texts, spans = [], []
    for _, r in records.rows:
        starts, ends, pos = [], [], 0
        for word in r["tokens"]:
            starts.append(pos)
            ends.append(pos + len(word))
            pos += len(word) + 1
        texts.append(" ".join(r["tokens"]))
        spans.append((starts, ends))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token-classification needs a fast tokenizer (character offsets)")
    enc = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=True,
        max_length=max_len,
        return_offsets_mapping=True,
    )
    out = []
    for k, (line, r) in enumerate(records.rows):
        where = f"{records.name}:{line}"
        text, (starts, ends) = texts[k], spans[k]
        word_labels = None
        if with_labels:
            word_labels = [_index(t, labels, lookup, f"{where}: tag") for t in r["tags"]]
        seq = list(enc["input_ids"][k])
        token_labels = [IGNORE_INDEX] * len(seq)
        word_starts = [-1] * len(starts)
        for j, (s, e) in enumerate(enc["offset_mapping"][k]):
            while s < e and text[s].isspace():  # byte-level BPE offsets include the space
                s += 1
            if s >= e:
                continue  # a special token or a pure-space piece
            w = bisect.bisect_right(starts, s) - 1
            if w < 0 or s >= ends[w]:
                continue
            first = word_starts[w] < 0
            if first:
                word_starts[w] = j
            if word_labels is not None and (first or label_all_subwords):
                tag = word_labels[w]
                token_labels[j] = tag if first else cont[tag]
        out.append(
            TaskExample(
                input_ids=seq,
                token_labels=token_labels if with_labels else None,
                word_starts=word_starts,
                word_labels=word_labels,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class TaskBatch:
    """Packed examples: `input_ids [T]`, `cu_seqlens [N+1]` int32 and their `labels`.

    `labels`: `[N]` int64 (single-label), `[N, C]` float32 (multi-label, regression) or `[T]`
    int64 per token (token tasks, -100 ignored); None for unlabelled data. `media`: one
    (kind, path, "file:line") or None per example (`TaskExample.media`), None when no example
    has media; `training.multimodal.task_inputs` turns such a batch into the omni model's inputs.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor | None
    media: list[tuple[str, str, str] | None] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(examples: Sequence[TaskExample], kind: str, problem_type: str) -> TaskBatch:
    """Pack examples into one `TaskBatch`."""
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int32)
    cu = torch.zeros(len(examples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)
    labels = None
    if kind == "token":
        if examples[0].token_labels is not None:
            labels = torch.tensor([t for e in examples for t in e.token_labels], dtype=torch.long)
    elif examples[0].label is not None:
        if problem_type == "single_label":
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        else:
            labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    media = [e.media for e in examples]
    return TaskBatch(ids, cu, int(lengths.max()), labels, media if any(media) else None)


def iter_batches(
    examples: Sequence[TaskExample], batch_size: int, kind: str, problem_type: str
) -> Iterator[tuple[int, TaskBatch]]:
    """(offset, batch) over `examples` in order, `batch_size` at a time (evaluation)."""
    for start in range(0, len(examples), batch_size):
        yield start, collate(examples[start : start + batch_size], kind, problem_type)


class _ExampleSource:
    def __init__(self, examples: list[TaskExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TaskExample:
        return self.examples[index]


class TaskBatches:
    """Micro-batches of `batch_size` examples from a weighted mixture, deterministic, resumable."""

    def __init__(
        self,
        sources: Sequence[list[TaskExample]],
        weights: Sequence[float],
        *,
        batch_size: int,
        seed: int,
        kind: str,
        problem_type: str,
    ) -> None:
        self._mix = _Mixture([_ExampleSource(list(s)) for s in sources], weights, seed)
        self.batch_size = int(batch_size)
        self.kind, self.problem_type = kind, problem_type
        # Records are all checked before training, so none is skipped (the trainer's counters).
        self.bad_records = 0
        self.first_bad: str | None = None

    def next_batch(self) -> TaskBatch:
        picked = []
        for _ in range(self.batch_size):
            source = self._mix.choose_source()
            picked.append(self._mix.sources[source][self._mix.next_index(source)])
        return collate(picked, self.kind, self.problem_type)

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": self._mix.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mix.load_state_dict(state["mixture"])


# --------------------------------------------------------------------------------------------
# A whole task (training sources, labels, dev set)
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """What the data says about a task: kind, problem type, labels, parsed sources."""

    kind: str
    problem_type: str
    labels: list[str]
    sources: list[TaskRecords]
    dev: TaskRecords | None


def check_task(
    kind: str, task: TaskConfig, source_paths: Sequence[str], *, names: Sequence[str] = ()
) -> TaskSpec:
    """Read and check every source and the dev set of a `kind` ("sequence" / "token") task
    before training (one-line errors)."""
    problem = task.problem_type if kind == "sequence" else "single_label"
    if kind == "token" and task.problem_type != "single_label":
        raise ValueError(
            f"task.problem_type={task.problem_type!r}: token-classification is single_label"
        )
    sources = []
    for i, path in enumerate(source_paths):
        records = read_records(path)
        check_fields(records, kind)
        if i < len(names) and names[i]:
            records.name = names[i]
        sources.append(records)
    labels = list(task.labels) or infer_labels(sources, kind, problem)
    if problem == "regression" and task.labels:
        labels = list(task.labels)
    if task.class_weights and len(task.class_weights) != len(labels):
        raise ValueError(
            f"task.class_weights has {len(task.class_weights)} values for {len(labels)} labels"
        )
    if task.class_weights and problem == "regression":
        raise ValueError("task.class_weights does not apply to regression")
    dev = None
    if task.dev:
        dev = read_records(task.dev)
        check_fields(dev, kind)
    # Every label must be known: encode once (cheap) so errors come before training starts.
    for records in [*sources, *([dev] if dev else [])]:
        for line, r in records.rows:
            where = f"{records.name}:{line}"
            if kind == "token":
                lookup = {n: i for i, n in enumerate(labels)}
                for t in r["tags"]:
                    _index(t, labels, lookup, f"{where}: tag")
            else:
                encode_label(r["label"], labels, problem, where)
    if task.metric != "auto":
        valid = metric_names(kind, problem, labels)
        if task.metric not in valid:
            raise ValueError(
                f"task.metric={task.metric!r} is not computed for this task; choose auto or "
                f"one of {', '.join(valid)}"
            )
    return TaskSpec(kind, problem, labels, sources, dev)
