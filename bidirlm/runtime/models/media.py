"""Inputs of the omnimodal encoder: what an item is, and loading images and audio.

An item is text (`str`), an image (`PIL.Image.Image`, a .png/.jpg/.jpeg path, `{"image": path or
PIL image}`) or audio (`{"array": np.ndarray, "sampling_rate": int}`, a .wav/.flac path,
`{"audio": path or array dict}`). A `str` is a path only when it ends in a media suffix and the
file exists; an `os.PathLike` is always a path. Audio is mixed down to mono float32 and resampled
to the tower's rate (polyphase filter, scipy). Errors are one-line `ValueError`s naming the item.
"""

from __future__ import annotations

import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav", ".flac")
# Media files we recognise but cannot read: a clear error instead of embedding the path as text.
OTHER_MEDIA = (".gif", ".bmp", ".webp", ".tif", ".tiff", ".mp3", ".ogg", ".m4a", ".aac", ".opus")


@dataclass
class Item:
    """One parsed input: `kind` is "text", "image" or "audio"; `value` a str, an RGB PIL image,
    or a mono float32 waveform at `sampling_rate`."""

    kind: str
    value: Any
    sampling_rate: int = 0


def _is_image(x: Any) -> bool:
    try:
        from PIL import Image  # optional dependency ([omni] extra)
    except ImportError:  # pragma: no cover - pillow is a dependency of transformers' processors
        return False
    return isinstance(x, Image.Image)


def _path_kind(path: Path, where: str) -> str:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        kind = "image"
    elif suffix in AUDIO_SUFFIXES:
        kind = "audio"
    else:
        raise ValueError(
            f"{where}: unsupported file {str(path)!r}; images: {', '.join(IMAGE_SUFFIXES)}, "
            f"audio: {', '.join(AUDIO_SUFFIXES)}"
        )
    if not path.is_file():
        raise ValueError(f"{where}: no such file {str(path)!r}")
    return kind


def load_image(source: Any, where: str) -> Any:
    """An RGB PIL image from a PIL image or a path."""
    from PIL import Image, UnidentifiedImageError  # optional dependency ([omni] extra)

    if _is_image(source):
        return source.convert("RGB")
    path = Path(source)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({exc})") from None


def read_audio_file(path: Path, where: str) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, sampling rate) of a .wav (stdlib) or .flac (soundfile) file."""
    if path.suffix.lower() == ".flac":
        try:
            import soundfile  # optional dependency: only for .flac
        except ImportError:
            raise ValueError(
                f"{where}: reading .flac needs the soundfile package (pip install soundfile); "
                "convert to .wav or pass {'array', 'sampling_rate'}"
            ) from None
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(rate)
    try:
        with wave.open(str(path), "rb") as fh:
            rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
            raw = fh.readframes(fh.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise ValueError(f"{where}: cannot read WAV {str(path)!r} ({exc})") from None
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        dt = np.int16 if width == 2 else np.int32
        data = np.frombuffer(raw, dtype=dt).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise ValueError(f"{where}: {8 * width}-bit WAV is not supported (use 8, 16 or 32-bit PCM)")
    return data.reshape(-1, channels).mean(axis=1), int(rate)


def write_wav(path: str | os.PathLike, array: np.ndarray, sampling_rate: int) -> Path:
    """Write a mono float waveform in [-1, 1] as 16-bit PCM WAV (for examples and tests)."""
    path = Path(path)
    pcm = (np.clip(np.asarray(array, dtype=np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(int(sampling_rate))
        fh.writeframes(pcm.tobytes())
    return path


def resample(array: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`array` resampled from `rate` to `target` Hz (scipy's polyphase filter), float32."""
    if rate == target:
        return array.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # optional dependency ([omni] extra)

    g = math.gcd(int(rate), int(target))
    return resample_poly(array, target // g, rate // g).astype(np.float32)


def load_audio(source: Any, target_rate: int, where: str) -> np.ndarray:
    """A mono float32 waveform at `target_rate` from an array dict or a path; non-empty."""
    if isinstance(source, dict):
        missing = [k for k in ("array", "sampling_rate") if k not in source]
        if missing:
            raise ValueError(f"{where}: audio dict needs keys 'array' and 'sampling_rate'")
        array = np.asarray(source["array"], dtype=np.float32)
        rate = source["sampling_rate"]
        if not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"{where}: sampling_rate must be a positive int, got {rate!r}")
        if array.ndim == 2:  # [channels, samples] or [samples, channels]: mix down
            array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
        elif array.ndim != 1:
            raise ValueError(f"{where}: audio array must be 1-D (or 2-D), got {array.shape}")
    else:
        array, rate = read_audio_file(Path(source), where)
    if array.size == 0:
        raise ValueError(f"{where}: empty audio (0 samples)")
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: audio has non-finite samples")
    return resample(array, int(rate), target_rate)


def parse_item(x: Any, index: int, *, audio_rate: int = 16000) -> Item:
    """Classify and load one item (see the module docstring)."""
    where = f"items[{index}]"
    if isinstance(x, dict):
        if "array" in x or "sampling_rate" in x:
            return Item("audio", load_audio(x, audio_rate, where), audio_rate)
        keys = [k for k in ("text", "image", "audio") if k in x]
        if len(keys) != 1:
            raise ValueError(
                f"{where}: a dict item needs exactly one of 'text', 'image', 'audio' or "
                f"'array'+'sampling_rate', got keys {sorted(x)}"
            )
        key = keys[0]
        if key == "text":
            return parse_item(str(x["text"]), index, audio_rate=audio_rate)
        if key == "image":
            src = x["image"]
            if not _is_image(src):
                _path_kind(Path(src), where)
            return Item("image", load_image(src, where))
        src = x["audio"]
        if not isinstance(src, dict):
            _path_kind(Path(src), where)
        return Item("audio", load_audio(src, audio_rate, where), audio_rate)
    if _is_image(x):
        return Item("image", load_image(x, where))
    if isinstance(x, os.PathLike):
        kind = _path_kind(Path(x), where)
        if kind == "image":
            return Item("image", load_image(x, where))
        return Item("audio", load_audio(x, audio_rate, where), audio_rate)
    if isinstance(x, str):
        suffix = Path(x).suffix.lower() if len(x) < 4096 and "\n" not in x else ""
        if suffix in IMAGE_SUFFIXES + AUDIO_SUFFIXES and Path(x).is_file():
            return parse_item(Path(x), index, audio_rate=audio_rate)
        if suffix in OTHER_MEDIA and Path(x).is_file():
            _path_kind(Path(x), where)  # raises: unsupported file
        return Item("text", x)
    if isinstance(x, np.ndarray):
        raise ValueError(
            f"{where}: a bare array is ambiguous; pass audio as {{'array': ..., "
            "'sampling_rate': ...}"
        )
    raise ValueError(
        f"{where}: unsupported item of type {type(x).__name__}; expected str, PIL image, "
        "image/audio path or {'array', 'sampling_rate'}"
    )
