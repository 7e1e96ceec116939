"""Tiny checkpoints for the merge tests: Qwen3, Qwen3-VL and Qwen3-ASR layouts, random weights.

Models are built from transformers configs (so tensor names and shapes are the real ones) and
perturbed per seed, so merged values differ from every input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    tie_word_embeddings=True,
)


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def qwen3(
    folder: Path,
    seed: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard: str | None = "12KB",
    vocab: int = 128,
    base_seed: int = 0,
) -> Path:
    """A 2-layer Qwen3 causal LM, `base_seed` weights plus seed-specific noise, saved HF-style."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(base_seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TEXT, "vocab_size": vocab}))
    _perturb(model, 1000 + seed, 0.05)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder


# Placeholder token ids inside the tiny vocabulary (the real ones, 151655..., are beyond 128).
VISION_IDS = dict(
    image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123
)
AUDIO_IDS = dict(audio_token_id=124, audio_start_token_id=125, audio_end_token_id=126)


def qwen3_vl(folder: Path, seed: int) -> Path:
    """A tiny Qwen3-VL: `model.language_model.*` + `model.visual.*` (tied embeddings), the same
    rope_theta as `qwen3` (10000) and placeholder ids inside the vocabulary."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    text = {**TEXT, "rope_parameters": rope}
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        deepstack_visual_indexes=[0],
        patch_size=4,
        temporal_patch_size=1,
        spatial_merge_size=1,
    )
    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, **VISION_IDS
    )
    model = Qwen3VLForConditionalGeneration(cfg)
    _perturb(model, 2000 + seed, 0.05)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def qwen3_asr(folder: Path, seed: int) -> Path:
    """A tiny Qwen3-ASR in the released checkpoints' layout: `thinker.model.*` (text),
    `thinker.audio_tower.*` and `thinker.multi_modal_projector.*`.

    transformers builds it as `model.language_model.*`, `model.audio_tower.*`, ...; the released
    checkpoints name the same tensors under `thinker.`, which is what users merge.
    """
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    audio = dict(
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        d_model=16,
        output_dim=32,
        num_mel_bins=16,
        downsample_hidden_size=8,
    )
    torch.manual_seed(0)
    model = Qwen3ASRForConditionalGeneration(Qwen3ASRConfig(text_config=TEXT, audio_config=audio))
    _perturb(model, 3000 + seed, 0.05)
    renames = {
        "model.language_model.": "thinker.model.",
        "model.": "thinker.",  # audio tower and projector
    }
    tensors = {}
    for name, t in model.to(torch.bfloat16).state_dict().items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if name == "lm_head.weight":  # tied to the embeddings
            continue
        tensors[name] = t.contiguous()
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    thinker = {
        "audio_config": model.config.audio_config.to_dict(),
        "text_config": model.config.text_config.to_dict(),
        **AUDIO_IDS,
    }
    config = {"model_type": "qwen3_asr", "thinker_config": thinker}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_raw(folder: Path, tensors: dict[str, torch.Tensor], **files: str) -> Path:
    """A minimal checkpoint folder: one model.safetensors plus extra text files."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (distinguishes -0.0 from 0.0 and compares NaN payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
