"""Merge configuration: mergekit's YAML for `linear`/`task_arithmetic`, plus bidirlm's own keys.

The YAML keys and their meaning are documented in `bidirlm.runtime.merging.merge`; this module
parses them into a typed `MergeConfig` and resolves per-tensor parameters the way mergekit does
(scalars, per-layer gradients, `{filter, value}` lists; per-model settings before global ones).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("linear", "task_arithmetic")
DTYPES = ("float64", "float32", "bfloat16", "float16")

# Parameters each method reads. Task arithmetic also accepts the parameters mergekit defines for
# its whole family but ignores for plain task arithmetic (no sparsification, no sign consensus),
# so a file written for mergekit runs unchanged.
METHOD_PARAMETERS = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": ("weight", "normalize", "lambda", "density", "rescale", "int8_mask"),
}
SHARED_PARAMETERS = ("normalize", "lambda", "rescale", "int8_mask")  # one value per tensor
DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False}

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
)
MODEL_KEYS = ("model", "parameters", "rename", "take")
UNSUPPORTED_TOP_KEYS = {
    "slices": "layer slices are not supported; list whole models under `models:`",
    "modules": "`modules:` is not supported; list whole models under `models:`",
    "tokenizer": "tokenizer surgery (`tokenizer:`) is not supported; use `tokenizer_from`",
    "chat_template": "`chat_template` is not supported; edit tokenizer_config.json afterwards",
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
class MergeConfig:
    """A validated merge: inputs in mergekit's order (a base not listed is appended last)."""

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

    @property
    def reference_index(self) -> int:
        """The model the similarity report compares against: the base, else the first model."""
        return 0 if self.base_index is None else self.base_index

    def shared(self, name: str, t: float) -> dict[str, Any]:
        """Method parameters that take one value per tensor (normalize, lambda)."""
        out: dict[str, Any] = {
            "normalize": _as_bool(
                _resolve(self.parameters, (), "normalize", name, t),
                "normalize",
                DEFAULT_NORMALIZE[self.method],
            )
        }
        if self.method == "task_arithmetic":
            out["lambda"] = _as_float(_resolve(self.parameters, (), "lambda", name, t), "lambda")
            if out["lambda"] is None:
                out["lambda"] = 1.0
        return out

    def weight(self, index: int, name: str, t: float) -> float:
        """The `weight` of input `index` for output tensor `name` at layer position `t`."""
        spec = self.models[index]
        value = _resolve(spec.parameters, self.parameters, "weight", name, t)
        weight = _as_float(value, f"weight of model {spec.label}")
        if weight is None:
            raise MergeError(
                f"model {spec.label} has no `weight` for tensor {name} "
                "(set parameters.weight on the model or globally)"
            )
        return weight


def _as_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise MergeError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{what} must be a number, got {value!r}") from None


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


def _resolve(first: Mapping[str, Any], second: Any, key: str, name: str, t: float) -> Any:
    for scope in (first, second):
        if scope and key in scope:
            value = evaluate_setting(scope[key], name, t)
            if value is not None:
                return value
    return None


def _check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in data:
        if key in UNSUPPORTED_TOP_KEYS and where == "merge config":
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
        hint = ""
        if not path.exists() and "/" in str(ref) and not str(ref).startswith((".", "/", "~")):
            hint = " (Hub ids are not fetched: download the model and give its local folder)"
        raise MergeError(f"{what} {str(ref)!r} is not a local model folder{hint}")
    return path


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
    method = data.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"merge_method {method!r} is not supported; valid: {', '.join(METHODS)}")
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError("`models:` must list at least one model")
    models = [_model_spec(e, i) for i, e in enumerate(entries)]
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeError("`parameters:` must be a mapping")
    for where, scope in [("parameters", params)] + [
        (f"parameters of model {m.label}", m.parameters) for m in models
    ]:
        for key in scope:
            if key not in METHOD_PARAMETERS[method]:
                raise MergeError(
                    f"unknown parameter {key!r} in {where} for merge_method {method}; "
                    f"valid: {', '.join(METHOD_PARAMETERS[method])}"
                )
    resolved = [m.path.resolve() for m in models]
    if len(set(resolved)) != len(resolved):
        raise MergeError("a model is listed twice in `models:`")

    base_index = None
    if data.get("base_model") is not None:
        base_path = _model_path(data["base_model"], "base_model")
        if base_path.resolve() in resolved:
            base_index = resolved.index(base_path.resolve())
        else:  # mergekit appends a base that is not listed, without parameters
            models.append(ModelSpec(path=base_path, label=str(data["base_model"])))
            base_index = len(models) - 1
    if method == "task_arithmetic" and base_index is None:
        raise MergeError("merge_method task_arithmetic needs `base_model:`")

    def ref(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if value == "base":
            if base_index is None:
                raise MergeError(f"{key}: base needs `base_model:`")
            return models[base_index].path
        if value == "union":
            raise MergeError(f"{key}: union (tokenizer merging) is not supported")
        return _model_path(value, key)

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
    )


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
