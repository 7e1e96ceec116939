"""The `mntp` phase: masked next-token prediction (the BidirLM adaptation), bidirectional.

The batches are the causal phase's (packed documents). Each micro-batch is masked by
`masking.mask_for_mntp` (`mntp.mask_ratio` of the tokens, special tokens never) with a generator
seeded from `train.seed` and the batch's position in the global stream, so a resumed or
distributed run masks alike; position i predicts the masked token i+1 through `mntp_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..data import PackedBatch, RecordSource
from ..masking import check_mask_token, mask_for_mntp, mask_token_id_for
from .base import IGNORE_INDEX, MicroStep, PhaseContext, derived_seed
from .causal import CausalPhase, check_text_sources


class MNTPPhase(CausalPhase):
    name = "mntp"

    @classmethod
    def check(
        cls, config: TrainConfig, model_path: Path, log: Callable[[str], None]
    ) -> list[RecordSource]:
        sources = check_text_sources(config, log)
        check_mask_token(model_path, config.mntp.mask_token)
        return sources

    @classmethod
    def bidirectional(cls, config: TrainConfig) -> bool:
        return True

    def __init__(self, context: PhaseContext, encoder: nn.Module) -> None:
        super().__init__(context, encoder)
        self.mask_token_id = mask_token_id_for(self.tokenizer, self.config.mntp.mask_token)
        self.special_ids = tuple(
            i for i in self.tokenizer.all_special_ids if i != self.mask_token_id
        )

    def inputs_and_labels(
        self, batch: PackedBatch, micro: MicroStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seed = derived_seed(self.config.train.seed, 7, micro.global_index)
        return mask_for_mntp(
            batch.input_ids,
            mask_token_id=self.mask_token_id,
            mask_ratio=self.config.mntp.mask_ratio,
            generator=torch.Generator().manual_seed(seed),
            special_token_ids=self.special_ids,
            cu_seqlens=batch.cu_seqlens,
            ignore_index=IGNORE_INDEX,
        )
