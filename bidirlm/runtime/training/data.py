"""Training data: record sources, weighted mixtures, token packing and contrastive batches.

Sources (`open_source`) give random access to records (dicts) by index:

| path                                 | records                                             |
|--------------------------------------|-----------------------------------------------------|
| `*.jsonl`, `*.json` (JSON Lines)     | one object per non-empty line                       |
| `*.parquet`                          | one row per record (read one row group at a time)   |
| `*.txt`                              | `{"text": ...}` per blank-line separated paragraph  |
| folder of `*.txt` files              | `{"text": ...}` per file, sorted by name            |
| `datasets` `save_to_disk` folder     | one row per record (the `train` split of a dict)    |
| `embedded:python-docs` / `-code`     | `{"text": ...}` from `bidirlm.runtime.embedded`     |
| `embedded:python-pairs`              | `{"query", "positive", "negatives"}` pairs          |

Streamed sources (`StreamSource`: read in order, each rank its own part, never indexed whole):

- a folder (searched recursively) or a glob of `*.parquet` shards: one row per record, shard by
  shard, one row group at a time;
- any file, folder or glob with `streaming = true`: `datasets.load_dataset(..., streaming=True)`
  on the local files (.jsonl/.json/.parquet/.csv/.txt, one kind per source).

A Parquet-shards source visits the shards in a fresh order each epoch (from the seed) and the rows
of each row group in a fresh order; its row groups are dealt to the ranks in turn (row group u of
the walk is rank `u % world`'s), so each rank reads only its own row groups, and its position is
five integers. A `datasets` stream is split with `split_dataset_by_node` and resumes from the
dataset's own `state_dict` (in file order: no shuffle buffer, whose content a resume would lose).
With a streamed source the packed stream is read per rank (`per_rank`): its other sources are dealt
to the ranks the same way (every world-th record of each epoch's permutation).

`PackedBatches` (causal and MNTP phases) draws documents from the sources so that each source
gives its weight's share of the TOKENS (not of the documents: a source of long documents is drawn
less often), tokenizes them (the tokenizer's special tokens, plus EOS when it adds none) and packs
them into micro-batches of exactly `tokens_per_batch` tokens, each sequence at most `max_seq_len`
long, described by `cu_seqlens` (no padding). Documents longer than a sequence, or than the room
left in a batch, continue in the next sequence. The source of the next document is drawn with odds
weight / mean document length (so the expected token share is the weight's), and a source behind
its share by more than one of its mean documents is taken first, so the realised shares stay
within about a document of the target (`token_shares()`). `PairBatches` (contrastive phase)
draws one dataset per batch, by weight, and takes `batch_size` consecutive records of it.

Bad records: a JSON Lines line that is not valid UTF-8 or JSON, not an object, or lacks the
phase's text fields raises `BadRecordError` naming the file and the 1-based line (other sources
name the 1-based row). `check_sources` reads every line of JSON Lines files up to
`FULL_CHECK_BYTES` (256 MiB, a few seconds) before training, so such a record fails in seconds,
not mid-run; larger files are checked as they stream. With `skip_bad_records` the streams skip
bad records instead and count them (`bad_records` in their state).

Both are deterministic from the seed and resumable: every random choice is derived from
`(seed, counter)` (numpy's counter-seeded generators), so the state is a few integers
(`state_dict()` / `load_state_dict()`, JSON-serializable). Each source is read in a fresh random
permutation per epoch, so no record repeats before all have been seen.
"""

from __future__ import annotations

import copy
import glob as globlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidirlm.runtime.embedded.names import is_embedded, resolve_embedded
from bidirlm.runtime.jsonl import JsonLinesError, index_jsonl, parse_line, read_record

from .config import SourceConfig
from .multimodal import is_item, localize

# JSON Lines files up to this size are read whole before training (measured 66 MiB/s on a busy
# 2-core CPU: about 4 s for the largest).
FULL_CHECK_BYTES = 256 * 2**20
CONTRASTIVE_FIELDS = ("query", "positive")


class BadRecordError(ValueError):
    """A record that cannot be used; the message names the file and the 1-based line or row."""


def record_problem(record: Any, fields: Sequence[str]) -> str | None:
    """Why `record` cannot be used by a phase reading `fields` (None when it can).

    Every field must hold text; a contrastive record (`query`, `positive`) may add `negatives`,
    a list of texts.
    """
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    missing = [f for f in fields if f not in record]
    if missing:
        has = ", ".join(sorted(record)) or "nothing"
        return f"lacks field(s) {', '.join(missing)} (it has: {has})"
    # contrastive fields may also be {"image": path} / {"audio": path} (training.multimodal)
    ok = is_item if tuple(fields) == CONTRASTIVE_FIELDS else (lambda v: isinstance(v, str))
    for f in fields:
        if not ok(record[f]):
            media = " or {'image'|'audio': path}" if ok is is_item else ""
            return f"field {f!r} is {type(record[f]).__name__}, not text{media}"
    if tuple(fields) == CONTRASTIVE_FIELDS:
        negatives = record.get("negatives") or []
        if not isinstance(negatives, list) or not all(is_item(n) for n in negatives):
            return "'negatives' is not a list of text"
    return None


class RecordSource:
    """Random access to the records (dicts) of one source."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Where record `index` (0-based) is, for messages: `row N`, 1-based."""
        return f"row {index + 1}"


class ListSource(RecordSource):
    def __init__(self, name: str, records: Sequence[dict[str, Any]]) -> None:
        self.name = name
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._records[index]


class JsonLinesSource(RecordSource):
    """JSON Lines read lazily: only the byte offsets (and line numbers) of records are kept."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.path = path
        self._offsets, self._lines = index_jsonl(path)

    def __len__(self) -> int:
        return len(self._offsets)

    def where(self, index: int) -> str:
        return f"line {int(self._lines[index])}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Record `index`; `BadRecordError` naming the file and line when it is not one."""
        try:
            return read_record(self.path, int(self._offsets[index]), int(self._lines[index]))
        except JsonLinesError as exc:
            raise BadRecordError(exc.sentence) from None

    def scan(self, fields: Sequence[str]) -> list[str]:
        """Read every record in order; the problem of each bad one (`file: line N ...`)."""
        problems = []
        with self.path.open("rb") as fh:
            index = 0
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    problem = record_problem(parse_line(line, self.path, number), fields)
                except JsonLinesError as exc:
                    problems.append(exc.sentence)
                else:
                    if problem is not None:
                        problems.append(f"{self.path}: {self.where(index)} {problem}")
                index += 1
        return problems


class ParquetSource(RecordSource):
    """Parquet rows, decoded one row group at a time (the last one is kept)."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq  # optional dependency (with `datasets`, the [train] extra)

        self.name = str(path)
        self._file = pq.ParquetFile(path)
        sizes = [
            self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)
        ]
        self._starts = np.cumsum([0, *sizes])
        self._cached: tuple[int, list[dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group).to_pylist())
        return self._cached[1][index - int(self._starts[group])]


class HFDatasetSource(RecordSource):
    """A folder written by `datasets.Dataset.save_to_disk` (memory-mapped Arrow)."""

    def __init__(self, path: Path) -> None:
        import datasets  # optional dependency (the [train] extra)

        self.name = str(path)
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(
                    f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})"
                )
            ds = ds["train"]
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._ds[int(index)]


class StreamSource:
    """Records read in order with a resumable position (a JSON-serializable `state_dict`);
    `set_rank` picks this process's part before the first read."""

    name: str
    rank: int = 0
    world: int = 1
    seed: int = 0

    def set_rank(self, rank: int, world: int, seed: int) -> None:
        self.rank, self.world, self.seed = int(rank), int(world), int(seed)

    def next_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def first_record(self) -> dict[str, Any]:
        """The first record in file order (for checks; the position does not move)."""
        raise NotImplementedError

    def where(self) -> str:
        """Where the last record read is, for messages."""
        return "the last record read"

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class ParquetShardsSource(StreamSource):
    """A folder or glob of Parquet shards read shard by shard, one row group at a time.

    Each epoch visits the shards in an order drawn from `(seed, epoch)`; row group u of that walk
    belongs to rank `u % world`, and its rows are read in an order drawn from `(seed, epoch,
    shard, group)`. Only the footers (row-group counts) of the shards walked so far are kept,
    never an index of the records. Position: epoch, shard (in the epoch's order), row group, row,
    and the walk's row-group counter.
    """

    def __init__(self, name: str, paths: Sequence[Path]) -> None:
        if not paths:
            raise ValueError(f"data source {name}: no .parquet files")
        self.name = name
        self.paths = [Path(p) for p in paths]
        self._groups: dict[int, list[int]] = {}  # shard -> rows per row group (footers)
        self._rows: tuple[tuple[int, int, int], list[dict[str, Any]], np.ndarray] | None = None
        self.epoch = self.shard = self.group = self.row = self.unit = 0
        self._last = ""

    def _group_sizes(self, shard: int) -> list[int]:
        if shard not in self._groups:
            import pyarrow.parquet as pq  # optional dependency (the [train] extra)

            meta = pq.ParquetFile(self.paths[shard]).metadata
            self._groups[shard] = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return self._groups[shard]

    def __len__(self) -> int:
        """Rows in all shards (from their footers; no row is read)."""
        return sum(sum(self._group_sizes(i)) for i in range(len(self.paths)))

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 11, epoch]).permutation(len(self.paths))

    def _seek(self) -> None:
        """Move to the next row (group) of this rank, from the current position."""
        empty_epochs = 0
        while True:
            order = self._order(self.epoch)
            if self.shard >= len(order):
                self.epoch, self.shard, self.group, self.row = self.epoch + 1, 0, 0, 0
                empty_epochs += 1
                if empty_epochs > 1:
                    groups = sum(len(self._group_sizes(i)) for i in range(len(self.paths)))
                    raise ValueError(
                        f"data source {self.name}: no rows for rank {self.rank} of {self.world} "
                        f"({groups} non-empty row group(s) in all; each rank needs one: write "
                        "smaller row groups or more shards)"
                    )
                continue
            sizes = self._group_sizes(int(order[self.shard]))
            if self.group >= len(sizes):
                self.shard, self.group, self.row = self.shard + 1, 0, 0
                continue
            if sizes[self.group] and self.unit % self.world == self.rank:
                if self.row < sizes[self.group]:
                    empty_epochs = 0
                    return
            if sizes[self.group]:
                self.unit += 1  # the walk counts non-empty row groups only
            self.group, self.row = self.group + 1, 0

    def next_record(self) -> dict[str, Any]:
        self._seek()
        shard = int(self._order(self.epoch)[self.shard])
        key = (self.epoch, shard, self.group)
        if self._rows is None or self._rows[0] != key:
            import pyarrow.parquet as pq  # optional dependency (the [train] extra)

            rows = pq.ParquetFile(self.paths[shard]).read_row_group(self.group).to_pylist()
            perm = np.random.default_rng([self.seed, 12, *key]).permutation(len(rows))
            self._rows = (key, rows, perm)
        _, rows, perm = self._rows
        index = int(perm[self.row])
        self._last = f"{self.paths[shard]}: row group {self.group + 1} row {index + 1}"
        self.row += 1
        return rows[index]

    def first_record(self) -> dict[str, Any]:
        import pyarrow.parquet as pq  # optional dependency (the [train] extra)

        for path in self.paths:
            handle = pq.ParquetFile(path)
            for group in range(handle.num_row_groups):
                if handle.metadata.row_group(group).num_rows:
                    return handle.read_row_group(group).slice(0, 1).to_pylist()[0]
        raise ValueError(f"data source {self.name} has no records")

    def where(self) -> str:
        return self._last or "the first row"

    def state_dict(self) -> dict[str, Any]:
        keys = ("epoch", "shard", "group", "row", "unit")
        return {"parquet_shards": len(self.paths), **{k: getattr(self, k) for k in keys}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("parquet_shards", len(self.paths))) != len(self.paths):
            raise ValueError(
                f"data source {self.name}: the checkpoint read {state['parquet_shards']} shards, "
                f"the folder now holds {len(self.paths)}: the data changed since the checkpoint"
            )
        for key in ("epoch", "shard", "group", "row", "unit"):
            setattr(self, key, int(state[key]))


_STREAM_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}


class HFStreamSource(StreamSource):
    """Local files streamed by `datasets.load_dataset(..., streaming=True)`, in file order;
    `split_dataset_by_node` gives each rank its part; the position is the dataset's own
    `state_dict` and the epoch."""

    def __init__(self, name: str, files: Sequence[Path]) -> None:
        suffixes = {f.suffix.lower() for f in files}
        if not files or len(suffixes) != 1 or next(iter(suffixes)) not in _STREAM_BUILDERS:
            kinds = ", ".join(sorted(suffixes)) or "no files"
            raise ValueError(
                f"data source {name}: streaming reads files of one kind among "
                f"{', '.join(_STREAM_BUILDERS)} (found: {kinds})"
            )
        self.name = name
        self.files = [str(f) for f in files]
        self.builder = _STREAM_BUILDERS[next(iter(suffixes))]
        self.epoch = 0
        self._ds: Any = None
        self._it: Any = None
        # Where the next iterator starts (the dataset reports it only once iterating).
        self._pending: dict[str, Any] | None = None

    def _dataset(self) -> Any:
        if self._ds is None:
            import datasets  # optional dependency (the [train] extra)
            from datasets.distributed import split_dataset_by_node

            ds = datasets.load_dataset(
                self.builder, data_files=self.files, split="train", streaming=True
            )
            if self.world > 1:
                ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
            self._ds = ds
            self._start = copy.deepcopy(ds.state_dict())  # an epoch starts here
            self._pending = copy.deepcopy(self._start)
        return self._ds

    def next_record(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                ds = self._dataset()
                ds.set_epoch(self.epoch)
                ds.load_state_dict(copy.deepcopy(self._pending))
                self._it = iter(ds)
                self._pending = None
            try:
                return dict(next(self._it))
            except StopIteration:  # the next epoch starts from the beginning
                self.epoch += 1
                self._it = None
                self._pending = copy.deepcopy(self._start)
        raise ValueError(f"data source {self.name} has no records for rank {self.rank}")

    def first_record(self) -> dict[str, Any]:
        import datasets  # optional dependency (the [train] extra)

        ds = datasets.load_dataset(
            self.builder, data_files=self.files, split="train", streaming=True
        )
        for record in ds:
            return dict(record)
        raise ValueError(f"data source {self.name} has no records")

    def where(self) -> str:
        return f"a record of epoch {self.epoch + 1}"

    def state_dict(self) -> dict[str, Any]:
        ds = self._dataset()
        position = self._pending if self._it is None else ds.state_dict()
        return {"epoch": self.epoch, "datasets": copy.deepcopy(position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._dataset()
        self.epoch = int(state["epoch"])
        self._pending = copy.deepcopy(state["datasets"])
        self._it = None


def _paragraphs(text: str) -> list[str]:
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def _read_utf8(path: Path) -> str:
    """A text file's content; not UTF-8 is a `BadRecordError` naming the file and 1-based line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadRecordError(
            f"{path}: line {line} is not valid UTF-8 (byte {raw[exc.start]:#04x})"
        ) from None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def open_source(config: SourceConfig) -> RecordSource:
    """Open the source a `[[data.sources]]` table names; errors name the path and the problem."""
    spec = config.path
    if is_embedded(spec):
        return ListSource(spec, resolve_embedded(spec, "source"))
    path = Path(spec).expanduser()
    if is_glob(spec):
        files = [Path(f) for f in sorted(globlib.glob(str(path), recursive=True))]
        files = [f for f in files if f.is_file()]
        if not files:
            raise FileNotFoundError(f"data source {spec} matches no file")
        if config.streaming:
            return HFStreamSource(spec, files)
        if any(f.suffix.lower() != ".parquet" for f in files):
            raise ValueError(
                f"data source {spec}: a glob reads .parquet shards (or any files with "
                "streaming = true)"
            )
        return ParquetShardsSource(spec, files)
    if not path.exists():
        raise FileNotFoundError(f"data source {spec} does not exist")
    if config.streaming:
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        files = [f for f in files if f.suffix.lower() in _STREAM_BUILDERS]
        return HFStreamSource(spec, files)
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            return HFDatasetSource(path)
        shards = sorted(path.rglob("*.parquet"))
        if shards:
            return ParquetShardsSource(spec, shards)
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(
                f"data source {spec} is a folder that is neither a datasets save_to_disk folder "
                "(no dataset_info.json) nor a folder of .parquet shards or .txt files"
            )
        return ListSource(spec, [{"text": _read_utf8(f)} for f in files])
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return JsonLinesSource(path)
    if suffix == ".parquet":
        return ParquetSource(path)
    if suffix == ".txt":
        return ListSource(spec, [{"text": p} for p in _paragraphs(_read_utf8(path))])
    raise ValueError(
        f"data source {spec}: unsupported file type {suffix or '(none)'}; "
        "use .jsonl, .json, .parquet, .txt, a folder, or an embedded: corpus"
    )


def is_glob(spec: str) -> bool:
    """Whether a source path is a glob pattern (`*`, `?` or `[`)."""
    return any(c in spec for c in "*?[")


def source_exists(spec: str) -> bool:
    """Whether a source path names something: an embedded corpus, a path, a matching glob."""
    if is_embedded(spec):
        return True
    if is_glob(spec):
        return any(globlib.iglob(str(Path(spec).expanduser()), recursive=True))
    return Path(spec).expanduser().exists()


def check_sources(
    configs: Sequence[SourceConfig],
    *,
    fields: Sequence[str],
    skip_bad_records: bool = False,
    full_check_bytes: int = FULL_CHECK_BYTES,
    log: Any = None,
) -> list[RecordSource]:
    """Open every source and check it is non-empty and its first record has `fields`.

    JSON Lines files up to `full_check_bytes` are read whole: a bad record anywhere is an error
    naming the file and line (with `skip_bad_records`, a count passed to `log`). Run before
    training starts so a bad path, field or record fails in seconds, not mid-run.
    """
    sources = []
    for config in configs:
        source = open_source(config)
        if isinstance(source, StreamSource):  # checked on its first record, then as it streams
            first = source.first_record()
            missing = [f for f in fields if f not in first]
            if missing:
                raise ValueError(
                    f"data source {config.path}: records lack field(s) {', '.join(missing)} "
                    f"(first record has: {', '.join(sorted(first)) or 'nothing'})"
                )
            source.name = config.name or config.path
            sources.append(source)
            continue
        if len(source) == 0:
            raise ValueError(f"data source {config.path} has no records")
        scanned = (
            isinstance(source, JsonLinesSource) and source.path.stat().st_size <= full_check_bytes
        )
        if not (skip_bad_records and scanned):
            first = source[0]
            missing = [f for f in fields if f not in first]
            if missing:
                raise ValueError(
                    f"data source {config.path}: records lack field(s) {', '.join(missing)} "
                    f"(first record has: {', '.join(sorted(first)) or 'nothing'})"
                )
        if scanned:
            problems = source.scan(fields)
            if problems and not skip_bad_records:
                more = f" ({len(problems)} bad records in all)" if len(problems) > 1 else ""
                raise BadRecordError(
                    f"{problems[0]}{more}; fix the data or set data.skip_bad_records = true"
                )
            if problems and len(problems) == len(source):
                raise ValueError(f"data source {config.path}: every record is bad: {problems[0]}")
            if problems and log is not None:
                log(
                    f"data source {config.path}: {len(problems)} bad record(s) will be skipped "
                    f"(first: {problems[0]})"
                )
        source.name = config.name or config.path
        sources.append(source)
    return sources


# --------------------------------------------------------------------------------------------
# Deterministic sampling shared by both batch streams
# --------------------------------------------------------------------------------------------


class _Mixture:
    """The choice of a source per draw and the next record of each source.

    A random-access source is read in a fresh permutation per epoch (every `world`-th entry from
    `rank` when the stream is read per rank); a streamed one in its own order. `choose_source`
    draws by weight (a contrastive batch); `choose_by_tokens` keeps each source at its weight's
    share of the tokens (`tokens`, `docs`: what each source gave so far).
    """

    def __init__(
        self,
        sources: Sequence[RecordSource | StreamSource],
        weights: Sequence[float],
        seed: int,
        *,
        rank: int = 0,
        world: int = 1,
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError("need one weight per source and at least one source")
        self.sources = list(sources)
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = int(seed)
        self.per_rank = any(isinstance(s, StreamSource) for s in sources)
        self.rank, self.world = (int(rank), int(world)) if self.per_rank else (0, 1)
        for source in self.sources:
            if isinstance(source, StreamSource):
                source.set_rank(self.rank, self.world, self.seed)
        self.draws = 0
        self.epochs = [0] * len(sources)
        self.cursors = [0] * len(sources)
        self.tokens = [0] * len(sources)
        self.docs = [0] * len(sources)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _rng(self, *parts: int) -> np.random.Generator:
        rank = [self.rank] if self.per_rank else []  # each rank its own draws
        return np.random.default_rng([self.seed, *parts, *rank])

    def choose_source(self) -> int:
        """A source drawn by weight."""
        if len(self.sources) == 1:
            choice = 0
        else:
            choice = int(self._rng(0, self.draws).choice(len(self.sources), p=self.probs))
        self.draws += 1
        return choice

    def choose_by_tokens(self) -> int:
        """The source of the next document, so that each gives its weight's share of tokens.

        A source behind its share by more than one of its mean documents is taken (the most
        behind, counted in its documents); otherwise one is drawn with odds weight / mean
        document length (the mean of the others' before its first document).
        """
        n = len(self.sources)
        if n == 1:
            choice = 0
        else:
            total = sum(self.tokens)
            known = [t / d for t, d in zip(self.tokens, self.docs) if d]
            default = sum(known) / len(known) if known else 1.0
            means = [t / d if d else default for t, d in zip(self.tokens, self.docs)]
            lag = [(p * total - t) / m for p, t, m in zip(self.probs, self.tokens, means)]
            worst = max(range(n), key=lambda i: lag[i])
            if lag[worst] > 1.0:
                choice = worst
            else:
                odds = self.probs / np.asarray(means)
                choice = int(self._rng(0, self.draws).choice(n, p=odds / odds.sum()))
        self.draws += 1
        return choice

    def shares(self) -> dict[str, float]:
        """Each source's share of the tokens drawn so far (by name)."""
        total = sum(self.tokens)
        return {s.name: (t / total if total else 0.0) for s, t in zip(self.sources, self.tokens)}

    def next_index(self, source: int) -> int:
        n = len(self.sources[source])
        epoch = self.epochs[source]
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, 1 + source, epoch])
            cached = (epoch, rng.permutation(n))
            self._perms[source] = cached
        position = self.cursors[source] * self.world + self.rank
        index = int(cached[1][position if position < n else self.rank % n])
        self.cursors[source] += 1
        if self.cursors[source] * self.world + self.rank >= n:
            self.epochs[source] += 1
            self.cursors[source] = 0
        return index

    def next_ref(self, source: int) -> Any:
        """What names the next record of `source` (`read` reads it): an index, or the position of
        a streamed source before it."""
        src = self.sources[source]
        if isinstance(src, StreamSource):
            return copy.deepcopy(src.state_dict())
        return self.next_index(source)

    def read(self, source: int, ref: Any, *, again: bool = False) -> dict[str, Any]:
        """The record `ref` names; `again`: re-read a streamed record without moving on."""
        src = self.sources[source]
        if not isinstance(src, StreamSource):
            return src[ref]
        if not again:
            return src.next_record()
        here = copy.deepcopy(src.state_dict())
        src.load_state_dict(ref)
        try:
            return src.next_record()
        finally:
            src.load_state_dict(here)

    def where(self, source: int, ref: Any) -> str:
        src = self.sources[source]
        return src.where() if isinstance(src, StreamSource) else src.where(ref)

    def state_dict(self) -> dict[str, Any]:
        streams = [s.state_dict() if isinstance(s, StreamSource) else None for s in self.sources]
        return {
            "draws": self.draws,
            "epochs": list(self.epochs),
            "cursors": list(self.cursors),
            "tokens": list(self.tokens),
            "docs": list(self.docs),
            "streams": streams,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["epochs"]) != len(self.sources):
            raise ValueError(
                f"data state has {len(state['epochs'])} sources but the config has "
                f"{len(self.sources)}: the data mixture changed since the checkpoint"
            )
        n = len(self.sources)
        self.draws = int(state["draws"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.cursors = [int(c) for c in state["cursors"]]
        self.tokens = [int(t) for t in state.get("tokens", [0] * n)]
        self.docs = [int(d) for d in state.get("docs", [0] * n)]
        for source, stream in zip(self.sources, state.get("streams") or [None] * n):
            if isinstance(source, StreamSource) != (stream is not None):
                raise ValueError(
                    f"data source {source.name}: the checkpoint read it "
                    f"{'as a stream' if stream is not None else 'by index'}: the data changed"
                )
            if stream is not None:
                source.load_state_dict(stream)


# --------------------------------------------------------------------------------------------
# Packed token batches (causal, MNTP)
# --------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """`input_ids [T]` int64 holding sequences delimited by `cu_seqlens [N+1]` int32."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def tokenize_document(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one document: the tokenizer's special tokens, and EOS at the end."""
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


class PackedBatches:
    """Micro-batches of exactly `tokens_per_batch` tokens; each source gives its weight's share
    of the tokens. With a streamed source the stream is this rank's own (`per_rank`): build it
    with `rank` and `world` and do not deal its batches to the ranks."""

    def __init__(
        self,
        sources: Sequence[RecordSource | StreamSource],
        weights: Sequence[float],
        tokenizer: Any,
        *,
        tokens_per_batch: int,
        max_seq_len: int,
        seed: int,
        text_fields: Sequence[str] | None = None,
        skip_bad_records: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self._mix = _Mixture(sources, weights, seed, rank=rank, world=world)
        self.skip_bad_records = bool(skip_bad_records)
        self.bad_records = 0  # skipped so far (with skip_bad_records)
        self.first_bad: str | None = None
        self.tokenizer = tokenizer
        self.tokens_per_batch = int(tokens_per_batch)
        self.max_seq_len = int(max_seq_len)
        self.text_fields = list(text_fields or ["text"] * len(sources))
        # The document being consumed: (source, ref, tokens, offset of the next token); `ref`
        # names the record (`_Mixture.next_ref`).
        self._pending: tuple[int, Any, list[int], int] | None = None

    @property
    def per_rank(self) -> bool:
        """True when this stream is one rank's own (a streamed source), not a global one."""
        return self._mix.per_rank

    def token_counts(self) -> dict[str, int]:
        """Tokens each source gave so far (by name)."""
        return {s.name: t for s, t in zip(self._mix.sources, self._mix.tokens)}

    def token_shares(self) -> dict[str, float]:
        """Each source's realised share of the tokens so far (by name)."""
        return self._mix.shares()

    def _draw_document(self) -> tuple[int, Any, list[int]]:
        for _ in range(10_000):  # skip empty documents, but not forever
            source = self._mix.choose_by_tokens()
            ref = self._mix.next_ref(source)
            tokens = self._tokens(source, ref)
            if len(tokens) > 0:
                self._mix.docs[source] += 1
                return source, ref, tokens
        raise ValueError("10000 documents in a row tokenized to nothing: are the sources empty?")

    def _tokens(self, source: int, ref: Any, *, again: bool = False) -> list[int]:
        src = self._mix.sources[source]
        field = self.text_fields[source]
        try:
            record = self._mix.read(source, ref, again=again)
            problem = record_problem(record, (field,))
            if problem is not None:
                where = self._mix.where(source, ref)
                raise BadRecordError(f"data source {src.name}: {where} {problem}")
        except BadRecordError as exc:
            if not self.skip_bad_records:
                raise
            self.bad_records += 1
            self.first_bad = self.first_bad or str(exc)
            return []  # skipped like an empty document
        text = record[field]
        return tokenize_document(self.tokenizer, text) if text.strip() else []

    def next_batch(self) -> PackedBatch:
        ids: list[int] = []
        lengths: list[int] = []
        room = self.tokens_per_batch
        while room > 0:
            if self._pending is None:
                source, index, tokens = self._draw_document()
                self._pending = (source, index, tokens, 0)
            source, index, tokens, offset = self._pending
            take = min(room, self.max_seq_len, len(tokens) - offset)
            ids.extend(tokens[offset : offset + take])
            self._mix.tokens[source] += take
            lengths.append(take)
            room -= take
            offset += take
            self._pending = None if offset == len(tokens) else (source, index, tokens, offset)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return PackedBatch(torch.tensor(ids, dtype=torch.long), cu, max(lengths))

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else list(self._pending[:2]) + [self._pending[3]]
        return {
            "mixture": self._mix.state_dict(),
            "pending": pending,
            "bad_records": self.bad_records,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mix.load_state_dict(state["mixture"])
        self.bad_records = int(state.get("bad_records", 0))
        self._pending = None
        if state.get("pending") is not None:
            source, ref, offset = state["pending"]
            source, offset = int(source), int(offset)
            ref = ref if isinstance(ref, dict) else int(ref)
            self._pending = (source, ref, self._tokens(source, ref, again=True), offset)


# --------------------------------------------------------------------------------------------
# Contrastive batches
# --------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """`queries[i]` matches `positives[i]`; `negatives` holds each query's hard negatives, query
    after query: query i's are `negatives_of(i)`. All from one dataset (`dataset`).

    `negative_counts[i]` is query i's count (None: every query has `negatives_per_query`, query
    i's at `negatives[i*k : (i+1)*k]`); `negatives_per_query` is the largest count. Counts may
    differ: the fused InfoNCE makes every document of the batch a negative of every query, so a
    query with fewer hard negatives only adds fewer documents (no padding, no duplicates).
    """

    queries: list[str]
    positives: list[str]
    negatives: list[str]
    negatives_per_query: int
    dataset: str
    negative_counts: list[int] | None = None

    def counts(self) -> list[int]:
        """Hard negatives per query."""
        if self.negative_counts is not None:
            return list(self.negative_counts)
        return [self.negatives_per_query] * len(self.queries)

    def negatives_of(self, i: int) -> list[str]:
        """Query i's hard negatives."""
        counts = self.counts()
        start = sum(counts[:i])
        return self.negatives[start : start + counts[i]]

    def shard(self, rank: int, world: int) -> PairBatch:
        """The contiguous slice of this batch that rank `rank` of `world` embeds."""
        n = len(self.queries)
        if n % world:
            raise ValueError(f"batch of {n} pairs does not split evenly over {world} ranks")
        lo, hi = rank * n // world, (rank + 1) * n // world
        counts = self.counts()
        start, end = sum(counts[:lo]), sum(counts[:hi])
        return PairBatch(
            self.queries[lo:hi],
            self.positives[lo:hi],
            self.negatives[start:end],
            max(counts[lo:hi], default=0),
            self.dataset,
            None if self.negative_counts is None else counts[lo:hi],
        )


class PairBatches:
    """Contrastive batches: one dataset per batch (chosen by weight), `batch_size` pairs each.

    Every query gets the dataset's `instruction` as prefix; a `symmetric` dataset (STS, pair
    classification) puts it on both sides: the positives and hard negatives too. Each example
    contributes its first
    `negatives_per_query` hard negatives, or all it has when it has fewer: a record with fewer
    negatives never drops those of the rest of the batch (`PairBatch.negative_counts`).
    """

    def __init__(
        self,
        sources: Sequence[RecordSource],
        weights: Sequence[float],
        *,
        batch_size: int,
        seed: int,
        negatives_per_query: int = 1,
        instructions: Sequence[str] | None = None,
        symmetric: Sequence[bool] | None = None,
        skip_bad_records: bool = False,
    ) -> None:
        self._mix = _Mixture(sources, weights, seed)
        self.skip_bad_records = bool(skip_bad_records)
        self.bad_records = 0  # skipped so far (with skip_bad_records)
        self.first_bad: str | None = None
        self.batch_size = int(batch_size)
        self.negatives_per_query = int(negatives_per_query)
        self.instructions = list(instructions or [""] * len(sources))
        self.symmetric = [bool(v) for v in (symmetric or [False] * len(sources))]
        if len(self.instructions) != len(sources) or len(self.symmetric) != len(sources):
            raise ValueError("need one instruction and one symmetric flag per source")

    def _record(self, source: int) -> dict[str, Any]:
        src = self._mix.sources[source]
        # with skip_bad_records: at most one epoch of skips (a stream: 10000 records)
        tries = 10_000 if isinstance(src, StreamSource) else max(len(src), 1)
        for _ in range(tries):
            ref = self._mix.next_ref(source)
            try:
                record = self._mix.read(source, ref)
                problem = record_problem(record, CONTRASTIVE_FIELDS)
                if problem is not None:
                    where = self._mix.where(source, ref)
                    raise BadRecordError(f"data source {src.name}: {where} {problem}")
                path = getattr(src, "path", None)  # media paths relative to the data file
                return localize(record, Path(path).parent if path is not None else None)
            except BadRecordError as exc:
                if not self.skip_bad_records:
                    raise
                self.bad_records += 1
                self.first_bad = self.first_bad or str(exc)
        raise ValueError(f"data source {src.name}: every record is bad ({self.first_bad})")

    def next_batch(self) -> PairBatch:
        source = self._mix.choose_source()
        records = [self._record(source) for _ in range(self.batch_size)]
        kept = [(r.get("negatives") or [])[: self.negatives_per_query] for r in records]
        counts = [len(n) for n in kept]
        prefix = self.instructions[source]

        def instruct(text: Any) -> Any:  # media items ({"image": ...}) take no prefix
            return prefix + text if isinstance(text, str) else text

        def document(text: Any) -> Any:
            return instruct(text) if self.symmetric[source] else text

        return PairBatch(
            queries=[instruct(r["query"]) for r in records],
            positives=[document(r["positive"]) for r in records],
            negatives=[document(n) for negatives in kept for n in negatives],
            negatives_per_query=max(counts, default=0),
            negative_counts=counts,
            dataset=self._mix.sources[source].name,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": self._mix.state_dict(), "bad_records": self.bad_records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mix.load_state_dict(state["mixture"])
        self.bad_records = int(state.get("bad_records", 0))


def pack_texts(
    tokenizer: Any, texts: Sequence[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenize texts (special tokens on, truncated to `max_len`) into one packed sequence batch:
    `(input_ids [T], cu_seqlens [N+1] int32, max_seqlen)`."""
    if not texts:
        raise ValueError("pack_texts needs at least one text")
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_len)
    seqs = [ids if ids else [tokenizer.eos_token_id or 0] for ids in encoded["input_ids"]]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids, cu, int(lengths.max())
