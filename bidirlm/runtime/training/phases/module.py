"""`PhaseModule`: the encoder and what the causal, MNTP and contrastive phases compute on it.

The loss (or the pooled embeddings) is computed inside one `forward`, so DDP and FSDP2 see every
parameter use (FSDP2 unshards the root's tied LM head only inside forward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bidirlm.kernels import mntp_loss
from bidirlm.runtime.models import pool

from .base import IGNORE_INDEX


class PhaseModule(nn.Module):
    """Wraps an `Encoder`: `forward(ids, cu, max, labels)` -> the LM loss through `mntp_loss`
    (labels given), or the pooled embeddings (no labels); `items=` embeds an `OmniEncoder`
    `prepare` batch (text, image and audio) instead."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(
        self,
        input_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int,
        labels: torch.Tensor | None = None,
        items: dict[str, Any] | None = None,
        num_labelled: int | None = None,
    ) -> torch.Tensor:
        if items is not None:  # an OmniEncoder batch of text/image/audio (multimodal phase)
            return self.encoder.embed_prepared(items, pooling=self.pooling)
        hidden = self.encoder(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # The final norm of the float32 residual stream gives float32; the LM head (and the
            # pooled embeddings) run in the autocast dtype, as an autocast `nn.Linear` would.
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        if labels is not None:
            weight = self.encoder.lm_head_weight
            return mntp_loss(
                hidden,
                weight.to(hidden.dtype),
                labels,
                ignore_index=IGNORE_INDEX,
                softcap=self.encoder.final_logit_softcap,
                num_labelled=num_labelled,
            )
        return pool(hidden, pooling=self.pooling, cu_seqlens=cu_seqlens)
