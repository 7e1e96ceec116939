"""Hugging Face checkpoint I/O: config.json, safetensors (sharded or not), name tables.

Reading: the text model's tensors are found under whichever prefix the checkpoint uses
(`model.` for `*ForCausalLM`, none for `*Model`, `model.language_model.` for multimodal ones);
tensors outside that prefix (vision tower, projector, classifier heads) are ignored, tensors inside
it must all be known. Writing: a `*ForCausalLM` layout (`model.` prefix, `lm_head.weight` when
untied) in one file or in shards with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bidirlm.runtime.models import gemma3, qwen3
from bidirlm.runtime.models.common import ArchSpec
from bidirlm.runtime.models.config import ModelConfig, validate_hf_config
from bidirlm.runtime.safetensors_io import HeaderError, TensorInfo, read_safetensors_header

SPECS: tuple[ArchSpec, ...] = (qwen3.SPEC, gemma3.SPEC)
ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in SPECS}
MODEL_TYPES: dict[str, ArchSpec] = {t: spec for spec in SPECS for t in spec.model_types}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for spec in SPECS for a in spec.architectures)
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ALLOW_NON_FINITE_ENV = "BIDIRLM_ALLOW_NON_FINITE"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read: missing or inconsistent files or tensors."""


def resolve(path: str | os.PathLike) -> Path:
    """A local checkpoint folder; a Hub id resolves only from the local cache (no download)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{path}: is a file; expected a checkpoint folder with config.json")
    try:
        from huggingface_hub import snapshot_download  # optional dependency: hub cache names

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise CheckpointError(
            f"{path}: no such folder (and not a Hugging Face model in the local cache)"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict (CheckpointError when missing, unreadable, or when a field our
    models read has the wrong type or a non-finite value: naming the field and the file)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: missing config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    try:
        validate_hf_config(hf, str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return hf


def spec_for(hf: dict[str, Any]) -> ArchSpec:
    """The architecture spec of a config dict; ValueError listing the supported ones."""
    model_type = hf.get("model_type")
    spec = MODEL_TYPES.get(model_type)
    if spec is None:
        archs = hf.get("architectures") or []
        raise ValueError(
            f"unsupported architecture {archs or '?'} (model_type {model_type!r}); supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(MODEL_TYPES)})"
        )
    return spec


def read_header(path: Path) -> dict[str, TensorInfo]:
    """One safetensors file's tensors, checked against the file size before anything is read
    (the merger's check: truncated file, offsets past the end, huge header length)."""
    try:
        return read_safetensors_header(path)
    except HeaderError as exc:
        raise CheckpointError(f"{path} {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def tensor_infos(folder: Path) -> dict[str, TensorInfo]:
    """Tensor name -> where it lives, from the index or the single file; every shard's header is
    checked (CheckpointError naming the file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {str(name): folder / str(fname) for name, fname in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable ({exc})") from None
        # A shard path must be a file name of this folder, never ../x or /x: a model folder
        # must not make us read files elsewhere. (Checked on the text: a Hugging Face cache
        # snapshot's shards are symlinks into ../../blobs, legitimately.)
        for fname in sorted({str(f) for f in weight_map.values()}):
            if not fname or Path(fname).is_absolute() or ".." in Path(fname).parts:
                raise CheckpointError(
                    f"{index}: shard path {fname!r} leaves the model folder: refusing to read it "
                    "(shard paths must be file names in that folder)"
                )
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{folder}: {INDEX_FILE} lists missing shard(s) {missing}")
        headers = {f: read_header(f) for f in sorted(set(files.values()))}
        infos = {}
        for name, f in files.items():
            if name not in headers[f]:
                raise CheckpointError(
                    f"{folder}: {INDEX_FILE} lists tensor {name} in {f.name}, which does not "
                    "hold it"
                )
            infos[name] = headers[f][name]
        return infos
    single = folder / SINGLE_FILE
    candidates = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not candidates:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {other}: only safetensors is supported)" if other else ""
        raise CheckpointError(
            f"{folder}: no model weights (model.safetensors or {INDEX_FILE})" + hint
        )
    infos: dict[str, TensorInfo] = {}
    for f in candidates:
        infos.update(read_header(f))
    return infos


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it, from the index or the single file."""
    return {name: info.file for name, info in tensor_infos(folder).items()}


def name_map(spec: ArchSpec, config: ModelConfig) -> dict[str, str | None]:
    """Every HF name (relative to the text prefix) this config knows -> our name (None: drop)."""
    table = dict(spec.weights)
    if config.attention_bias:
        table.update(spec.bias_weights)
    out: dict[str, str | None] = {}
    for hf_name, ours in table.items():
        if "{}" in hf_name:
            for i in range(config.num_layers):
                out[hf_name.format(i)] = ours.format(i) if ours else None
        else:
            out[hf_name] = ours
    return out


def _text_prefix(spec: ArchSpec, names: set[str]) -> str:
    for prefix in spec.text_prefixes:
        if prefix + "embed_tokens.weight" in names:
            return prefix
    raise CheckpointError(
        "missing tensor embed_tokens.weight under any of the prefixes "
        f"{[p or '(none)' for p in spec.text_prefixes]}"
    )


def read_state(
    folder: Path,
    spec: ArchSpec,
    config: ModelConfig,
    expected: dict[str, torch.Size],
    *,
    dtype: torch.dtype,
    device: torch.device,
    allow_non_finite: bool = False,
) -> dict[str, torch.Tensor]:
    """Our state dict from the folder's safetensors, checked against `expected` shapes.

    `expected` maps our parameter names to shapes; `lm_head.weight` in it means the model wants an
    untied head. Raises CheckpointError naming missing, unknown or mis-shaped tensors, and a
    tensor with NaN/Inf values (also after the cast to `dtype`) unless `allow_non_finite`.
    """
    files = weight_files(folder)
    head_name = next((n for n in LM_HEAD_NAMES if n in files), None)
    names = set(files) - set(LM_HEAD_NAMES)
    prefix = _text_prefix(spec, names)
    table = name_map(spec, config)
    wanted: dict[str, str] = {}  # our name -> HF name
    unknown = []
    for name in sorted(names):
        if not name.startswith(prefix):
            continue  # another part of a multimodal / task checkpoint
        rel = name[len(prefix) :]
        if rel not in table:
            unknown.append(name)
        elif table[rel] is not None:
            wanted[table[rel]] = name
    if unknown:
        raise CheckpointError(
            f"{folder}: unexpected tensor(s) for {spec.name} with this config: "
            f"{_short(unknown)} (inconsistent config.json and weights?)"
        )
    if "lm_head.weight" in expected and head_name is not None:
        wanted["lm_head.weight"] = head_name
    missing = [n for n in expected if n not in wanted]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {_short(missing)}")
    state: dict[str, torch.Tensor] = {}
    load_device = str(device) if device.type != "meta" else "cpu"
    check_device(device)  # (safetensors would say "cannot read" the file instead)
    by_file: dict[Path, list[str]] = {}
    for ours, hf_name in wanted.items():
        by_file.setdefault(files[hf_name], []).append(ours)
    for path, ours_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device=load_device) as fh:
                for ours in ours_names:
                    tensor = fh.get_tensor(wanted[ours])
                    if tuple(tensor.shape) != tuple(expected[ours]):
                        raise CheckpointError(
                            f"{folder}: tensor {wanted[ours]} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(expected[ours])} from config.json"
                        )
                    state[ours] = tensor.to(dtype=dtype)
                    if not allow_non_finite:
                        _check_finite(path, wanted[ours], tensor, state[ours])
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors: name the file
            raise CheckpointError(f"{path}: cannot read ({exc})") from None
    return state


def check_device(device: torch.device | str) -> None:
    """ValueError naming the device when it does not exist here (no CUDA GPU, index too high)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: no CUDA device is available here (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )


def allow_non_finite_default() -> bool:
    """The `BIDIRLM_ALLOW_NON_FINITE=1` opt-out (for experts loading NaN/Inf weights on purpose)."""
    return os.environ.get(ALLOW_NON_FINITE_ENV, "").strip().lower() in ("1", "true", "yes")


def _check_finite(path: Path, name: str, raw: torch.Tensor, cast: torch.Tensor) -> None:
    if not cast.is_floating_point() or bool(torch.isfinite(cast).all()):
        return
    bad = int((~torch.isfinite(cast)).sum())
    where = "" if not bool(torch.isfinite(raw).all()) else f" after the cast to {cast.dtype}"
    raise CheckpointError(
        f"{path}: tensor {name} has {bad} non-finite value(s) (NaN/Inf){where}; refusing to "
        f"load it (allow_non_finite=True, --allow-non-finite or {ALLOW_NON_FINITE_ENV}=1 "
        "loads it anyway)"
    )


def checkpoint_dtype(folder: Path, hf: dict[str, Any]) -> torch.dtype:
    """The dtype config.json records (`dtype` or legacy `torch_dtype`), else the first tensor's."""
    text = hf.get("text_config") or {}
    name = hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for info in tensor_infos(folder).values():
        if info.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return info.dtype
    return torch.float32


def write_state(
    folder: Path,
    spec: ArchSpec,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Write our state dict in the `*ForCausalLM` layout; returns the files written."""
    reverse = {ours: hf for hf, ours in name_map(spec, config).items() if ours is not None}
    tensors: dict[str, torch.Tensor] = {}
    for ours, tensor in state.items():
        if ours == "lm_head.weight":
            hf_name = "lm_head.weight"
        elif ours.startswith("head."):  # a classification head: `score.weight`, as transformers
            hf_name = ours[len("head.") :]
        elif ours in reverse:
            hf_name = "model." + reverse[ours]
        else:
            raise ValueError(f"state: no Hugging Face name for parameter {ours!r}")
        tensors[hf_name] = tensor.detach().to("cpu").contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in [folder / INDEX_FILE, *folder.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _short(names: list[str], limit: int = 8) -> str:
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "")
