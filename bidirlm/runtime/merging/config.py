"""Merge configuration: mergekit's YAML (every method in `methods.SPECS`, `slices:`,
`tokenizer_source:`), plus bidirlm's own keys.

The YAML keys and their meaning are documented in `bidirlm.runtime.merging.merge`; this module
parses them into a typed `MergeConfig` and resolves per-tensor parameters the way mergekit does
(scalars, per-layer gradients, `{filter, value}` lists; per-model settings before global ones).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import ALL_PARAMETERS, METHODS, REQUIRED, SPECS

DTYPES = ("float64", "float32", "bfloat16", "float16")

# Parameters each method reads (mergekit's specs: the whole task-arithmetic family accepts
# density/rescale/int8_mask, so a file written for mergekit runs unchanged).
METHOD_PARAMETERS = {m: (*s.shared, *s.per_input) for m, s in SPECS.items()}
BOOL_PARAMETERS = ("normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten")
BOOL_PARAMETERS += ("filter_wise", "normalize_weights")
# Files that make a folder a tokenizer source (transformers otherwise builds an empty tokenizer
# from config.json alone, and the merge would publish a model without its tokenizer).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")

TOP_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "exclude",
    "config_from",
    "tokenizer_from",
    "slices",
    "random_seed",
    "tokenizer",
    "chat_template",
)
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
MODEL_KEYS = ("model", "parameters", "rename", "take")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
UNSUPPORTED_TOP_KEYS = {
    "modules": "`modules:` (mergekit's per-module recipes for multi-module architectures, read "
    "from its architecture tables) is not supported: bidirlm merges by tensor name, so list whole "
    "models under `models:` and copy a tower unmerged with `take:` (rename it with `rename:`)",
}


class MergeError(ValueError):
    """A merge cannot run: bad configuration or input checkpoints. The message names the culprit."""


@dataclass(frozen=True)
class ModelSpec:
    """One input model: its folder, mergekit parameters and bidirlm's per-model keys."""

    path: Path
    label: str  # as written by the user, for messages
    parameters: Mapping[str, Any] = field(default_factory=dict)
    rename: tuple[tuple[str, str], ...] = ()  # (old prefix, new prefix)
    take: tuple[str, ...] = ()  # glob patterns over renamed tensor names

    def renamed(self, name: str) -> str:
        """The output name of tensor `name` of this model (the longest matching prefix wins)."""
        best = None
        for old, new in self.rename:
            if name.startswith(old) and (best is None or len(old) > len(best[0])):
                best = (old, new)
        return name if best is None else best[1] + name[len(best[0]) :]


@dataclass(frozen=True)
class SourceSpec:
    """One source of a `slices:` entry: model `index`, its layers [start, end), parameters."""

    index: int
    start: int
    end: int
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSpec:
    """One output slice: layers merged from its sources (equal layer counts), an optional
    slice-level base and parameters (consulted before the global ones)."""

    sources: tuple[SourceSpec, ...]
    base_index: int | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge: inputs in mergekit's order (a base not listed is appended last).

    With `slices`, `models` lists each distinct model once and the slices say which layers of
    which models make each output layer (mergekit's layer-stacking form)."""

    method: str
    models: tuple[ModelSpec, ...]
    base_index: int | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    exclude: tuple[str, ...] = ()
    config_from: Path | None = None
    tokenizer_from: Path | None = None
    source_text: str | None = None  # the YAML as written, saved beside the output
    slices: tuple[SliceSpec, ...] = ()
    tokenizer_source: str | None = None  # "base", "union" or a folder: vocabulary alignment
    pad_to_multiple_of: int | None = None  # `tokenizer: {pad_to_multiple_of}`: padded vocabulary
    random_seed: int = 0  # masks of dare_* / della*, drawn per tensor
    chat_template: str | None = None  # "auto", a template name or Jinja text (mergekit's key)
    ignored: tuple[str, ...] = ()  # parameters given that the method ignores (as mergekit)

    @property
    def reference_index(self) -> int:
        """The model the similarity report compares against: the base, else the first model."""
        return 0 if self.base_index is None else self.base_index

    def shared(
        self, name: str, t: float, scopes: Sequence[Mapping[str, Any] | None] | None = None
    ) -> dict[str, Any]:
        """The method's parameters that take one value per tensor (normalize, lambda, t, ...),
        resolved in `scopes` (default: the global `parameters:`), else their defaults."""
        scopes = (self.parameters,) if scopes is None else scopes
        out: dict[str, Any] = {}
        for key, default in SPECS[self.method].shared.items():
            value = _convert(key, _resolve_scopes(scopes, key, name, t), key, self.method)
            if value is None:
                if default is REQUIRED:
                    raise MergeError(
                        f"merge_method {self.method} needs parameter `{key}` (tensor {name})"
                    )
                value = default
            out[key] = value
        return out

    def input_params(
        self,
        index: int,
        name: str,
        t: float,
        scopes: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> dict[str, Any]:
        """Per-input parameters (weight, density, ...) of model `index` for tensor `name`,
        resolved in `scopes` (default: the model's parameters, then the global ones)."""
        spec = self.models[index]
        scopes = (spec.parameters, self.parameters) if scopes is None else scopes
        out: dict[str, Any] = {}
        for key, default in SPECS[self.method].per_input.items():
            value = _convert(
                key,
                _resolve_scopes(scopes, key, name, t),
                f"{key} of model {spec.label}",
                self.method,
            )
            if value is None:
                if default is REQUIRED:
                    raise MergeError(
                        f"model {spec.label} has no `{key}` for tensor {name} "
                        f"(set parameters.{key} on the model or globally)"
                    )
                value = default
            out[key] = value
        return out

    def weight(self, index: int, name: str, t: float) -> float:
        """The `weight` of input `index` for output tensor `name` at layer position `t`."""
        return self.input_params(index, name, t)["weight"]


def _convert(key: str, value: Any, what: str, method: str | None = None) -> Any:
    if value is None:
        return None
    if key in BOOL_PARAMETERS:
        return _as_bool(value, what, False)
    number = _as_float(value, what)
    spec = SPECS.get(method) if method else None
    if spec is not None:
        _check_domain(spec, key, number, what, method)
        if key in spec.integers:
            return int(number)
    return number


def _check_domain(spec: Any, key: str, number: float, what: str, method: str) -> None:
    """`number` in the valid range of parameter `key` of `method`, else a `MergeError`."""
    if key in spec.integers and number != int(number):
        raise MergeError(f"{what} must be a whole number for merge_method {method}, got {number}")
    low, high = spec.domains.get(key, (None, None))
    if (low is not None and number < low) or (high is not None and number > high):
        if high is None:
            want = f">= {low:g}"
        elif low is None:
            want = f"<= {high:g}"
        else:
            want = f"in [{low:g}, {high:g}]"
        raise MergeError(f"{what} must be {want} for merge_method {method}, got {number:g}")


def _what(key: str, where: str) -> str:
    """How messages name parameter `key` of the scope `where` ("weight of model m")."""
    prefix = "parameters of "
    if where == "parameters":
        return key
    return f"{key} of {where[len(prefix) :]}" if where.startswith(prefix) else f"{key} in {where}"


def _leaves(setting: Any) -> list[Any]:
    """The scalar values of a parameter setting (scalars, gradients, {filter, value} lists):
    a gradient interpolates between them, so checking them checks every resolved value."""
    if isinstance(setting, Mapping):
        return _leaves(setting.get("value"))
    if isinstance(setting, list):
        return [leaf for item in setting for leaf in _leaves(item)]
    return [setting]


def _resolve_scopes(
    scopes: Sequence[Mapping[str, Any] | None], key: str, name: str, t: float
) -> Any:
    for scope in scopes:
        if scope and key in scope:
            value = evaluate_setting(scope[key], name, t)
            if value is not None:
                return value
    return None


def _as_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise MergeError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):  # YAML .nan / .inf would silently give an all-NaN merge
        raise MergeError(f"{what} must be a finite number, got {value!r}")
    return number


def _as_bool(value: Any, what: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise MergeError(f"{what} must be true or false, got {value!r}")


def evaluate_setting(setting: Any, name: str, t: float) -> Any:
    """Resolve one mergekit parameter setting for tensor `name` at layer position `t` in [0, 1].

    A scalar is itself; a list of numbers is a gradient interpolated linearly at `t`; a list of
    `{filter, value}` entries picks the first whose filter is absent, `*`, or a substring of
    `name`. Returns None when nothing applies (the next scope is consulted).
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list):
        raise MergeError(f"unexpected parameter value {setting!r}")
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        lo = int(scaled)
        hi = min(len(setting) - 1, lo + 1)
        frac = scaled - lo
        return (1 - frac) * setting[lo] + frac * setting[hi]
    for cond in setting:
        if not isinstance(cond, Mapping) or "value" not in cond:
            raise MergeError(
                f"a parameter list mixes numbers and {{filter, value}} maps: {setting}"
            )
        flt = cond.get("filter")
        if flt is None or flt == "*" or (name and str(flt) in name):
            return evaluate_setting(cond["value"], name, t)
    return None


def _check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in data:
        if key in UNSUPPORTED_TOP_KEYS and where == "merge config":
            if data[key] is None:  # mergekit's model_dump() writes every unset key as null
                continue
            raise MergeError(UNSUPPORTED_TOP_KEYS[key])
        if key not in valid:
            raise MergeError(f"unknown key {key!r} in {where}; valid keys: {', '.join(valid)}")


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise MergeError(f"{what} must be a list of glob patterns, got {value!r}")
    return tuple(value)


def _model_path(ref: Any, what: str) -> Path:
    if not isinstance(ref, (str, os.PathLike)) or not str(ref):
        raise MergeError(f"{what} must be a path to a local model folder, got {ref!r}")
    path = Path(ref).expanduser()
    if not path.is_dir():
        text = str(ref)
        hub_like = any(c in text for c in "/@+") and not text.startswith((".", "/", "~"))
        if hub_like and not path.exists():  # mergekit's org/name, org/name@rev, model+lora
            raise MergeError(
                f"{what} {text!r} is not a local folder: bidirlm merge reads local model folders "
                "only and never downloads (Hub ids are not fetched); download the model first "
                "and give its folder"
            )
        raise MergeError(
            f"{what} {text!r} is not a local model folder (bidirlm merge reads local folders "
            "only, never the Hub)"
        )
    return path


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds tokenizer files (not only a config or a processor)."""
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def _model_spec(entry: Any, position: int) -> ModelSpec:
    if isinstance(entry, (str, os.PathLike)):
        entry = {"model": entry}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise MergeError(f"models[{position}] must be a mapping with a `model:` path")
    _check_keys(entry, MODEL_KEYS, f"models[{position}]")
    label = str(entry["model"])
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeError(f"parameters of model {label} must be a mapping")
    rename = entry.get("rename") or {}
    if not isinstance(rename, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k for k, v in rename.items()
    ):
        raise MergeError(f"rename of model {label} must map name prefixes to prefixes")
    return ModelSpec(
        path=_model_path(entry["model"], f"model in models[{position}]"),
        label=label,
        parameters=dict(params),
        rename=tuple(rename.items()),
        take=_patterns(entry.get("take"), f"take of model {label}"),
    )


def _dtype(value: Any, what: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise MergeError(f"{what} {value!r} is not supported; valid: {', '.join(DTYPES)}")
    return name


def config_from_dict(data: Mapping[str, Any], *, source_text: str | None = None) -> MergeConfig:
    """Validate a parsed YAML mapping into a `MergeConfig` (paths relative to the current folder,
    as mergekit reads them)."""
    if not isinstance(data, Mapping):
        raise MergeError("a merge config must be a YAML mapping")
    _check_keys(data, TOP_KEYS, "merge config")
    data, pad = _tokenizer_section(data)
    method = data.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"merge_method {method!r} is not supported; valid: {', '.join(METHODS)}")
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeError("`parameters:` must be a mapping")
    slices: list[SliceSpec] = []
    if data.get("slices") is not None:
        if data.get("models") is not None:
            raise MergeError("give either `models:` or `slices:`, not both")
        models, slices = _slices(data["slices"])
    else:
        entries = data.get("models")
        if not isinstance(entries, list) or not entries:
            raise MergeError("`models:` must list at least one model (or give `slices:`)")
        models = [_model_spec(e, i) for i, e in enumerate(entries)]
    scopes = [("parameters", params)] + [
        (f"parameters of model {m.label}", m.parameters) for m in models
    ]
    for k, sl in enumerate(slices):
        scopes.append((f"parameters of slices[{k}]", sl.parameters))
        scopes += [
            (f"parameters of slices[{k}] source {models[src.index].label}", src.parameters)
            for src in sl.sources
        ]
    ignored: dict[str, None] = {}
    for where, scope in scopes:
        for key, setting in scope.items():
            if key in METHOD_PARAMETERS[method]:
                for leaf in _leaves(setting):  # domains checked before anything is read
                    if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                        _convert(key, leaf, _what(key, where), method)
            elif key in ALL_PARAMETERS:  # mergekit accepts and ignores it: so do we (warned)
                ignored.setdefault(key)
            else:
                raise MergeError(
                    f"unknown parameter {key!r} in {where} for merge_method {method}; "
                    f"valid: {', '.join(METHOD_PARAMETERS[method]) or 'none'}"
                )
    resolved = [m.path.resolve() for m in models]
    if len(set(resolved)) != len(resolved):
        raise MergeError("a model is listed twice in `models:`")

    def index_of(ref: Any, what: str) -> int:
        path = _model_path(ref, what)
        if path.resolve() in resolved:
            return resolved.index(path.resolve())
        # mergekit appends a base that is not listed, without parameters
        models.append(ModelSpec(path=path, label=str(ref)))
        resolved.append(path.resolve())
        return len(models) - 1

    base_index = None
    if data.get("base_model") is not None:
        base_index = index_of(data["base_model"], "base_model")
    spec = SPECS[method]
    if slices:
        raw = data["slices"]
        for k, sl in enumerate(slices):
            if raw[k].get("base_model") is not None:
                sl = SliceSpec(
                    sl.sources,
                    index_of(raw[k]["base_model"], f"slices[{k}] base_model"),
                    sl.parameters,
                )
                slices[k] = sl
            base = sl.base_index if sl.base_index is not None else base_index
            ids = [src.index for src in sl.sources]
            if spec.base != "ignored" and base is not None and base not in ids:
                raise MergeError(
                    f"slices[{k}]: the base model {models[base].label} must be one of its sources"
                )
            _check_contract(method, ids, base, f"slices[{k}]")
    else:
        _check_contract(method, list(range(len(models))), base_index, "models")

    def ref(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if value == "base":
            if base_index is None:
                if key == "tokenizer_source":  # mergekit: the base, else the first model
                    return models[0].path
                raise MergeError(f"{key}: base needs `base_model:`")
            return models[base_index].path
        if value == "union":
            if key == "tokenizer_source":
                return None
            raise MergeError(f"{key}: union is only valid for tokenizer_source")
        return _model_path(value, key)

    tokenizer_source = None
    if data.get("tokenizer_source") is not None:
        value = data["tokenizer_source"]
        tokenizer_source = value if value in ("base", "union") else str(ref("tokenizer_source"))
        folder = ref("tokenizer_source")
        if folder is not None and not has_tokenizer(folder):
            raise MergeError(
                f"tokenizer_source {value} has no tokenizer (none of "
                f"{', '.join(TOKENIZER_MARKERS)} in {folder}): choose a folder with one"
            )
    chat_template = data.get("chat_template")
    if chat_template is not None and (not isinstance(chat_template, str) or not chat_template):
        raise MergeError(
            f"chat_template must be auto, a template name or Jinja text, got {chat_template!r}"
        )
    seed = data.get("random_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MergeError(f"random_seed must be a non-negative integer, got {seed!r}")
    tokenizer_from = ref("tokenizer_from") or ref("tokenizer_source")
    return MergeConfig(
        method=method,
        models=tuple(models),
        base_index=base_index,
        parameters=dict(params),
        dtype=_dtype(data.get("dtype"), "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
        exclude=_patterns(data.get("exclude"), "exclude"),
        config_from=ref("config_from"),
        tokenizer_from=tokenizer_from,
        source_text=source_text,
        slices=tuple(slices),
        tokenizer_source=tokenizer_source,
        random_seed=seed,
        pad_to_multiple_of=pad,
        chat_template=chat_template,
        ignored=tuple(ignored),
    )


def _tokenizer_section(data: Mapping[str, Any]) -> tuple[Mapping[str, Any], int | None]:
    """mergekit's `tokenizer: {source, pad_to_multiple_of}` as `tokenizer_source` (its `source`
    defaults to union, as in mergekit); `tokens:` (per-token embedding surgery) is refused."""
    section = data.get("tokenizer")
    if section is None:
        return data, None
    if data.get("tokenizer_source") is not None:
        raise MergeError("give either `tokenizer_source:` or `tokenizer:`, not both")
    if not isinstance(section, Mapping):
        raise MergeError("`tokenizer:` must be a mapping with `source:`")
    _check_keys(section, TOKENIZER_KEYS, "tokenizer")
    if section.get("tokens"):
        raise MergeError("tokenizer.tokens (per-token embedding surgery) is not supported")
    pad = section.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MergeError(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    rest = {k: v for k, v in data.items() if k != "tokenizer"}
    rest["tokenizer_source"] = section.get("source") or "union"
    return rest, pad


def _check_contract(method: str, ids: list[int], base: int | None, where: str) -> None:
    """mergekit's input contract of `method` for the inputs `ids` (model indices)."""
    spec = SPECS[method]
    has_base = spec.base != "ignored" and base is not None and base in ids
    if spec.base == "required" and not has_base:
        raise MergeError(f"merge_method {method} needs `base_model:`")
    count, non_base = len(ids), len(ids) - int(has_base)
    checks = [
        ("inputs", count, spec.min_inputs, spec.max_inputs),
        ("non-base inputs", non_base, spec.min_non_base, spec.max_non_base),
    ]
    for what, n, lo, hi in checks:
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            want = (
                f"exactly {lo}"
                if lo == hi
                else (f"at least {lo}" if hi is None else f"at most {hi}")
            )
            if lo is None:
                want = f"at most {hi}"
            raise MergeError(f"merge_method {method} takes {want} {what}; {where} has {n}")


def _slices(raw: Any) -> tuple[list[ModelSpec], list[SliceSpec]]:
    """Parse mergekit's `slices:` into distinct models and slices of model indices."""
    if not isinstance(raw, list) or not raw:
        raise MergeError("`slices:` must list at least one slice")
    models: list[ModelSpec] = []
    paths: list[Path] = []
    slices = []
    for k, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sources"), list):
            raise MergeError(f"slices[{k}] must be a mapping with a `sources:` list")
        _check_keys(entry, SLICE_KEYS, f"slices[{k}]")
        if not entry["sources"]:
            raise MergeError(f"slices[{k}].sources must list at least one source")
        sources = []
        for j, src in enumerate(entry["sources"]):
            where = f"slices[{k}].sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src:
                raise MergeError(f"{where} must be a mapping with a `model:` path")
            _check_keys(src, SOURCE_KEYS, where)
            path = _model_path(src["model"], f"model in {where}")
            if path.resolve() not in paths:
                paths.append(path.resolve())
                models.append(ModelSpec(path=path, label=str(src["model"])))
            lr = src.get("layer_range")
            if (
                not isinstance(lr, (list, tuple))
                or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                or not 0 <= lr[0] < lr[1]
            ):
                raise MergeError(f"{where}.layer_range must be [start, end) with 0 <= start < end")
            sp = src.get("parameters") or {}
            if not isinstance(sp, Mapping):
                raise MergeError(f"{where}.parameters must be a mapping")
            sources.append(SourceSpec(paths.index(path.resolve()), lr[0], lr[1], dict(sp)))
        if len({s.end - s.start for s in sources}) != 1:
            raise MergeError(f"slices[{k}]: every source must span the same number of layers")
        sp = entry.get("parameters") or {}
        if not isinstance(sp, Mapping):
            raise MergeError(f"slices[{k}].parameters must be a mapping")
        slices.append(SliceSpec(tuple(sources), None, dict(sp)))
    return models, slices


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read a merge YAML file into a `MergeConfig`; `MergeError` names what is wrong."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MergeError(f"cannot read merge config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeError(f"merge config {path} is not valid YAML: {exc}") from None
    return config_from_dict(data, source_text=text)
