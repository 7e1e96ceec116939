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

Fine-tuning records with media (`{"image": path, "text", "label"}`, `{"audio": path, ...}`, the
`sequence-classification` phase, `bidirlm eval --task`, `bidirlm predict`) become one sequence
each, media tokens then text tokens (`task_inputs`); `check_task_media` refuses them on a model
that cannot read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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


# --------------------------------------------------------------------------------------------
# Fine-tuning records with media (`{"image" | "audio": path, "text": ..., "label": ...}`)
# --------------------------------------------------------------------------------------------


def check_task_media(encoder: Any, examples: Sequence[Any], model: str) -> None:
    """One-line error when fine-tuning examples hold media the model cannot read: a text-only
    model, or an omni model without the tower of that kind."""
    first = next((ex.media for ex in examples if getattr(ex, "media", None)), None)
    if first is None:
        return
    kind, _path, where = first
    if not hasattr(encoder, "forward_multimodal"):
        raise ValueError(
            f"{where}: an {kind} record, but the model {model} is text-only: compose an omni "
            "model first (bidirlm compose)"
        )
    for ex in examples:
        if ex.media is None:
            continue
        kind, _path, where = ex.media
        tower = encoder.visual if kind == "image" else encoder.audio_tower
        if tower is None:
            raise ValueError(f"{where}: an {kind} record, but {model} has no {kind} tower")


def task_inputs(encoder: Any, batch: Any) -> dict[str, Any]:
    """The `OmniEncoder.forward_multimodal` inputs of a packed fine-tuning batch
    (`task_data.TaskBatch`) whose examples may carry an image or audio clip.

    Each media example becomes one sequence: the media's framed placeholder tokens (as
    `OmniEncoder.prepare` lays them out, with their MRoPE positions), then the text's tokens with
    positions continuing after the largest media position (Qwen3-VL's layout for text that
    follows an image). Text-only examples keep their tokens and plain positions. Returns
    `input_ids [T]`, `position_ids [3, T]`, `cu_seqlens [N+1]` int32, `max_seqlen` and the
    towers' inputs of the batch's media.
    """
    media = batch.media or [None] * (len(batch.cu_seqlens) - 1)
    wanted = [m for m in media if m is not None]
    parsed = []
    for kind, path, where in wanted:
        try:
            parsed.extend(encoder.parse([{kind: path}]))
        except ValueError as exc:
            raise ValueError(f"{where}: {str(exc).removeprefix('items[0]: ')}") from None
    prep = encoder.prepare(parsed) if parsed else {}
    cu = batch.cu_seqlens.tolist()
    mcu = prep["cu_seqlens"].tolist() if parsed else [0]
    ids, positions, lengths = [], [], []
    j = 0
    for k, m in enumerate(media):
        text = batch.input_ids[cu[k] : cu[k + 1]]
        start = 0
        if m is not None:
            seg = slice(mcu[j], mcu[j + 1])
            ids.append(prep["input_ids"][seg])
            pos = prep["position_ids"][:, seg]
            positions.append(pos)
            start = int(pos.max()) + 1
            j += 1
        ids.append(text)
        positions.append((torch.arange(len(text)) + start).expand(3, -1))
        lengths.append(sum(len(x) for x in ids[-2 if m is not None else -1 :]))
    out = {k: v for k, v in prep.items() if k not in ("input_ids", "position_ids", "cu_seqlens")}
    out.pop("max_seqlen", None)
    cu_out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_out[1:] = torch.tensor(lengths).cumsum(0)
    out.update(
        input_ids=torch.cat(ids).long(),
        position_ids=torch.cat(positions, dim=1),
        cu_seqlens=cu_out,
        max_seqlen=max(lengths),
    )
    return out
