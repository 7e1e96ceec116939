"""Inputs of the omnimodal encoder: what an item is, and loading images and audio.

An item is text (`str`), an image (`PIL.Image.Image`, a .png/.jpg/.jpeg path, `{"image": path or
PIL image}`) or audio (`{"array": np.ndarray, "sampling_rate": int}`, a .wav/.flac path,
`{"audio": path or array dict}`). A bare `str` that looks like a media path (one line ending in an
image/audio suffix, with no whitespace or starting like a path: `/`, `./`, `../`, `~/`, `C:`)
is a path, and an error when the file does not exist; any other `str` is text, even one that
mentions `fig.png` among other words. `{"text": ...}`, `{"image": ...}` and `{"audio": ...}` say
the kind outright. An `os.PathLike` is always a path. Audio is mixed down to mono float32 and
resampled to the tower's rate (polyphase filter, scipy). Errors are one-line `ValueError`s naming
the item.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav", ".flac")
# Media files we recognise but cannot read: a clear error instead of embedding the path as text.
OTHER_MEDIA = (".gif", ".bmp", ".webp", ".tif", ".tiff", ".mp3", ".ogg", ".m4a", ".aac", ".opus")
# Largest image accepted, in pixels (width x height): 100 megapixels. The vision processor
# resizes every image down to its max_pixels anyway, and decoding a 144-megapixel PNG costs
# ~1.8 GB (3 bytes a pixel, twice); raise it here if you really need more.
MAX_IMAGE_PIXELS = 100_000_000
# Largest audio sample magnitude accepted: float PCM is in [-1, 1]; up to 2**31 covers int16/int32
# PCM passed unscaled. Far beyond (~1e17) the mel power spectrum overflows float32 to inf/NaN.
MAX_AUDIO_AMPLITUDE = float(2**31)
# How a path begins: absolute, relative to here or a parent, the home folder, a Windows drive.
_PATH_START = re.compile(r"^(/|\./|\.\./|~/|[A-Za-z]:[\\/])")


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


def looks_like_media_path(text: str) -> bool:
    """Whether a bare string is meant as a media file: one line ending in a media suffix, and
    either a single word or beginning like a path (see the module docstring)."""
    if len(text) >= 4096 or "\n" in text or text != text.strip():
        return False
    if Path(text).suffix.lower() not in IMAGE_SUFFIXES + AUDIO_SUFFIXES + OTHER_MEDIA:
        return False
    return not any(c.isspace() for c in text) or bool(_PATH_START.match(text))


def load_image(source: Any, where: str) -> Any:
    """An RGB PIL image from a PIL image or a path; at most `MAX_IMAGE_PIXELS` (checked from the
    header, before decoding)."""
    from PIL import Image, UnidentifiedImageError  # optional dependency ([omni] extra)

    if _is_image(source):
        _check_pixels(source.size, where)
        return source.convert("RGB")
    path = Path(source)
    too_big = f"{where}: image {str(path)!r} has more than {MAX_IMAGE_PIXELS:,} pixels"
    try:
        with warnings.catch_warnings():  # our own limit below replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            _check_pixels(img.size, f"{where}: image {str(path)!r}")
            return img.convert("RGB")
    except Image.DecompressionBombError:  # (above twice PIL's own limit: size not even read)
        raise ValueError(f"{too_big} (limit: media.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: cannot read image {str(path)!r} ({exc})") from None


def _check_pixels(size: tuple[int, int], what: str) -> None:
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what}: {w}x{h} = {w * h / 1e6:.1f} megapixels, above the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} (media.MAX_IMAGE_PIXELS); downscale it first"
        )


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
    peak = float(np.abs(array).max())
    if peak > MAX_AUDIO_AMPLITUDE:
        raise ValueError(
            f"{where}: audio peaks at amplitude {peak:.3g}; expected float samples in [-1, 1] "
            f"(at most {MAX_AUDIO_AMPLITUDE:.3g}, media.MAX_AUDIO_AMPLITUDE)"
        )
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
        if key == "text":  # text outright, even when it looks like a path
            if not isinstance(x["text"], str):
                raise ValueError(
                    f"{where}: 'text' must be a string, got {type(x['text']).__name__}"
                )
            return Item("text", x["text"])
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
        if looks_like_media_path(x):
            path = Path(x).expanduser()
            if not path.is_file():
                what = "a folder" if path.is_dir() else "no such file"
                raise ValueError(
                    f"{where}: {what} {x!r} (a media path; pass {{'text': ...}} to embed it as "
                    "text)"
                )
            return parse_item(path, index, audio_rate=audio_rate)  # unsupported kinds raise
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
