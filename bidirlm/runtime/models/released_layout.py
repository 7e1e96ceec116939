"""The released BidirLM layouts as data: names and configs, both ways (no remote code is run).

`load_omni` and `load_model` read the released layouts through these (`is_released`,
`to_composite_config`, `composite_name`, `text_config`); `released.export_checkpoint` writes
them (`to_released_config`, `released_name`). See `released.py` for the layouts themselves.
"""

from __future__ import annotations

import copy
from typing import Any

from bidirlm.runtime.models import checkpoint as ckpt

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
    # the same under a `model.` prefix (a `*ForMaskedLM` / classifier of the remote code)
    ("model.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
    ("model.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
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


# --- released text checkpoints (BidirLM-270M / 0.6B / 1B / 1.7B, published with remote code) ---

# What the published files show (tests/data/real_configs/bidirlm-*/, sources in its README):
# config.json of BidirLM-1B-Embedding and BidirLM-1.7B-Embedding starts with `architectures`
# ["BidirLMModel"] and this `auto_map`; its `model_type` is "bidirlm" (the repositories' tag and a
# public fine-tuning project's notes); the base model's fields (Gemma3 or Qwen3) sit flat at the top
# level with `classifier_pooling` "late"; 1_Pooling/config.json is mean pooling with the prompt
# included. The Embedding checkpoints are `BidirLMModel` (AutoModel), whose parameters are the base
# model's own names without a `model.` prefix (`embed_tokens.weight`, `layers.{i}.*`,
# `norm.weight`), as a public ONNX export of BidirLM names them (`backbone.embed_tokens.weight`
# under its wrapper); the safetensors index itself was not reached, so the bare names are an
# inference, and `load_model` also reads them under `model.`.
RELEASED_TEXT_TYPE = "bidirlm"
RELEASED_TEXT_ARCH = "BidirLMModel"
RELEASED_TEXT_AUTO_MAP = {
    "AutoConfig": "configuration_bidirlm.BidirLMConfig",
    "AutoModel": "modeling_bidirlm.BidirLMModel",
    "AutoModelForMaskedLM": "modeling_bidirlm.BidirLMForMaskedLM",
    "AutoModelForPreTraining": "modeling_bidirlm.BidirLMPreTrainedModel",
    "AutoModelForSequenceClassification": "modeling_bidirlm.BidirLMForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_bidirlm.BidirLMForTokenClassification",
}
# the released 1_Pooling/config.json, `word_embedding_dimension` set to the hidden size
RELEASED_POOLING = {
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": True,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
}

# Base families a BidirLM text config can hold, and how each records bidirectionality.
_FAMILIES = (
    ("gemma3", "gemma3_text", "use_bidirectional_attention", True),
    ("qwen3", "qwen3", "is_causal", False),
)
# Fields only a Gemma3 config has (the released BidirLM-1B config shows the first four).
_GEMMA3_FIELDS = (
    "_sliding_window_pattern",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "hidden_activation",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
    "sliding_window_pattern",
)


def is_released_text(hf: dict[str, Any]) -> bool:
    """A released-layout BidirLM text config (its own `model_type`, remote code)."""
    return hf.get("model_type") == RELEASED_TEXT_TYPE


def _family(hf: dict[str, Any]) -> tuple[str, str, Any] | None:
    names = " ".join([str(hf.get("model_type", "")), *map(str, hf.get("architectures") or [])])
    for token, model_type, flag, value in _FAMILIES:
        if token in names.lower():
            return model_type, flag, value
    if not is_released_text(hf):
        return None  # another remote-code model: not ours to guess
    gemma = any(k in hf for k in _GEMMA3_FIELDS)
    _, model_type, flag, value = _FAMILIES[0] if gemma else _FAMILIES[1]
    return model_type, flag, value


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A text checkpoint's config as our Qwen3 / Gemma3 specs read it.

    Configs of a known `model_type` are returned unchanged. A released BidirLM text config
    (`model_type` "bidirlm", `BidirLMModel`, remote code) or another remote-code config
    (`auto_map`) under its own `model_type` is read as its base family: named by its
    `model_type` / `architectures` when they say "qwen3" or "gemma3"; a "bidirlm" config that
    does not is Gemma3 when it has Gemma3-only fields (`query_pre_attn_scalar`,
    `hidden_activation`, ...), else Qwen3; any other remote-code config is returned unchanged.
    The result is bidirectional (these encoders have no causal mode) unless it says otherwise.
    """
    if hf.get("model_type") in ckpt.MODEL_TYPES:
        return hf
    if not (is_released_text(hf) or hf.get("auto_map")):
        return hf
    family = _family(hf)
    if family is None:
        return hf
    model_type, flag, value = family
    out = copy.deepcopy(hf)
    out["model_type"] = model_type
    out.setdefault(flag, value)
    return out


def to_released_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A Qwen3 / Gemma3 text config (bidirectionality recorded) in the released BidirLM text
    layout: `model_type` "bidirlm", `BidirLMModel` and its `auto_map`, `classifier_pooling`
    "late" unless set, the base fields kept flat. The legacy RoPE keys the remote code's
    transformers 4.57 reads (`rope_theta`, Gemma3's `rope_local_base_freq`) are added from
    `rope_parameters` when missing. `text_config` of the result gives the input's fields back."""
    out = copy.deepcopy(hf)
    family = out.get("model_type")
    params = out.get("rope_parameters")
    if isinstance(params, dict):
        if family == "gemma3_text":
            full, local = params.get("full_attention"), params.get("sliding_attention")
            if isinstance(full, dict) and "rope_theta" in full:
                out.setdefault("rope_theta", full["rope_theta"])
            if isinstance(local, dict) and "rope_theta" in local:
                out.setdefault("rope_local_base_freq", local["rope_theta"])
        elif "rope_theta" in params:
            out.setdefault("rope_theta", params["rope_theta"])
    out["model_type"] = RELEASED_TEXT_TYPE
    out["architectures"] = [RELEASED_TEXT_ARCH]
    out["auto_map"] = dict(RELEASED_TEXT_AUTO_MAP)
    out.setdefault("classifier_pooling", "late")
    return out


def released_pooling(hidden_size: int) -> dict[str, Any]:
    """The released 1_Pooling/config.json for a model of width `hidden_size`."""
    return {"word_embedding_dimension": int(hidden_size), **RELEASED_POOLING}
