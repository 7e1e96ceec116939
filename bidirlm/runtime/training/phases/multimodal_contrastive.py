"""The `multimodal-contrastive` phase: the BidirLM-Omni contrastive phase on a composed omni
model (`bidirlm compose`), records whose `query`, `positive` and `negatives` are text,
`{"image": path}` or `{"audio": path}` (paths relative to the data file).

It is the contrastive phase with every chunk, text included, prepared by the `OmniEncoder`
(`training.multimodal.prepare_items`: tokens, image / audio placeholder tokens, the towers'
inputs) inside the batch stream, and a model check before any step. The mixture of modalities
is the mixture of sources (the paper's 0.65 text-text, 0.175 image-text, 0.175 audio-text as
`data.sources` weights); the towers stay frozen unless `contrastive.train_towers = true`. The
`contrastive` phase also takes such records on an omni model (chunk by chunk); this one says
so in the config and fails early on a text-only model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..multimodal import prepare_items
from .base import PhaseContext
from .contrastive import ContrastivePhase, EmbedChunk


class MultimodalContrastivePhase(ContrastivePhase):
    name = "multimodal-contrastive"

    def __init__(self, context: PhaseContext, encoder: nn.Module) -> None:
        if not hasattr(encoder, "embed_items"):
            raise ValueError(
                f"phase {self.name!r}: model {context.config.model} is text-only; compose an "
                "omni model first (bidirlm compose) or use phase 'contrastive'"
            )
        super().__init__(context, encoder)

    def encode(self, items: Sequence[Any], max_len: int) -> EmbedChunk:
        prepared = prepare_items(self.encoder, list(items), max_len)
        return EmbedChunk(prepared, len(items), int(prepared["input_ids"].numel()))
