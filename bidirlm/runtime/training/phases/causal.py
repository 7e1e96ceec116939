"""The `causal` phase: next-token prediction on packed documents, causal attention.

Batches: `data.PackedBatches` draws documents from the weighted sources, tokenizes them (the
tokenizer's special tokens, plus EOS) and packs exactly `data.tokens_per_batch` tokens per
micro-batch, sequences at most `data.max_seq_len` long (`cu_seqlens`, no padding). Loss: the
cross-entropy of token t+1 at position t inside each packed sequence, through `mntp_loss` (the
LM head without materializing the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..data import PackedBatch, PackedBatches, RecordSource, check_sources
from .base import IGNORE_INDEX, MicroStep, PhaseBase, RankBatches
from .module import PhaseModule


def next_token_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t+1] inside each packed sequence, IGNORE_INDEX at sequence ends."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = input_ids[1:]
    labels[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return labels


def check_text_sources(config: TrainConfig, log: Callable[[str], None]) -> list[RecordSource]:
    """Open and check every source for its `text_field` (each source names its own)."""
    sources: list[RecordSource] = []
    for source in config.data.sources:
        sources += check_sources(
            [source],
            fields=(source.text_field,),
            skip_bad_records=config.data.skip_bad_records,
            log=log,
        )
    return sources


class CausalPhase(PhaseBase):
    name = "causal"
    step_unit = "tokens"  # train.tokens_per_step (MNTP inherits it)

    @classmethod
    def check(
        cls, config: TrainConfig, model_path: Path, log: Callable[[str], None]
    ) -> list[RecordSource]:
        return check_text_sources(config, log)

    @classmethod
    def bidirectional(cls, config: TrainConfig) -> bool:
        return False

    def module(self) -> nn.Module:
        return PhaseModule(self.encoder)

    def batches(self) -> Any:
        config = self.config
        stream = PackedBatches(
            self.context.data,
            [s.weight for s in config.data.sources],
            self.tokenizer,
            tokens_per_batch=config.data.tokens_per_batch,
            max_seq_len=config.data.max_seq_len,
            seed=config.train.seed,
            text_fields=[s.text_field for s in config.data.sources],
            skip_bad_records=config.data.skip_bad_records,
            rank=self.context.info.rank,
            world=self.context.info.world_size,
        )
        # a streamed source is read per rank (each its own part): no dealing of global batches
        return stream if stream.per_rank else RankBatches(stream, self.context.info)

    def inputs_and_labels(
        self, batch: PackedBatch, micro: MicroStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.input_ids, next_token_labels(batch.input_ids, batch.cu_seqlens)

    def loss(self, module: nn.Module, batch: PackedBatch, micro: MicroStep) -> torch.Tensor:
        inputs, labels = self.inputs_and_labels(batch, micro)
        device = self.context.device
        # The labelled-row count sizes the loss kernel's launches without a device sync: the
        # labels are still on the host here (counting them on a GPU would sync).
        labelled = int((labels != IGNORE_INDEX).sum()) if labels.device.type == "cpu" else None
        with self.context.amp():
            loss = module(
                inputs.to(device),
                batch.cu_seqlens.to(device),
                batch.max_seqlen,
                labels.to(device),
                num_labelled=labelled,
            )
        return loss / micro.accum
