"""Recipes: phases chained in order, each output feeding the next, resumable.

A recipe is a TOML file with a ``[recipe]`` table and one table per phase, named in
``recipe.phases`` (order of execution)::

    [recipe]
    name = "qwen3-0.6b"
    base = "models/Qwen3-0.6B"        # the causal checkpoint to adapt (a local HF folder)
    output = "runs/bidirlm-qwen3-0.6b"
    phases = ["mntp", "merge", "contrastive"]

    [mntp]                            # kind = "train" (default): a `bidirlm train` config
    model = "@base"                   # "@base" or "@<earlier phase>": that phase's output
    phase = "mntp"
    ...                               # train.*, optim.*, data.*, mntp.* as in examples/*.toml

    [merge]
    kind = "merge"                    # linear merge (bidirlm.runtime.merging.merge)
    models = ["@mntp", "@base"]
    weights = [0.5, 0.5]

    [compose]
    kind = "compose"                  # bidirlm compose (the Omni recipe: omni-2.5b.toml)
    text = "@merge"                   # a reference or a folder, as vision and audio
    vision = "models/Qwen3-VL-2B-Instruct"
    audio = "models/Qwen3-ASR-1.7B"
    rope_from = "vision"              # optional: text | vision | audio (compose's default)

    [eval]
    kind = "eval"                     # retrieval evaluation (bidirlm.runtime.evaluation)
    model = "@contrastive"
    task = "embedded"                 # or a JSON Lines / BEIR retrieval set

Every phase writes under ``<recipe.output>/<phase name>/``: a train phase's model is
``.../final`` (its `train.output` defaults to the phase folder), a merge's and a compose's
``.../model``, an eval's ``.../metrics.json``. Models are written in the base's dtype
(``recipe.dtype = "auto"``; training keeps float32 master weights and its ``final`` is cast
back) unless ``recipe.dtype`` (or a merge's ``dtype``) asks for another. When a phase finishes,
``.../phase.json`` records a fingerprint of its resolved configuration (chained with its inputs'
fingerprints); a re-run skips phases whose record matches, resumes an interrupted train phase
from its latest checkpoint, and refuses to reuse a phase folder completed with a different
configuration. Before any work starts, the whole recipe is parsed and every input path (base
model, data sources, retrieval sets) is checked, so a typo fails in a second, not after hours of
training. The run report is written to ``<output>/report.json`` and ``<output>/report.md``.

`--set` overrides address the tables: ``recipe.base=...``, ``mntp.train.steps=100``.

Phase names are plain names (letters, digits, ``_``, ``-``, ``.``; not starting with a dot), so
every phase folder is a direct child of ``recipe.output``; a train phase's ``train.output``
must stay inside ``recipe.output`` too. MNTP phases use the tokenizer's mask token, else
``mntp.mask_token`` (default ``"_"``, as LLM2Vec and BidirLM do for Qwen3 and Gemma3, whose
tokenizers have none); ``check_inputs`` resolves it on the base tokenizer before any work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bidirlm.runtime.embedded import is_embedded, resolve_model_path
from bidirlm.runtime.evaluation import evaluate
from bidirlm.runtime.evaluation.in_run import task_evaluator
from bidirlm.runtime.jsonl import JsonLinesError, read_jsonl
from bidirlm.runtime.merging.compose import (
    _load_source as _compose_source,  # the compose checks of --check, without writing
)
from bidirlm.runtime.merging.compose import check_compatible as compose_checks
from bidirlm.runtime.merging.compose import compose_omni, policy_line, resolve_rope_from
from bidirlm.runtime.merging.merge import merge
from bidirlm.runtime.models import checkpoint as ckpt
from bidirlm.runtime.training import trainer
from bidirlm.runtime.training.batching import step_plan
from bidirlm.runtime.training.config import (
    SourceConfig,
    TrainConfig,
    apply_overrides,
    dumps_toml,
    parse_dataclass,
    read_toml,
    to_dict,
    train_config_from_dict,
)
from bidirlm.runtime.training.data import source_exists
from bidirlm.runtime.training.masking import check_mask_token
from bidirlm.runtime.training.mfu import DEVICE_CLASSES, PEAK_FLOPS, device_hours
from bidirlm.runtime.training.task_metrics import finite_or_none

PHASE_RECORD = "phase.json"
RECIPES_DIR = Path(__file__).resolve().parent
# A phase name becomes a folder name under recipe.output: no separators, no leading dot.
PHASE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RecipeError(ValueError):
    """A recipe that cannot run: bad keys, unknown references, missing inputs."""


@dataclass
class RecipeSection:
    """The ``[recipe]`` table."""

    name: str
    base: str  # a local Hugging Face folder or "embedded:tiny"
    output: str
    phases: list[str]
    description: str = ""
    # dtype of every model the pipeline writes: "auto" keeps the base's (a bf16 base gives bf16
    # phase outputs, although training keeps float32 master weights); or ask for one
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("recipe.phases is empty: list the phase tables to run, in order")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError(f"recipe.phases has duplicates: {self.phases}")
        reserved = {"recipe", "base"} & set(self.phases)
        if reserved:
            raise ValueError(f"recipe.phases: {sorted(reserved)} is a reserved name")
        for name in self.phases:
            if not isinstance(name, str) or not PHASE_NAME.match(name):
                raise ValueError(
                    f"recipe.phases: {name!r} is not a plain name (letters, digits, _, - and ., "
                    "not starting with a dot): each phase writes to recipe.output/<name>"
                )


@dataclass
class MergePhase:
    """A linear (or task-arithmetic) merge of earlier outputs, e.g. 50/50 with the base."""

    models: list[str]
    weights: list[float]
    method: Literal["linear", "task_arithmetic"] = "linear"
    base: str | None = None  # task_arithmetic only
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError("a merge needs at least two models")
        if len(self.weights) != len(self.models):
            raise ValueError(f"{len(self.weights)} weights for {len(self.models)} models")


@dataclass
class ComposePhase:
    """`bidirlm compose` as a phase: the text model (``@<phase>``, ``@base`` or a folder) with a
    vision and / or an audio specialist (folders or references) into one omni checkpoint
    (`bidirlm.runtime.merging.compose.compose_omni`)."""

    text: str
    vision: str | None = None
    audio: str | None = None
    weights: list[float] | None = None  # of the text backbones, text / vision / audio order
    rope_from: Literal["text", "vision", "audio"] | None = None  # None: compose's default
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # the merger's arithmetic

    def __post_init__(self) -> None:
        if self.vision is None and self.audio is None:
            raise ValueError("compose needs vision, audio or both besides text")
        given = 1 + (self.vision is not None) + (self.audio is not None)
        if self.weights is not None and len(self.weights) != given:
            raise ValueError(f"weights: {len(self.weights)} values for {given} models")

    def models(self) -> dict[str, str]:
        """role -> reference or folder, for the roles given."""
        out = {"text": self.text, "vision": self.vision, "audio": self.audio}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class EvalPhase:
    """Retrieval evaluation of one model (see `bidirlm.runtime.evaluation.evaluate`)."""

    model: str
    task: str = "embedded"
    pooling: Literal["mean", "last", "first"] = "mean"
    bidirectional: bool = True
    max_length: int = 512
    batch_size: int = 32
    query_prefix: str = ""


@dataclass
class Phase:
    """One resolved phase: its kind, parsed config, input references and folder."""

    name: str
    kind: Literal["train", "merge", "compose", "eval"]
    config: TrainConfig | MergePhase | ComposePhase | EvalPhase
    inputs: list[str]  # referenced names: "base" or earlier phases
    folder: Path
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        """The model folder this phase produces (the metrics file for eval)."""
        if self.kind == "train":
            return Path(self.config.train.output) / "final"
        if self.kind in ("merge", "compose"):
            return self.folder / "model"
        return self.folder / "metrics.json"


@dataclass
class Recipe:
    recipe: RecipeSection
    phases: list[Phase]
    source: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the resolved raw tables


# ------------------------------------------------------------------------------------------
# Parsing and checks
# ------------------------------------------------------------------------------------------


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``qwen3-0.6b``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{Path(name_or_path).name.removesuffix('.toml')}.toml"
    if shipped.is_file() and not path.parent.parts:
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise FileNotFoundError(f"recipe {name_or_path} does not exist (shipped recipes: {names})")


def _ref(value: str, where: str, known: list[str]) -> str:
    if not value.startswith("@"):
        raise RecipeError(f"{where}: {value!r} must reference a model as @base or @<phase>")
    name = value[1:]
    if name != "base" and name not in known:
        choices = ", ".join(["@base", *(f"@{k}" for k in known)])
        raise RecipeError(f"{where}: {value} is not an earlier model phase (choose: {choices})")
    return name


def parse_recipe(data: dict[str, Any], *, source: Path | None = None) -> Recipe:
    """Parse raw recipe tables (after overrides) into phases with checked references."""
    data = copy.deepcopy(data)
    if "recipe" not in data:
        raise RecipeError("missing the [recipe] table (name, base, output, phases)")
    try:
        section = parse_dataclass(RecipeSection, data["recipe"], "recipe")
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    extra = sorted(set(data) - {"recipe", *section.phases})
    if extra:
        raise RecipeError(
            f"table(s) {', '.join(extra)} are not listed in recipe.phases {section.phases}"
        )
    out_root = Path(section.output).expanduser()
    phases: list[Phase] = []
    model_phases: list[str] = []
    resolved: dict[str, Any] = {"recipe": _plain(section)}
    for name in section.phases:
        if name not in data or not isinstance(data[name], dict):
            raise RecipeError(f"recipe.phases names {name!r} but there is no [{name}] table")
        table = data[name]
        kind = table.pop("kind", "train")
        folder = out_root / name
        try:
            phase = _parse_phase(name, kind, table, folder, model_phases)
        except RecipeError:
            raise
        except ValueError as exc:
            raise RecipeError(f"[{name}]: {exc}") from None
        # resolved plain values (no `--set` wrappers), train.output filled in
        resolved[name] = {"kind": kind, **_plain(phase.config)}
        phases.append(phase)
        if kind != "eval":
            model_phases.append(name)
    return Recipe(recipe=section, phases=phases, source=source, data=resolved)


def _plain(cfg: Any) -> dict[str, Any]:
    return to_dict(cfg)


def _inside(path: Path, root: Path) -> bool:
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path == root or root in path.parents


def _parse_phase(
    name: str, kind: str, table: dict[str, Any], folder: Path, known: list[str]
) -> Phase:
    if kind == "train":
        model = table.get("model")
        if not isinstance(model, str):
            raise RecipeError(f"[{name}]: model must be @base or @<phase>")
        inputs = [_ref(model, f"{name}.model", known)]
        train_table = table.setdefault("train", {})
        if not isinstance(train_table, dict):
            raise RecipeError(f"[{name}]: train must be a table")
        train_table.setdefault("output", str(folder))
        config = train_config_from_dict({**table, "model": f"@{inputs[0]}"})
        if not _inside(Path(config.train.output).expanduser(), folder.parent):
            raise RecipeError(
                f"[{name}]: train.output {config.train.output} is outside recipe.output "
                f"{folder.parent}; leave it unset (it defaults to {folder})"
            )
        return Phase(name, "train", config, inputs, folder, table)
    if kind == "merge":
        config = parse_dataclass(MergePhase, table, name)
        inputs = [_ref(m, f"{name}.models", known) for m in config.models]
        if config.base is not None:
            inputs.append(_ref(config.base, f"{name}.base", known))
        return Phase(name, "merge", config, inputs, folder, table)
    if kind == "compose":
        config = parse_dataclass(ComposePhase, table, name)
        inputs = []
        for role, value in config.models().items():
            if value.startswith("@"):  # an earlier phase (or @base); else a model folder
                inputs.append(_ref(value, f"{name}.{role}", known))
        return Phase(name, "compose", config, inputs, folder, table)
    if kind == "eval":
        config = parse_dataclass(EvalPhase, table, name)
        inputs = [_ref(config.model, f"{name}.model", known)]
        return Phase(name, "eval", config, inputs, folder, table)
    raise RecipeError(f"[{name}]: kind {kind!r} is not one of 'train', 'merge', 'compose', 'eval'")


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe file (or a shipped recipe's name), apply `--set` overrides, parse it."""
    path = recipe_path(path)
    try:
        data = apply_overrides(read_toml(path), overrides)
        return parse_recipe(data, source=path)
    except ValueError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def check_inputs(recipe: Recipe) -> None:
    """Every path the recipe reads must exist: checked before any phase starts."""
    problems: list[str] = []
    base = recipe.recipe.base
    base_ok = is_embedded(base) or (Path(base).expanduser() / "config.json").is_file()
    if not base_ok:
        problems.append(f"recipe.base: {base} is not a model folder (no config.json)")
    for phase in recipe.phases:
        if phase.kind == "train":
            for source in phase.config.data.sources:
                if not _source_exists(source):
                    problems.append(f"{phase.name}.data.sources: {source.path} does not exist")
            for source in phase.config.heldout.sources:
                if not _source_exists(source):
                    problems.append(f"{phase.name}.heldout.sources: {source.path} does not exist")
            if phase.config.phase == "mntp" and base_ok:
                # every model of a recipe carries the base's tokenizer
                try:
                    check_mask_token(
                        resolve_model_path(base),
                        phase.config.mntp.mask_token,
                        key=f"{phase.name}.mntp.mask_token",
                    )
                except ValueError as exc:
                    problems.append(str(exc))
        elif phase.kind == "compose":
            problems.extend(_compose_problems(phase, base if base_ok else None))
        elif phase.kind == "eval" and phase.config.task != "embedded":
            if not Path(phase.config.task).expanduser().exists():
                problems.append(f"{phase.name}.task: {phase.config.task} does not exist")
    if problems:
        where = f"{recipe.source}: " if recipe.source else ""
        raise RecipeError(where + "; ".join(problems))


def _compose_problems(phase: Phase, base: str | None) -> list[str]:
    """A compose phase's missing model folders; when all exist, the specialists are checked
    against the text model (the base stands for a text model an earlier phase will write: the
    phases keep the base's shape) with compose's own rules, so a mismatch fails before any work."""
    problems = []
    folders: dict[str, str] = {}
    for role, value in phase.config.models().items():
        if value.startswith("@"):  # @base, or an earlier phase's output (the base's shape)
            value = base or ""
        if not value:
            continue
        folder = resolve_model_path(value) if is_embedded(value) else Path(value).expanduser()
        if not (Path(folder) / "config.json").is_file():
            problems.append(
                f"{phase.name}.{role}: {value} is not a model folder (no config.json); "
                f"(--set {phase.name}.{role}=PATH)"
            )
        folders[role] = str(folder)
    if problems or "text" not in folders:
        return problems
    try:
        sources = [_compose_source(role, path) for role, path in folders.items()]
        compose_checks(sources)
        resolve_rope_from(sources, phase.config.rope_from)
    except ValueError as exc:
        problems.append(f"{phase.name}: {exc}")
    return problems


def _source_exists(source: SourceConfig) -> bool:
    return source_exists(source.path)  # a path, a matching glob or an embedded corpus


# ------------------------------------------------------------------------------------------
# `--check`: the size of each train phase
# ------------------------------------------------------------------------------------------

# The utilization `--check` assumes for its time estimates (a prediction, not a measurement).
ASSUMED_MFU = 0.4
# World sizes the accumulation is shown for: one node, and the paper's 96 GPUs (Table 2).
CHECK_WORLDS = (8, 96)


def parameter_count(model: str | os.PathLike) -> int | None:
    """Parameters of a model folder from its safetensors headers (no tensor is read)."""
    folder = resolve_model_path(str(model))
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                total += math.prod(int(d) for d in fh.get_slice(key).get_shape())
    return total


def plan_lines(recipe: Recipe, n_params: int | None = None) -> list[str]:
    """What `--check` prints under each train phase: tokens (or pairs) per step, steps, tokens
    in all, the accumulation on one node and on the paper's 96 GPUs, and an estimated time per
    device class from the MFU peak table (causal/MNTP; 6 N FLOPs per token at ASSUMED_MFU)."""
    lines: list[str] = []
    for phase in recipe.phases:
        if phase.kind != "train":
            continue
        cfg = phase.config
        train = cfg.train
        plan = step_plan(cfg, 1)
        lines.append(f"{phase.name}:")
        if plan.unit in ("tokens", "pairs"):
            total = plan.per_step * train.steps
            budget = train.token_budget
            named = f" ({budget} budget)" if isinstance(budget, str) else ""
            billions = f" ({total / 1e9:.2f}B)" if plan.unit == "tokens" else ""
            lines.append(
                f"  {plan.unit} per step {plan.per_step} ({plan.per_step:,}); steps "
                f"{train.steps:,}; {plan.unit} in all {total:,}{billions}{named}"
            )
        else:
            lines.append(f"  steps {train.steps:,} of {plan.grad_accum} micro-batch(es)")
        accum = []
        for world in CHECK_WORLDS:
            try:
                accum.append(f"{world} ranks: {step_plan(cfg, world).grad_accum}")
            except ValueError:
                accum.append(f"{world} ranks: does not divide")
        lines.append(f"  accumulation per rank: {'; '.join(accum)}")
        if plan.unit == "tokens" and n_params:
            total = plan.per_step * train.steps
            dtype = train.dtype if train.dtype in ("bfloat16", "float16") else "bfloat16"
            lines.append(
                f"  estimated time ({n_params / 1e6:,.4g}M parameters, 6 N FLOPs per token, "
                f"{ASSUMED_MFU:.0%} MFU assumed, {dtype} peaks; a prediction):"
            )
            for label, key in DEVICE_CLASSES.items():
                hours = device_hours(n_params, total, PEAK_FLOPS[key][dtype], ASSUMED_MFU)
                lines.append(
                    f"    {label:<11} {hours:>12,.2f} device-hours = {hours / 96:,.2f} h on 96"
                )
    return lines


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------


def _fingerprint(
    phase: Phase, resolved: dict[str, Any], upstream: dict[str, str], dtype: str = "auto"
) -> str:
    payload = {
        "kind": phase.kind,
        "config": resolved,
        "inputs": {k: upstream.get(k, "") for k in phase.inputs},
    }
    if dtype != "auto":  # an explicit recipe.dtype changes what every model phase writes
        payload["dtype"] = dtype
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _resolved_config(phase: Phase, paths: dict[str, Path]) -> Any:
    """The phase config with @references replaced by the input folders."""
    sub = lambda ref: str(paths[ref[1:]]) if isinstance(ref, str) and ref.startswith("@") else ref
    cfg = phase.config
    if phase.kind == "train":
        cfg = copy.deepcopy(cfg)
        cfg.model = sub(cfg.model)
    elif phase.kind == "merge":
        cfg = copy.deepcopy(cfg)
        cfg.models = [sub(m) for m in cfg.models]
        cfg.base = sub(cfg.base) if cfg.base else None
    elif phase.kind == "compose":
        cfg = copy.deepcopy(cfg)
        cfg.text = sub(cfg.text)
        cfg.vision = sub(cfg.vision) if cfg.vision else None
        cfg.audio = sub(cfg.audio) if cfg.audio else None
    else:
        cfg = copy.deepcopy(cfg)
        cfg.model = sub(cfg.model)
    return cfg


def _as_dict(cfg: Any) -> dict[str, Any]:
    return to_dict(cfg)


def _read_record(phase: Phase) -> dict[str, Any] | None:
    path = phase.folder / PHASE_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn record counts as "not complete": the phase runs again


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # NaN / Inf (a last loss that was not finite) become null: a bare NaN is not JSON
    text = json.dumps(finite_or_none(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _last_metrics(folder: Path) -> dict[str, Any]:
    """The last line of a train phase's metrics.jsonl (loss, step...), or {}."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    try:  # a torn last line (a crash mid-write) is skipped
        rows = read_jsonl(path, torn_tail_ok=True)
    except JsonLinesError:
        return {}
    last = rows[-1][1] if rows else {}
    return {k: last[k] for k in ("step", "loss") if k in last}


def _run_phase(
    phase: Phase, cfg: Any, log: Callable[[str], None], dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Execute one phase; return its result summary (metrics for eval). `dtype`: the dtype its
    model is written in (`recipe.dtype`; None: as the phase wrote it)."""
    if phase.kind == "train":
        # heldout.tasks are scored by the evaluation package, handed in (training imports none)
        extra = {"evaluator": task_evaluator(cfg)} if cfg.heldout.tasks else {}
        final = Path(trainer.train(cfg, **extra))  # looked up per call (tests wrap it)
        if final.resolve() != phase.output.resolve():
            raise RecipeError(f"[{phase.name}]: trainer wrote {final}, expected {phase.output}")
        if dtype is not None:  # training keeps float32 master weights: back to the base's dtype
            cast_checkpoint(final, dtype)
        return _last_metrics(Path(cfg.train.output))
    if phase.kind == "compose":
        result = compose_omni(
            cfg.text,
            cfg.vision,
            cfg.audio,
            phase.output,
            weights=cfg.weights,
            dtype=cfg.dtype,
            out_dtype=_dtype_name(dtype),
            rope_from=cfg.rope_from,
            force=True,  # as for merge: a folder without our record is incomplete
        )
        config = json.loads((Path(result.output) / "config.json").read_text(encoding="utf-8"))
        line = policy_line(config)
        if line:
            log(f"  {phase.name}: {line}")
        return {}
    if phase.kind == "merge":
        # `force`: a folder left by a crash after the merge's atomic rename but before our
        # record was written is incomplete from the pipeline's point of view.
        merge(
            cfg.models,
            cfg.weights,
            phase.output,
            method=cfg.method,
            base=cfg.base,
            dtype=cfg.dtype,
            force=True,
        )
        if dtype is not None and cfg.dtype is None:  # merge.dtype, when set, is what was asked
            cast_checkpoint(phase.output, dtype)
        return {}
    metrics = evaluate(
        cfg.model,
        cfg.task,
        pooling=cfg.pooling,
        bidirectional=cfg.bidirectional,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        query_prefix=cfg.query_prefix,
        device="cuda" if _cuda() else None,
    )
    _write_json(phase.output, metrics)
    log(f"  {phase.name}: ndcg@10={metrics['ndcg@10']:.4f} mrr@10={metrics['mrr@10']:.4f}")
    return metrics


def _cuda() -> bool:
    return torch.cuda.is_available()


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def output_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the pipeline writes models in: `recipe.dtype`, "auto" = the base's."""
    if recipe.recipe.dtype != "auto":
        return getattr(torch, recipe.recipe.dtype)
    folder = Path(resolve_model_path(recipe.recipe.base))
    return ckpt.checkpoint_dtype(folder, ckpt.read_config(folder))


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def cast_checkpoint(folder: str | os.PathLike, dtype: torch.dtype) -> bool:
    """Rewrite a model folder's floating tensors (float32 / bfloat16 / float16) in `dtype`, file
    by file (each written beside the original, then renamed over it), and the dtype fields of
    its config.json (and index total size); returns False when nothing needed it."""
    folder = Path(folder)
    changed = False
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            kinds = {n: fh.get_slice(n).get_dtype() for n in fh.keys()}
            if not any(k in _ST_DTYPES.values() and k != _ST_DTYPES[dtype] for k in kinds.values()):
                continue
            tensors = {}
            for n, kind in kinds.items():
                t = fh.get_tensor(n)
                tensors[n] = t.to(dtype) if kind in _ST_DTYPES.values() else t
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        changed = True
    if not changed:
        return False
    name = _dtype_name(dtype)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            for key in ("dtype", "torch_dtype"):
                if key in section:
                    section[key] = name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = name
    _write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    index_path = folder / ckpt.INDEX_FILE
    if index_path.is_file():  # total_size follows the new dtype
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = sum(
            info.nbytes for info in ckpt.tensor_infos(folder).values()
        )
        _write_text(index_path, json.dumps(index, indent=2) + "\n")
    return True


def run_pipeline(
    recipe: str | os.PathLike | Recipe,
    overrides: Iterable[str] = (),
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a recipe's phases in order; return (and write) the run report.

    Complete phases are skipped, an interrupted one resumes; see the module docstring. Raises
    `RecipeError` for a bad recipe or a missing input, before any phase runs.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise RecipeError("overrides apply to a recipe file; apply them before parsing")
    check_inputs(recipe)
    out_root = Path(recipe.recipe.output).expanduser()
    dtype = output_dtype(recipe)
    paths: dict[str, Path] = {"base": resolve_model_path(recipe.recipe.base)}
    fingerprints: dict[str, str] = {"base": str(paths["base"])}
    plan = []
    for phase in recipe.phases:
        cfg = _resolved_config(phase, paths)
        fp = _fingerprint(phase, _as_dict(cfg), fingerprints, recipe.recipe.dtype)
        record = _read_record(phase)
        if record is not None and record.get("fingerprint") != fp:
            raise RecipeError(
                f"phase {phase.name!r} in {phase.folder} was completed with a different "
                f"configuration or inputs; delete that folder to run it again, or set another "
                f"recipe.output"
            )
        plan.append((phase, cfg, fp, record))
        fingerprints[phase.name] = fp
        if phase.kind != "eval":
            paths[phase.name] = phase.output
    resolved = dumps_toml(recipe.data)  # before any folder is made: a failure leaves nothing
    out_root.mkdir(parents=True, exist_ok=True)
    _write_text(out_root / "recipe.resolved.toml", resolved)
    log(f"[pipeline] recipe {recipe.recipe.name}: {len(plan)} phases -> {out_root}")
    started = time.perf_counter()

    report: dict[str, Any] = {
        "recipe": recipe.recipe.name,
        "source": str(recipe.source) if recipe.source else None,
        "output": str(out_root),
        "base": str(paths["base"]),
        "phases": [],
    }
    for i, (phase, cfg, fp, record) in enumerate(plan, 1):
        entry: dict[str, Any] = {
            "name": phase.name,
            "kind": phase.kind,
            "output": str(phase.output),
        }
        if record is not None and phase.output.exists():
            log(f"[pipeline] {i}/{len(plan)} {phase.name} ({phase.kind}): complete, skipped")
            entry.update(status="skipped", seconds=record.get("seconds"), result=record["result"])
        else:
            log(f"[pipeline] {i}/{len(plan)} {phase.name} ({phase.kind}): running")
            start = time.perf_counter()
            result = _run_phase(phase, cfg, log, dtype)
            seconds = round(time.perf_counter() - start, 2)
            _write_json(
                phase.folder / PHASE_RECORD,
                {"fingerprint": fp, "seconds": seconds, "result": result, "config": _as_dict(cfg)},
            )
            log(f"[pipeline] {i}/{len(plan)} {phase.name}: done in {seconds:.1f} s")
            entry.update(status="ran", seconds=seconds, result=result)
        report["phases"].append(entry)
    recorded = [
        p["seconds"] for p in report["phases"] if isinstance(p.get("seconds"), (int, float))
    ]
    report["phase_seconds_total"] = round(sum(recorded), 2)
    report["run_seconds"] = round(time.perf_counter() - started, 2)
    _write_json(out_root / "report.json", report)
    _write_text(out_root / "report.md", format_report(report))
    return report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_report(report: dict[str, Any]) -> str:
    """The run report as a Markdown table."""
    lines = [
        f"# Pipeline run: {report['recipe']}",
        "",
        f"Base model: `{report['base']}`; outputs under `{report['output']}`.",
        "",
        "| phase | kind | status | seconds | result | output |",
        "|---|---|---|---:|---|---|",
    ]
    for p in report["phases"]:
        result = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in (p.get("result") or {}).items()
            if k not in ("task",)
        )
        seconds = p.get("seconds")
        secs = f"{seconds:.1f}" if isinstance(seconds, (int, float)) else ""
        lines.append(
            f"| {p['name']} | {p['kind']} | {p['status']} | {secs} | {result} | `{p['output']}` |"
        )
    if "phase_seconds_total" in report:
        lines += [
            "",
            f"Phase time: {report['phase_seconds_total']:.1f} s in all (the sum of the seconds "
            "column; a skipped phase shows the time it took when it ran). This run: "
            f"{report['run_seconds']:.1f} s.",
        ]
    return "\n".join(lines) + "\n"
