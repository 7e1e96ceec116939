"""Tiny Qwen3-VL- and Qwen3-ASR-shaped specialists built from transformers configs (no download).

Their text backbone has the shape of a given Qwen3 config (so they compose with a text encoder
of that shape); their placeholder ids sit at the top of the vocabulary (the tiny tokenizer has no
`<|image_pad|>`, these ids only ever appear as placeholders). The vision tower cuts 16x16 patches
(no spatial merge, one temporal frame); the audio tower reads 32 log-mel bins in chunks of 100
frames (1 s -> 13 tokens, transformers' fixed chunking). Used by the omni demo and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime.models.omni import _require

VISION_TOWER = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    temporal_patch_size=1,
    spatial_merge_size=1,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0],
)
AUDIO_TOWER = dict(
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    d_model=32,
    num_mel_bins=32,
    downsample_hidden_size=8,
    n_window=50,  # transformers' Qwen3ASREncoder assumes 100-frame chunks (13 tokens each)
    n_window_infer=400,
    max_position_embeddings=13,
)
IMAGE_PROCESSOR = dict(
    patch_size=16,
    temporal_patch_size=1,
    merge_size=1,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    size={"shortest_edge": 16 * 16 * 2, "longest_edge": 16 * 16 * 256},
)
AUDIO_FEATURES = dict(feature_size=32, sampling_rate=16000, hop_length=160, n_fft=400, n_window=50)


def placeholder_ids(vocab_size: int) -> dict[str, int]:
    """Image and audio placeholder / marker ids: the last 7 ids of the vocabulary."""
    names = [
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "audio_token_id",
        "audio_start_token_id",
        "audio_end_token_id",
    ]
    return {name: vocab_size - 1 - i for i, name in enumerate(names)}


def _text_dict(text_config: Any) -> dict[str, Any]:
    cfg = text_config.to_dict() if hasattr(text_config, "to_dict") else dict(text_config)
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "hidden_act",
    )
    out = {k: cfg[k] for k in keep if k in cfg}
    params = cfg.get("rope_parameters") or {}
    out["rope_theta"] = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return out


def build_vision_specialist(folder: Path, text_config: Any, *, seed: int = 1) -> Path:
    """A random tiny Qwen3-VL (`Qwen3VLForConditionalGeneration`) + its image processor."""
    Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration = _require(
        ["Qwen2VLImageProcessorPil", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration"],
        "the tiny vision specialist",
    )

    text = _text_dict(text_config)
    half = text["head_dim"] // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": section,
    }
    ids = placeholder_ids(text["vocab_size"])
    vision = {**VISION_TOWER, "out_hidden_size": text["hidden_size"]}
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=text.get("tie_word_embeddings", True),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(str(folder))
    return Path(folder)


def build_audio_specialist(folder: Path, text_config: Any, *, seed: int = 2) -> Path:
    """A random tiny Qwen3-ASR (`Qwen3ASRForConditionalGeneration`) + its feature extractor."""
    Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration = _require(
        ["Qwen3ASRConfig", "Qwen3ASRFeatureExtractor", "Qwen3ASRForConditionalGeneration"],
        "the tiny audio specialist",
    )

    text = _text_dict(text_config)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    ids = placeholder_ids(text["vocab_size"])
    audio = {**AUDIO_TOWER, "output_dim": text["hidden_size"]}
    config = Qwen3ASRConfig(
        audio_config=audio,
        text_config=text,
        audio_token_id=ids["audio_token_id"],
    )
    config.audio_start_token_id = ids["audio_start_token_id"]
    config.audio_end_token_id = ids["audio_end_token_id"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ASRForConditionalGeneration(config)
    model.save_pretrained(folder)
    Qwen3ASRFeatureExtractor(**AUDIO_FEATURES).save_pretrained(str(folder))
    return Path(folder)
