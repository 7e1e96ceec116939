"""The released BidirLM-Omni layout, both ways, as data (no remote code is run).

The published BidirLM-Omni checkpoints (`BidirLMOmniModel`, remote code
`modeling_bidirlm_omni.py`) store:

- config.json: `model_type` "bidirlm_omni", `text_config` ("bidirlm_omni_text": Qwen3 fields,
  `rope_theta`, `rope_scaling` with `mrope_section` / `mrope_interleaved`, always bidirectional),
  `vision_config` ("bidirlm_omni_vision": Qwen3-VL vision fields), `audio_config`
  ("bidirlm_omni_audio": Qwen3-ASR encoder fields with `output_dim`), the placeholder ids at the
  top level;
- tensors: `language_model.*` (Qwen3 names without `model.`), `visual.*` (Qwen3-VL vision names)
  and `audio_tower.*` (Qwen3-ASR encoder names; its projector is `audio_tower.proj1` / `proj2`).

Our composite layout (`bidirlm compose`, `OmniEncoder.save_pretrained`) keeps transformers'
names instead: `model.language_model.*`, `model.visual.*`, `model.audio_tower.*`,
`model.multi_modal_projector.linear_1/2`, a `qwen3` text config and a top-level `mrope_section`.
`load_omni` reads both (`to_composite_config`, `composite_name`); `bidirlm export --format
bidirlm-omni` writes the released one (`to_released_config`, `released_name`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bidirlm.runtime.models import checkpoint as ckpt
from bidirlm.runtime.outputs import AtomicFolder

TEXT_TYPE = "bidirlm_omni_text"
VISION_TYPE = "bidirlm_omni_vision"
AUDIO_TYPE = "bidirlm_omni_audio"

# released prefix -> composite prefix, most specific first
_TO_COMPOSITE = (
    ("audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
    ("audio_tower.", "model.audio_tower."),
    ("visual.", "model.visual."),
    ("language_model.", "model.language_model."),
)
_MROPE = ("mrope_section", "mrope_interleaved")


def is_released(config: dict[str, Any]) -> bool:
    """A released-layout BidirLM-Omni config (its text config is "bidirlm_omni_text")."""
    text = config.get("text_config")
    return isinstance(text, dict) and text.get("model_type") == TEXT_TYPE


def composite_name(name: str) -> str:
    """A released tensor name as the composite layout names it (unknown names unchanged)."""
    for old, new in _TO_COMPOSITE:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def released_name(name: str) -> str:
    """A composite tensor name as the released layout names it (unknown names unchanged)."""
    for new, old in _TO_COMPOSITE:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def to_composite_config(config: dict[str, Any]) -> dict[str, Any]:
    """The released config.json as the composite layout writes it (what `OmniEncoder` reads)."""
    out = copy.deepcopy(config)
    text = out["text_config"]
    scaling = dict(text.pop("rope_scaling", None) or {})
    params = dict(text.pop("rope_parameters", None) or {})
    section = scaling.get("mrope_section") or params.get("mrope_section")
    rope = {k: v for k, v in {**scaling, **params}.items() if k not in _MROPE}
    rope["rope_theta"] = float(rope.get("rope_theta", text.pop("rope_theta", 10000.0)))
    text.pop("rope_theta", None)
    rope["rope_type"] = rope.get("rope_type") or rope.pop("type", None) or "default"
    rope.pop("type", None)
    text["rope_parameters"] = rope
    text["model_type"] = "qwen3"
    text["is_causal"] = False  # BidirLMOmniTextConfig is always bidirectional
    if section is not None:
        out["mrope_section"] = [int(x) for x in section]
    for key in ("vision_config", "audio_config"):
        if isinstance(out.get(key), dict):
            out[key].pop("model_type", None)
    if isinstance(out.get("audio_config"), dict):
        out["audio_config"]["model_type"] = "qwen3_asr_encoder"
    return out


def to_released_config(config: dict[str, Any]) -> dict[str, Any]:
    """A composite config.json in the released layout (`to_composite_config` inverts it)."""
    out = {
        k: copy.deepcopy(v)
        for k, v in config.items()
        if k not in ("mrope_section", "text_config", "vision_config", "audio_config")
    }
    out["model_type"] = "bidirlm_omni"
    out["architectures"] = ["BidirLMOmniModel"]
    text = copy.deepcopy(config["text_config"])
    rope = dict(text.pop("rope_parameters", None) or text.pop("rope_scaling", None) or {})
    text.pop("rope_scaling", None)
    text["rope_theta"] = float(rope.pop("rope_theta", text.get("rope_theta", 10000.0)))
    scaling = dict(rope)
    scaling.setdefault("rope_type", "default")
    if config.get("mrope_section") is not None:
        scaling["mrope_section"] = list(config["mrope_section"])
        scaling["mrope_interleaved"] = True
    text["rope_scaling"] = scaling
    text["model_type"] = TEXT_TYPE
    text.pop("is_causal", None)  # implied: the released text encoder has no causal mode
    out["text_config"] = text
    out["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", True))
    for key, kind in (("vision_config", VISION_TYPE), ("audio_config", AUDIO_TYPE)):
        if isinstance(config.get(key), dict):
            sub = {k: copy.deepcopy(v) for k, v in config[key].items() if k != "model_type"}
            out[key] = {"model_type": kind, **sub}
    return out


def image_processor_config(vision_config: dict[str, Any]) -> dict[str, Any]:
    """A Qwen2-VL image processor config matching a vision tower's patch / merge sizes (for a
    checkpoint that ships none): mean/std 0.5 as Qwen3-VL's, at least 4 merged patches a side."""
    patch = int(vision_config.get("patch_size", 16))
    merge = int(vision_config.get("spatial_merge_size", 2))
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": patch,
        "temporal_patch_size": int(vision_config.get("temporal_patch_size", 2)),
        "merge_size": merge,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": (patch * merge) ** 2 * 4, "longest_edge": 16384 * 28 * 28},
    }


def audio_processor_config(audio_config: dict[str, Any]) -> dict[str, Any]:
    """A Qwen3-ASR log-mel feature extractor config matching an audio tower (16 kHz, 10 ms hop,
    its mel bins and window)."""
    return {
        "feature_extractor_type": "Qwen3ASRFeatureExtractor",
        "feature_size": int(audio_config.get("num_mel_bins", 128)),
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "n_window": int(audio_config.get("n_window", 50)),
    }


# --- export: write a checkpoint in the released layouts, tensors streamed bit for bit ---------

LAYOUTS = ("bidirlm", "bidirlm-omni")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)
COPY_FILES = ("preprocessor_config.json", "audio_preprocessor_config.json")
_TEXT_IN = ("model.language_model.", "language_model.")


def _text_config_out(hf: dict[str, Any]) -> dict[str, Any]:
    """A text checkpoint's config.json with its bidirectionality recorded the transformers way."""
    out = copy.deepcopy(hf)
    if out.get("model_type") in ("gemma3_text", "gemma3"):
        out["use_bidirectional_attention"] = True
    else:
        out["is_causal"] = False
    return out


def _plan(
    folder: Path, hf: dict[str, Any], layout: str
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """(config.json to write, {input tensor name: output name, None = left out})."""
    names = ckpt.weight_files(folder)
    omni = hf.get("model_type") == "bidirlm_omni"
    if layout == "bidirlm-omni":
        if not omni:
            raise ValueError(
                f"{folder}: --format bidirlm-omni needs an omni checkpoint (model_type "
                f"bidirlm_omni, from bidirlm compose), got model_type {hf.get('model_type')!r}"
            )
        if is_released(hf):
            return copy.deepcopy(hf), {n: n for n in names}
        return to_released_config(hf), {n: released_name(n) for n in names}
    if not omni:  # a text checkpoint: same tensors, bidirectional config
        return _text_config_out(hf), {n: n for n in names}
    composite = to_composite_config(hf) if is_released(hf) else hf
    text = dict(composite["text_config"])
    text["architectures"] = ["Qwen3ForCausalLM"]
    plan: dict[str, str | None] = {}
    for n in names:
        prefix = next((p for p in _TEXT_IN if n.startswith(p)), None)
        if prefix is not None:
            plan[n] = "model." + n[len(prefix) :]
        else:
            plan[n] = n if n == "lm_head.weight" else None  # the towers stay behind
    return _text_config_out(text), plan


def export_checkpoint(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    layout: str = "bidirlm",
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_non_finite: bool | None = None,
) -> Path:
    """Write checkpoint folder `model` to `output` in a released BidirLM layout.

    `layout` "bidirlm-omni": the BidirLM-Omni layout (see the module docstring) of an omni
    checkpoint; "bidirlm": a bidirectional text checkpoint (`model.*` Qwen3 / Gemma3 names,
    `is_causal: false` / `use_bidirectional_attention: true`; an omni checkpoint gives its text
    backbone). Tensors are streamed shard by shard and renamed, never converted: the output
    holds the input's bytes and dtype unless `dtype` is given. The input is checked first
    (`load_model`: names, shapes, NaN/Inf unless `allow_non_finite`). The folder is built beside
    `output` (same filesystem, nothing under $TMPDIR) and appears only when complete; an
    existing `output`, or one that appears meanwhile, is refused unless `force`.
    """
    from bidirlm.runtime.models.loading import load_model  # loading imports this module

    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    folder = ckpt.resolve(model)
    out = Path(output)
    empty = out.is_dir() and not any(out.iterdir())
    atomic = AtomicFolder(out, force=force, replace_empty=empty, inputs=[folder])
    with atomic as tmp:  # output checked (and its publish lock held) before any work
        hf = ckpt.read_config(folder)
        load_model(folder, allow_non_finite=allow_non_finite)  # one-line errors before writing
        config, plan = _plan(folder, hf, layout)
        by_file: dict[Path, list[str]] = {}
        for name, path in ckpt.weight_files(folder).items():
            if plan.get(name) is not None:
                by_file.setdefault(path, []).append(name)
        files = sorted(by_file)
        index: dict[str, str] = {}
        total = 0
        for i, path in enumerate(files, 1):
            fname = (
                ckpt.SINGLE_FILE
                if len(files) == 1
                else (f"model-{i:05d}-of-{len(files):05d}.safetensors")
            )
            shard: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt") as fh:
                for name in by_file[path]:
                    t = fh.get_tensor(name)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    shard[plan[name]] = t  # type: ignore[index]
                    index[plan[name]] = fname  # type: ignore[index]
                    total += t.numel() * t.element_size()
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            del shard
        if len(files) > 1:
            meta = {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}
            (tmp / ckpt.INDEX_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = name
            if "dtype" not in config and "torch_dtype" not in config:
                config["dtype"] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        extra = COPY_FILES if layout == "bidirlm-omni" else ()
        for fname in (*TOKENIZER_FILES, *extra):
            if (folder / fname).is_file():
                shutil.copyfile(folder / fname, tmp / fname)
        atomic.commit()
    return out


# --- released text checkpoints published with remote code -------------------------------------

# Base families a remote-code BidirLM text config can name, and how each records bidirectionality.
_FAMILIES = (
    ("gemma3", "gemma3_text", "use_bidirectional_attention", True),
    ("qwen3", "qwen3", "is_causal", False),
)


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A text checkpoint's config as our Qwen3 / Gemma3 specs read it.

    Configs of a known `model_type` are returned unchanged. A config that ships remote code
    (`auto_map`) under its own `model_type` (the released BidirLM text models are published that
    way) is read as the base family its `model_type` or `architectures` name (Qwen3 or Gemma3,
    e.g. "biqwen3" / "BiQwen3ForMaskedLM"), bidirectional (these encoders have no causal mode):
    the layout (`model.*` or bare names) and fields are the base family's.
    """
    if hf.get("model_type") in ckpt.MODEL_TYPES or not hf.get("auto_map"):
        return hf
    names = " ".join([str(hf.get("model_type", "")), *map(str, hf.get("architectures") or [])])
    for token, model_type, flag, value in _FAMILIES:
        if token in names.lower():
            out = copy.deepcopy(hf)
            out["model_type"] = model_type
            out.setdefault(flag, value)
            return out
    return hf
