"""The released BidirLM layouts, both ways, as data (no remote code is run).

The published BidirLM-Omni checkpoints (`BidirLMOmniModel`, remote code
`modeling_bidirlm_omni.py`) store:

- config.json: `model_type` "bidirlm_omni", `text_config` ("bidirlm_omni_text": Qwen3 fields,
  `rope_theta`, `rope_scaling` with `mrope_section` / `mrope_interleaved`, always bidirectional),
  `vision_config` ("bidirlm_omni_vision": Qwen3-VL vision fields), `audio_config`
  ("bidirlm_omni_audio": Qwen3-ASR encoder fields with `output_dim`), the placeholder ids at the
  top level (the schema of `configuration_bidirlm_omni.py`, read in a public copy);
- tensors: `language_model.*` (Qwen3 names without `model.`), `visual.*` (Qwen3-VL vision names)
  and `audio_tower.*` (Qwen3-ASR encoder names; its projector is `audio_tower.proj1` / `proj2`),
  the names a public GGUF converter of BidirLM-Omni-2.5B-Embedding reads.

The released text checkpoints (BidirLM-270M / 0.6B / 1B / 1.7B, `BidirLMModel`, remote code
`modeling_bidirlm.py`): see `released_layout` (what was found of them, and what is inferred).

Our composite layout (`bidirlm compose`, `OmniEncoder.save_pretrained`) keeps transformers'
names instead: `model.language_model.*`, `model.visual.*`, `model.audio_tower.*`,
`model.multi_modal_projector.linear_1/2`, a `qwen3` text config and a top-level `mrope_section`.
`load_omni` reads both (`to_composite_config`, `composite_name`); `bidirlm export --format
bidirlm-omni` writes the released one (`to_released_config`, `released_name`), `--format
bidirlm` the released text layout (`to_released_text_config`).
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
from bidirlm.runtime.models.loading import load_model
from bidirlm.runtime.models.released_layout import (  # the names and configs, re-exported here
    AUDIO_TYPE,
    RELEASED_TEXT_ARCH,
    RELEASED_TEXT_AUTO_MAP,
    RELEASED_TEXT_TYPE,
    TEXT_TYPE,
    VISION_TYPE,
    audio_processor_config,
    composite_name,
    image_processor_config,
    is_released,
    is_released_text,
    released_name,
    released_pooling,
    text_config,
    to_composite_config,
    to_released_config,
    to_released_text_config,
)
from bidirlm.runtime.outputs import TOKENIZER_FILES, AtomicFolder

__all__ = [
    "AUDIO_TYPE",
    "COPY_FILES",
    "LAYOUTS",
    "RELEASED_TEXT_ARCH",
    "RELEASED_TEXT_AUTO_MAP",
    "RELEASED_TEXT_TYPE",
    "TEXT_TYPE",
    "TOKENIZER_FILES",
    "VISION_TYPE",
    "audio_processor_config",
    "composite_name",
    "export_checkpoint",
    "image_processor_config",
    "is_released",
    "is_released_text",
    "released_name",
    "released_pooling",
    "text_config",
    "to_composite_config",
    "to_released_config",
    "to_released_text_config",
]

# --- export: write a checkpoint in the released layouts, tensors streamed bit for bit ---------

LAYOUTS = ("bidirlm", "bidirlm-omni")
COPY_FILES = ("preprocessor_config.json", "audio_preprocessor_config.json")
_TEXT_IN = ("model.language_model.", "language_model.")
_TEXT_TYPES = ("qwen3", "gemma3_text")  # families the released text layout holds


def _text_config_out(hf: dict[str, Any]) -> dict[str, Any]:
    """A text checkpoint's config.json with its bidirectionality recorded the transformers way."""
    out = copy.deepcopy(hf)
    if out.get("model_type") in ("gemma3_text", "gemma3"):
        out["use_bidirectional_attention"] = True
    else:
        out["is_causal"] = False
    return out


def _text_plan(
    names: list[str], hf: dict[str, Any], prefixes: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The released text layout of a Qwen3 / Gemma3 text config `hf` (standard `model_type`)
    whose backbone tensors sit under the first of `prefixes` that holds `embed_tokens.weight`:
    backbone names without the prefix (`BidirLMModel`), `lm_head.weight` kept when stored (an
    untied MNTP head; `BidirLMModel` ignores it), every other tensor left behind."""
    have = set(names)
    prefix = next((p for p in prefixes if p + "embed_tokens.weight" in have), None)
    if prefix is None:
        raise ValueError(f"no embed_tokens.weight under any of the prefixes {list(prefixes)}")
    plan: dict[str, str | None] = {}
    for n in names:
        if n in ckpt.LM_HEAD_NAMES:
            plan[n] = "lm_head.weight"
        elif n.startswith(prefix):
            plan[n] = n[len(prefix) :]
        else:
            plan[n] = None
    return to_released_text_config(_text_config_out(hf)), plan


def _plan(
    folder: Path, hf: dict[str, Any], layout: str
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """(config.json to write, {input tensor name: output name, None = left out})."""
    names = list(ckpt.weight_files(folder))
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
    if omni:  # the text backbone of an omni checkpoint
        composite = to_composite_config(hf) if is_released(hf) else hf
        text = dict(composite["text_config"])
        text["architectures"] = ["Qwen3ForCausalLM"]
        text["model_type"] = "qwen3"
        return _text_plan(names, text, _TEXT_IN)
    family = text_config(hf)  # a released text config reads as its base family
    spec = ckpt.MODEL_TYPES.get(family.get("model_type"))
    if spec is None or family.get("model_type") not in _TEXT_TYPES:
        return _text_config_out(hf), {n: n for n in names}  # another layout: flag only
    return _text_plan(names, family, spec.text_prefixes)


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
    checkpoint; "bidirlm": the released BidirLM text layout (`model_type` "bidirlm",
    `BidirLMModel` + `auto_map`, the Qwen3 / Gemma3 fields flat, bidirectionality recorded the
    transformers way too; backbone tensors without a `model.` prefix, a stored `lm_head.weight`
    kept; `1_Pooling/config.json` mean pooling) of a Qwen3 / Gemma3 text checkpoint, of a
    released one, or of an omni checkpoint's text backbone. The remote code files
    (`configuration_bidirlm.py`, `modeling_bidirlm.py`) are not written: transformers needs them
    beside the output (from a released repository) for `trust_remote_code`; `load_model` does
    not. Tensors are streamed shard by shard and renamed, never converted: the output holds the
    input's bytes and dtype unless `dtype` is given. The input is checked first (`load_model`:
    names, shapes, NaN/Inf unless `allow_non_finite`). The folder is built beside `output`
    (same filesystem, nothing under $TMPDIR) and appears only when complete; an existing
    `output`, or one that appears meanwhile, is refused unless `force`.
    """
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
        if is_released_text(config):  # the released Embedding repos' pooling module
            pooling = tmp / "1_Pooling"
            pooling.mkdir()
            body = released_pooling(int(text_config(config)["hidden_size"]))
            (pooling / "config.json").write_text(json.dumps(body, indent=2) + "\n")
        atomic.commit()
    return out
