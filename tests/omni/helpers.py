"""Shared tiny omni setup for tests/omni: the embedded tiny text model and two specialists of its
shape, plus media files written on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def specialists(root: Path) -> dict[str, Path]:
    """The embedded tiny text model and random tiny Qwen3-VL / Qwen3-ASR of its shape."""
    from transformers import AutoConfig

    from bidirlm.recipe.omni_specialists import build_audio_specialist, build_vision_specialist
    from bidirlm.runtime.embedded import embedded_tiny_model

    text = embedded_tiny_model()
    cfg = AutoConfig.from_pretrained(text)
    return {
        "text": text,
        "vision": build_vision_specialist(root / "vl", cfg),
        "audio": build_audio_specialist(root / "asr", cfg),
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def image(seed: int, size: tuple[int, int] = (48, 32)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def tone(freq: float, seconds: float = 0.6, rate: int = 16000) -> dict:
    t = np.arange(int(seconds * rate)) / rate
    return {"array": (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), "sampling_rate": rate}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
