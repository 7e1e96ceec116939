"""Fine-tuning heads on an `Encoder`: sequence classification and token classification (NER)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bidirlm.runtime.models.encoder import Encoder
from bidirlm.runtime.models.pooling import POOLINGS, pool


@dataclass
class ClassifierOutput:
    """`logits` and, when labels were given, the float32 `loss`."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class _Head(nn.Module):
    """Shared part of the heads: argument checks, the encoder, dropout and the linear scorer."""

    def __init__(self, encoder: Encoder, num_labels: int, dropout: float) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = encoder
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(
            encoder.hidden_size, num_labels, device=encoder.device, dtype=encoder.dtype
        )
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)


class SequenceClassifier(_Head):
    """`encoder` -> pooled vector -> dropout -> linear: logits `[N, num_labels]`.

    `num_labels == 1` is regression (MSE against float labels `[N]`); otherwise cross-entropy
    against int labels `[N]` (`-100` ignored).
    """

    def __init__(
        self, encoder: Encoder, num_labels: int, pooling: str = "mean", dropout: float = 0.0
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(
                f"pooling={pooling!r} is not valid; choose one of {', '.join(POOLINGS)}"
            )
        super().__init__(encoder, num_labels, dropout)
        self.pooling = pooling

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """Padded `[B, S]` or packed `[T]` input (as `Encoder.forward`) -> logits `[N, C]`."""
        hidden = self.encoder(
            input_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            position_ids=position_ids,
        )
        pooled = pool(
            hidden, pooling=self.pooling, cu_seqlens=cu_seqlens, attention_mask=attention_mask
        )
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"labels: expected {logits.shape[0]} rows (one per sequence), got "
                    f"{tuple(labels.shape)}"
                )
            if self.num_labels == 1:
                loss = F.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)
        return ClassifierOutput(logits=logits, loss=loss)


class TokenClassifier(_Head):
    """`encoder` -> dropout -> linear per token: logits `[B, S, C]` (padded) or `[T, C]` (packed).

    Loss: cross-entropy over tokens whose label is not `-100` (padding positions are ignored too).
    """

    def __init__(self, encoder: Encoder, num_labels: int, dropout: float = 0.0) -> None:
        super().__init__(encoder, num_labels, dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        hidden = self.encoder(
            input_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            position_ids=position_ids,
        )
        logits = self.score(self.dropout(hidden))
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"labels: shape {tuple(labels.shape)} != token shape {tuple(logits.shape[:-1])}"
                )
            labels = labels.long()
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(
                logits.float().reshape(-1, self.num_labels), labels.reshape(-1), ignore_index=-100
            )
        return ClassifierOutput(logits=logits, loss=loss)
