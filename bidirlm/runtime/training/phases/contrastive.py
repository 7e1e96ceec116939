"""The `contrastive` phase: in-batch InfoNCE on pooled embeddings, bidirectional.

Batches: `data.PairBatches` draws one dataset per batch (by weight) and `data.batch_size`
(query, positive, hard negatives) records of it; `ContrastiveBatches` keeps this rank's
contiguous shard and tokenizes it into chunks ready for the model: the queries (each prefixed
with its source's `instruction`, and a `symmetric` source's documents too) cut to
`data.query_max_len` tokens, the documents (positives, then hard negatives) to
`data.document_max_len`; one chunk each, or chunks of
`contrastive.mini_batch_size` for the gradient cache. A chunk holding images or audio
(`{"image": path}` records, on an omni model) is prepared by the `OmniEncoder`.

Loss: `infonce_loss` of the pooled queries against every document of the batch, gathered across
ranks (`contrastive.temperature`, `symmetric`); with `mini_batch_size > 0` the gradient cache
(`gradcache.cached_backward_chunks`) backpropagates chunk by chunk, so the phase runs its own
backward (`backpropagates`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bidirlm.kernels import infonce_loss

from .. import distributed as dist_utils
from ..config import TrainConfig
from ..data import (
    CONTRASTIVE_FIELDS,
    PackedBatch,
    PairBatches,
    RecordSource,
    check_sources,
    pack_texts,
)
from ..gradcache import cached_backward_chunks
from ..multimodal import has_media, prepare_items
from .base import MicroStep, PhaseBase, PhaseContext
from .module import PhaseModule


@dataclass
class EmbedChunk:
    """Model-ready inputs of `rows` texts or items: a packed text batch, or an `OmniEncoder`
    `prepare` batch (a dict) for text, image and audio."""

    inputs: PackedBatch | dict[str, Any]
    rows: int
    num_tokens: int


@dataclass
class ContrastiveBatch:
    """This rank's queries and documents (positives first, then hard negatives), in chunks."""

    queries: list[EmbedChunk]
    documents: list[EmbedChunk]
    dataset: str

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.queries + self.documents)


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`items` in runs of `size` (all at once when `size` is 0)."""
    size = size if size > 0 else max(len(items), 1)
    return [items[i : i + size] for i in range(0, len(items), size)]


class ContrastiveBatches:
    """`PairBatches` sharded for this rank and tokenized into `EmbedChunk`s by `encode`."""

    def __init__(
        self,
        pairs: PairBatches,
        encode: Callable[[Sequence[Any], int], EmbedChunk],
        *,
        rank: int,
        world: int,
        query_max_len: int,
        document_max_len: int,
        chunk_size: int,
    ) -> None:
        self.pairs = pairs
        self.encode = encode
        self.rank, self.world = rank, world
        self.query_max_len, self.document_max_len = query_max_len, document_max_len
        self.chunk_size = chunk_size

    def next_batch(self) -> ContrastiveBatch:
        mine = self.pairs.next_batch().shard(self.rank, self.world)
        documents = mine.positives + mine.negatives
        return ContrastiveBatch(
            [self.encode(c, self.query_max_len) for c in chunked(mine.queries, self.chunk_size)],
            [self.encode(c, self.document_max_len) for c in chunked(documents, self.chunk_size)],
            mine.dataset,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.pairs.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pairs.load_state_dict(state)

    @property
    def bad_records(self) -> int:
        return self.pairs.bad_records

    @property
    def first_bad(self) -> str | None:
        return self.pairs.first_bad


class ContrastivePhase(PhaseBase):
    name = "contrastive"
    backpropagates = True
    step_unit = "pairs"  # train.pairs_per_step

    @classmethod
    def check(
        cls, config: TrainConfig, model_path: Path, log: Callable[[str], None]
    ) -> list[RecordSource]:
        return check_sources(
            config.data.sources,
            fields=CONTRASTIVE_FIELDS,
            skip_bad_records=config.data.skip_bad_records,
            log=log,
        )

    def __init__(self, context: PhaseContext, encoder: nn.Module) -> None:
        super().__init__(context, encoder)
        config, world = self.config, context.info.world_size
        if config.data.batch_size % world:
            raise ValueError(
                f"data.batch_size={config.data.batch_size} must be a multiple of the "
                f"{world} processes"
            )
        if config.contrastive.train_towers:  # omni towers are frozen unless asked
            if not hasattr(encoder, "freeze_towers"):
                raise ValueError("contrastive.train_towers: the model has no vision/audio tower")
            encoder.freeze_towers(False)

    def module(self) -> nn.Module:
        return PhaseModule(self.encoder, self.config.contrastive.pooling)

    def encode(self, items: Sequence[Any], max_len: int) -> EmbedChunk:
        """Model inputs of a chunk: packed tokens, or the `OmniEncoder`'s for image/audio."""
        if has_media(list(items)):
            prepared = prepare_items(self.encoder, list(items), max_len)
            return EmbedChunk(prepared, len(items), int(prepared["input_ids"].numel()))
        ids, cu, longest = pack_texts(self.tokenizer, items, max_len)
        return EmbedChunk(PackedBatch(ids, cu, longest), len(items), int(ids.numel()))

    def batches(self) -> ContrastiveBatches:
        config, info = self.config, self.context.info
        pairs = PairBatches(
            self.context.data,
            [s.weight for s in config.data.sources],
            batch_size=config.data.batch_size,
            seed=config.train.seed,
            negatives_per_query=config.data.negatives_per_query,
            instructions=[s.instruction for s in config.data.sources],
            symmetric=[s.symmetric for s in config.data.sources],
            skip_bad_records=config.data.skip_bad_records,
        )
        return ContrastiveBatches(
            pairs,
            self.encode,
            rank=info.rank,
            world=info.world_size,
            query_max_len=config.data.query_max_len,
            document_max_len=config.data.document_max_len,
            chunk_size=config.contrastive.mini_batch_size,
        )

    def embed(self, module: nn.Module, chunk: EmbedChunk) -> torch.Tensor:
        """float32 pooled embeddings `[rows, d]` of a chunk (with autograd when enabled)."""
        with self.context.amp():
            if isinstance(chunk.inputs, dict):
                out = module(None, None, 0, items=chunk.inputs)
            else:
                device, inputs = self.context.device, chunk.inputs
                out = module(
                    inputs.input_ids.to(device), inputs.cu_seqlens.to(device), inputs.max_seqlen
                )
        return out.float()

    def loss(self, module: nn.Module, batch: ContrastiveBatch, micro: MicroStep) -> torch.Tensor:
        """Backward of this rank's shard of one batch; returns the (scaled, detached) loss."""
        c = self.config.contrastive
        gather = self.context.info.enabled

        def loss_fn(q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
            loss = infonce_loss(
                q, docs, temperature=c.temperature, symmetric=c.symmetric,
                gather_across_devices=gather,
            )  # fmt: skip
            return loss * micro.scale

        def embed(chunk: EmbedChunk) -> torch.Tensor:
            return self.embed(module, chunk)

        if c.mini_batch_size > 0:
            return cached_backward_chunks(
                embed,
                batch.queries,
                batch.documents,
                loss_fn,
                no_sync=lambda: dist_utils.no_sync(module),
            )
        q = torch.cat([embed(chunk) for chunk in batch.queries])
        docs = torch.cat([embed(chunk) for chunk in batch.documents])
        loss = loss_fn(q, docs)
        loss.backward()
        return loss.detach()
