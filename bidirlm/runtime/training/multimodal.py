"""Multimodal contrastive batches: records whose `query`, `positive` and `negatives` are text,
`{"image": path}` or `{"audio": path}` (the BidirLM-Omni contrastive phase).

The contrastive phase needs nothing else of its own: the mixture of modalities is the mixture of
sources (`data.sources` weights, e.g. the paper's 0.65 text-text, 0.175 image-text, 0.175
audio-text), every batch comes from one source, the gradient cache and the fused InfoNCE run on
pooled embeddings whatever their modality, and resuming replays the same records. This module
checks media fields, resolves relative media paths against the data file's folder, and turns a
mixed list into the `OmniEncoder`'s model inputs (`prepare_items`), which the contrastive batch
streams do (`training.phases.contrastive`, `...multimodal_contrastive`). The towers stay frozen
(the `OmniEncoder` default); `contrastive.train_towers = true` unfreezes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MEDIA_KEYS = ("image", "audio")


def is_media(value: Any) -> bool:
    """True for `{"image": path}` / `{"audio": path}` (one key, a non-empty string path)."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value)) in MEDIA_KEYS
        and isinstance(next(iter(value.values())), str)
        and bool(next(iter(value.values())))
    )


def is_item(value: Any) -> bool:
    """Text or a media reference: what a contrastive field may hold."""
    return isinstance(value, str) or is_media(value)


def localize(record: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """`record` with relative media paths made relative to `base` (the data file's folder)."""
    if base is None:
        return record

    def fix(value: Any) -> Any:
        if is_media(value):
            ((key, path),) = value.items()
            if not Path(path).is_absolute():
                return {key: str(base / path)}
        return value

    out = dict(record)
    for field in ("query", "positive"):
        if field in out:
            out[field] = fix(out[field])
    if isinstance(out.get("negatives"), list):
        out["negatives"] = [fix(n) for n in out["negatives"]]
    return out


def has_media(items: list[Any]) -> bool:
    return any(not isinstance(x, str) for x in items)


def prepare_items(encoder: Any, items: list[Any], max_len: int) -> dict[str, Any]:
    """The `OmniEncoder.prepare` batch of a mixed list (text, `{"image"|"audio": path}`): the
    tokens, the placeholder tokens of each image / audio clip and the towers' inputs."""
    if not hasattr(encoder, "embed_items"):
        first = next((x for x in items if not isinstance(x, str)), items[0] if items else None)
        raise ValueError(
            f"data: a record holds {first!r}, but the model is text-only: compose an omni "
            "model first (bidirlm compose)"
        )
    return encoder.prepare(encoder.parse(items), max_length=max_len)
