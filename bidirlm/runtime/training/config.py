"""Training configs: TOML (stdlib `tomllib`) parsed into typed dataclasses, with `--set` overrides.

The machinery is generic so other config families (recipes, pipelines, merges) reuse it:

- `parse_dataclass(cls, data, path="")` builds a dataclass from a plain dict, checking every value
  against the field's type annotation (nested dataclasses, `list[...]`, `tuple[...]`,
  `X | None`, `Literal[...]`) and raising `ValueError` that names the dotted key. An unknown key
  is an error listing the valid ones.
- `apply_overrides(data, overrides)` applies `a.b=value` strings to the raw dict before parsing.
  Values are read as TOML values when they parse as one (`3`, `1e-3`, `true`, `"x"`, `[1, 2]`)
  and as bare strings otherwise (`train.output=runs/a`), so the dataclass field decides the type.
- `to_dict(obj)` turns a dataclass back into TOML-compatible plain data (None fields dropped).

The training config itself is `TrainConfig`; see `examples/tiny-*.toml` for complete files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import torch

from bidirlm.runtime.embedded.names import is_embedded

from .registry import get_phase
from .task_config import TaskConfig, resolve_dev_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Generic machinery
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


class Override:
    """A `--set` value: the raw text and its TOML reading; the field's type picks one.

    A string field takes the raw text (so `train.output=2024` is the folder "2024"), any other
    field the parsed value.
    """

    __slots__ = ("raw", "parsed")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.parsed = _parse_value(raw)

    def __repr__(self) -> str:
        return repr(self.parsed)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check/convert `value` against the annotation `tp`; `path` names the key in errors."""
    if isinstance(value, Override):
        wants_text = tp is str or (
            typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)
        )
        value = value.raw if wants_text and not isinstance(value.parsed, str) else value.parsed
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{path}: a value is required")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ValueError as exc:
                errors.append(str(exc).removeprefix(f"{path}: "))
        raise ValueError(f"{path}: {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ValueError(f"{path}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a table, got {type(value).__name__}")
        return parse_dataclass(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a table, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # TOML reads `inf` and `nan`: a non-finite setting would train (or merge) to NaNs
            if not math.isfinite(value):
                raise ValueError(f"{path}: must be a finite number, got {value!r}")
            return float(value)
        raise ValueError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def parse_dataclass(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`, checking types; unknown keys list the valid ones.

    Fields without a default must be present. `path` is the dotted prefix used in messages.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{path}]" if path else "the top level"
        raise ValueError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(_join(path, k) for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"missing required key {key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise ValueError(f"{path or 'config'}: {exc}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_value(text: str) -> Any:
    """A TOML scalar/array when `text` parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw config dict in place and return it.

    Missing intermediate tables are created; whether the final key is valid is checked later by
    `parse_dataclass`, which lists the valid keys.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):  # `data.sources.0.path=...` indexes an array of tables
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"override {item!r}: {where} is not an index of the list")
                if last:
                    node[int(part)] = Override(raw.strip())
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = Override(raw.strip())
                else:
                    node = node.setdefault(part, {})
            else:
                raise ValueError(f"override {item!r}: {where[: -len(part) - 1]} is a value")
    return data


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain data that `tomllib`/`json` round-trip (None values are dropped)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if value is not None:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_toml(data: dict[str, Any]) -> str:
    """Write plain config data (as produced by `to_dict`) as TOML that `tomllib` reads back."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _emit_table(data: dict[str, Any], prefix: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _is_table_array(v)}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.extend(["", f"[{'.'.join([*prefix, key])}]"])
            _emit_table(value, [*prefix, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{'.'.join([*prefix, key])}]]"])
                _emit_table(item, [*prefix, key], lines)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None


# --------------------------------------------------------------------------------------------
# The training config
# --------------------------------------------------------------------------------------------


def check_device(device: str, key: str) -> None:
    """`auto`, `cpu`, `cuda`, `cuda:N`, `mps`...: a device torch can name (ValueError naming `key`).

    Whether that device exists on this machine is checked when the run starts.
    """
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{key}: {device!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None


@dataclass
class SourceConfig:
    """One data source of a mixture.

    `path` is a file or folder (`.jsonl`/`.json` JSON Lines, `.parquet`, `.txt`, a folder written
    by `datasets.Dataset.save_to_disk`, or a folder of `.txt` files) or an embedded corpus:
    `embedded:python-docs`, `embedded:python-code`, `embedded:python-pairs` (contrastive).
    Relative paths written in a config file are resolved against that file's folder (by
    `load_train_config`); a path given with `--set data.sources.N.path=...` is relative to the
    working directory, like any command-line path.
    """

    path: str
    # Causal/MNTP: the share of the TOKENS this source gives (weights 4:1 = 80% / 20% of the
    # tokens whatever the document lengths). Contrastive: the share of the batches.
    weight: float = 1.0
    text_field: str = "text"  # pretraining phases: the field holding the document
    instruction: str = ""  # contrastive: prefix of every query of this dataset
    symmetric: bool = False  # contrastive: the instruction on both sides (STS, pairs), not queries
    # Read as a stream (`datasets` streaming over local files: .jsonl/.json/.parquet/.csv/.txt, a
    # folder or a glob), each rank its own part; a folder or glob of .parquet shards streams
    # without this.
    streaming: bool = False
    name: str = ""  # shown in logs; defaults to the path

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"weight of source {self.path!r} must be > 0, got {self.weight}")


# Token budgets of the BidirLM paper's MNTP runs: `train.token_budget = "ablation"` or "scaling".
TOKEN_BUDGETS: dict[str, int] = {"ablation": 10_000_000_000, "scaling": 30_000_000_000}


@dataclass
class TrainSection:
    output: str
    steps: int = 0  # required unless train.token_budget sets it
    checkpoint_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 2
    seed: int = 0
    grad_accum: int = 1
    # The global batch of one optimizer step; the accumulation is derived from it at launch
    # (`training.batching`): causal/MNTP tokens (a multiple of data.tokens_per_batch x world
    # size), contrastive pairs (a multiple of data.batch_size). 0: `grad_accum` as given.
    tokens_per_step: int = 0
    pairs_per_step: int = 0
    # Tokens in all (causal/MNTP, with tokens_per_step): steps = ceil(budget / tokens_per_step)
    # when train.steps is not given. "ablation" = 10B, "scaling" = 30B tokens (the paper's runs).
    token_budget: int | Literal["ablation", "scaling"] = 0
    # Run monitoring beside metrics.jsonl: TensorBoard event files under OUTPUT/tensorboard when
    # the `tensorboard` package is installed; Weights & Biases when asked (needs `wandb`).
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bidirlm"
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    log_every: int = 1  # console: one line (or progress-bar update) every N steps; 0: none
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast dtype
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    gradient_checkpointing: bool = False
    progress_bar: bool = True  # a tqdm bar when stderr is a terminal (else one line per log)
    # Resuming with a config that differs from OUTPUT/config.toml is refused unless this is
    # true; the change is then recorded in OUTPUT/config-changes.jsonl.
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        for key in ("tokens_per_step", "pairs_per_step"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.tokens_per_step and self.pairs_per_step:
            raise ValueError("set train.tokens_per_step or train.pairs_per_step, not both")
        if (self.tokens_per_step or self.pairs_per_step) and self.grad_accum != 1:
            raise ValueError(
                "set train.tokens_per_step / train.pairs_per_step or train.grad_accum, not both "
                "(the accumulation is derived from the step's size)"
            )
        budget = self.budget_tokens
        if budget < 0:
            raise ValueError(f"train.token_budget must be >= 0, got {self.token_budget}")
        if budget and not self.tokens_per_step:
            raise ValueError("train.token_budget needs train.tokens_per_step (tokens per step)")
        if budget and self.steps == 0:  # an explicit train.steps wins (short trial runs)
            self.steps = -(-budget // self.tokens_per_step)
        if self.steps < 1:
            raise ValueError(
                f"train.steps must be >= 1, got {self.steps} (or set train.token_budget)"
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"train.seed must be in [0, 2**63), got {self.seed}")
        if self.log_every < 0:
            raise ValueError(f"train.log_every must be >= 0, got {self.log_every}")
        check_device(self.device, "train.device")
        if self.checkpoint_every < 0:
            raise ValueError("train.checkpoint_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError("train.keep_checkpoints must be >= 1")
        if self.grad_accum < 1:
            raise ValueError("train.grad_accum must be >= 1")
        if self.max_nonfinite_steps < 1:
            raise ValueError("train.max_nonfinite_steps must be >= 1")

    @property
    def budget_tokens(self) -> int:
        """`token_budget` in tokens (a preset name read from `TOKEN_BUDGETS`; 0: none)."""
        budget = self.token_budget
        return TOKEN_BUDGETS[budget] if isinstance(budget, str) else int(budget)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["wsd", "cosine", "constant", "linear"] = "wsd"
    warmup_steps: int = 0
    # Warmup as a fraction of train.steps (the paper's MNTP: 0.01 epoch, one pass over the
    # budget = 1% of the steps); set this or warmup_steps.
    warmup_fraction: float = 0.0
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    fused: Literal["auto"] | bool = "auto"  # fused AdamW; auto: on GPU

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError("optim.decay_fraction must be in [0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("optim.min_lr_ratio must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.warmup_fraction and self.warmup_steps:
            raise ValueError("set optim.warmup_steps or optim.warmup_fraction, not both")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` (warmup_fraction rounded, or warmup_steps)."""
        if self.warmup_fraction:
            return max(1, round(self.warmup_fraction * total_steps))
        return self.warmup_steps


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    tokens_per_batch: int = 4096  # causal/mntp: packed tokens per micro-batch (no padding)
    max_seq_len: int = 512  # longer documents are split into pieces of this length
    batch_size: int = 32  # contrastive: (query, positive) pairs per micro-batch
    query_max_len: int = 64  # contrastive: token limits
    document_max_len: int = 256
    negatives_per_query: int = 1  # contrastive: hard negatives taken from each example (<=)
    # A JSON Lines record that is not valid JSON (or UTF-8), not an object, or lacks its text
    # fields is an error naming the file and line; true skips such records and counts them.
    skip_bad_records: bool = False
    # causal/MNTP: every N steps the metrics row (and the log) carries each source's realised
    # share of the tokens so far (`token_shares`); 0: never.
    log_shares_every: int = 100

    def __post_init__(self) -> None:
        if self.log_shares_every < 0:
            raise ValueError("data.log_shares_every must be >= 0")
        if self.tokens_per_batch < 2:
            raise ValueError("data.tokens_per_batch must be >= 2")
        if self.max_seq_len < 2:
            raise ValueError("data.max_seq_len must be >= 2")
        if self.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        if self.negatives_per_query < 0:
            raise ValueError("data.negatives_per_query must be >= 0")


@dataclass
class MNTPConfig:
    mask_ratio: float = 0.2
    # The tokenizer's own mask token when it has one; otherwise this string, which must be one
    # existing vocabulary entry (Qwen3 and Gemma3 tokenizers have no mask token: "_" as in
    # LLM2Vec and BidirLM).
    mask_token: str = "_"

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mntp.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not self.mask_token:
            raise ValueError("mntp.mask_token must be a non-empty string")


@dataclass
class ContrastiveConfig:
    temperature: float = 0.05
    symmetric: bool = False
    pooling: Literal["mean", "last", "first"] = "mean"
    mini_batch_size: int = 0  # > 0: gradient cache with mini-batches of this many texts
    train_towers: bool = False  # omni models: also train the vision/audio towers (frozen)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError("contrastive.temperature must be > 0")
        if self.mini_batch_size < 0:
            raise ValueError("contrastive.mini_batch_size must be >= 0")


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when launched by torchrun with world > 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass
class HeldoutConfig:
    """An in-run held-out evaluation every `every` steps, logged beside the loss (`heldout/...`).

    Each of `sources` gives the causal-LM loss (causal attention, whatever the phase trains) of
    the current model on its first `tokens` tokens (the same tokens every time; named by the
    source's `name`). `tasks` are `bidirlm eval` tasks (retrieval sets, labelled classification
    files) scored by the evaluator handed to `trainer.train` (`bidirlm train` builds it from
    `bidirlm.runtime.evaluation`; training itself imports no evaluation code).
    """

    every: int = 0  # 0: no held-out evaluation
    sources: list[SourceConfig] = field(default_factory=list)
    tokens: int = 8192
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("heldout.every must be >= 0")
        if self.tokens < 2:
            raise ValueError("heldout.tokens must be >= 2")
        if self.every and not (self.sources or self.tasks):
            raise ValueError("heldout.every is set but heldout.sources and heldout.tasks are empty")


@dataclass
class TrainConfig:
    """A training run: `phase` on `model` with `data`, writing under `train.output`."""

    model: str  # Hugging Face folder or "embedded:tiny"
    phase: str  # a name in `training.registry.PHASES` (causal, mntp, contrastive, ...)
    train: TrainSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    task: TaskConfig = field(default_factory=TaskConfig)  # the fine-tuning phases
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)

    def __post_init__(self) -> None:
        get_phase(self.phase)  # a ValueError listing the registered phases
        if not self.data.sources:
            raise ValueError("data.sources is empty: add at least one [[data.sources]] table")

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `train_config_from_dict` reads back to an equal config."""
        return to_dict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


def train_config_from_dict(
    data: dict[str, Any], *, base_dir: str | Path | None = None
) -> TrainConfig:
    """Parse a raw dict into a `TrainConfig` (ValueError naming the key on any problem).

    `base_dir` resolves relative `train.output`, `model` and source paths (the config file's
    folder when loading a file); None leaves them as given (relative to the working directory).
    """
    config = parse_dataclass(TrainConfig, data)
    if base_dir is not None:
        base = Path(base_dir)
        config.train.output = _resolve(config.train.output, base)
        config.model = _resolve(config.model, base)
        for source in [*config.data.sources, *config.heldout.sources]:
            source.path = _resolve(source.path, base)
        if config.task.dev:
            config.task.dev = _resolve(config.task.dev, base)
    return config


def _resolve_source_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative `data.sources[*].path` strings of a raw config absolute from `folder`."""
    for table in ("data", "heldout"):
        section = data.get(table)
        sources = section.get("sources") if isinstance(section, dict) else None
        if isinstance(sources, list):
            _resolve_paths_of(sources, folder)


def _resolve_paths_of(sources: list[Any], folder: Path) -> None:
    for source in sources:
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            path = source["path"]
            if path and not is_embedded(path):
                expanded = Path(path).expanduser()
                if not expanded.is_absolute():
                    source["path"] = os.path.abspath(folder / expanded)


def _resolve(value: str, base: Path) -> str:
    if is_embedded(value):
        return value
    if Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser())
    return str(base / value)


def load_train_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """Read a TOML training config, apply `--set` style overrides, and parse it.

    Relative data source paths written in the file are resolved against the file's folder (a
    config and its data travel together); `train.output` and `model` are taken relative to the
    working directory, so `bidirlm train examples/x.toml` writes `runs/...` in the current
    directory. Values given as overrides are relative to the working directory. Raises
    FileNotFoundError for a missing file and ValueError for invalid TOML, unknown keys (listing
    the valid ones) or bad values.
    """
    data = read_toml(path)
    _resolve_source_paths(data, Path(path).parent)
    resolve_dev_path(data, Path(path).parent)
    apply_overrides(data, overrides)
    try:
        return train_config_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
