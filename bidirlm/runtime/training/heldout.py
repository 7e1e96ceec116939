"""The in-run held-out evaluation (`[heldout]`): causal-LM loss on named sources, and tasks.

Every `heldout.every` steps the trainer calls `HeldoutEvaluation.run(run)` and logs the result in
the step's metrics row under `heldout` (beside the loss; TensorBoard `heldout/<name>/lm_loss`):

- for each of `heldout.sources`, the causal-LM loss (next-token cross-entropy, causal attention
  whatever the phase trains: the forgetting the paper follows in its Fig. 3) of the current model
  on the source's first `heldout.tokens` tokens, read in record order and packed into sequences
  of `data.max_seq_len` (the same tokens at every evaluation);
- `heldout.tasks`, scored by the `evaluator` handed to `trainer.train` (a callable `(encoder,
  tasks) -> {task: {metric: value}}`; `bidirlm train` and `bidirlm pipeline` build it from
  `bidirlm.runtime.evaluation`, which training does not import). It runs on the main process;
  the other ranks wait.

The model is evaluated in eval mode without gradients and put back as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed as dist_utils
from .config import TrainConfig
from .data import PackedBatch, StreamSource, check_sources, source_exists, tokenize_document
from .phases import PhaseModule, next_token_labels

Evaluator = Callable[[nn.Module, Sequence[str]], dict[str, Any]]


def check_heldout(config: TrainConfig) -> None:
    """FileNotFoundError naming the key when a held-out source does not exist (before work)."""
    for source in config.heldout.sources:
        if not source_exists(source.path):
            raise FileNotFoundError(f"heldout.sources: {source.path} does not exist")


def heldout_tokens(source: Any, tokenizer: Any, tokens: int, field: str) -> list[int]:
    """The first `tokens` tokens of a source's documents, in record order."""
    ids: list[int] = []
    index = 0
    while len(ids) < tokens:
        if isinstance(source, StreamSource):
            record = source.next_record()
        else:
            if index >= len(source):
                break
            record = source[index]
        index += 1
        text = record.get(field) if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            ids += tokenize_document(tokenizer, text)
        if isinstance(source, StreamSource) and index >= 1_000_000:
            break
    if len(ids) < 2:
        raise ValueError(f"heldout source {source.name}: fewer than 2 tokens")
    return ids[:tokens]


def pack(ids: list[int], max_seq_len: int) -> PackedBatch:
    """`ids` cut into sequences of at most `max_seq_len` tokens (the last may be shorter)."""
    lengths = [min(max_seq_len, len(ids) - i) for i in range(0, len(ids), max_seq_len)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return PackedBatch(torch.tensor(ids, dtype=torch.long), cu, max(lengths))


class HeldoutEvaluation:
    """The held-out sources tokenized once; `run` evaluates the model of a run on them."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer: Any,
        evaluator: Evaluator | None,
        log: Callable[[str], None],
    ) -> None:
        section = config.heldout
        self.every = section.every
        self.tasks = list(section.tasks)
        self.evaluator = evaluator
        if self.tasks and evaluator is None:
            raise ValueError(
                "heldout.tasks needs an evaluator: run through `bidirlm train` / `bidirlm "
                "pipeline`, or pass trainer.train(..., evaluator=...)"
            )
        if self.tasks and config.distributed.strategy == "fsdp":
            raise ValueError("heldout.tasks run on one process: use distributed.strategy = ddp")
        self.batches: dict[str, PackedBatch] = {}
        for cfg in section.sources:
            (source,) = check_sources([cfg], fields=(cfg.text_field,), log=log)
            ids = heldout_tokens(source, tokenizer, section.tokens, cfg.text_field)
            self.batches[cfg.name or cfg.path] = pack(ids, config.data.max_seq_len)

    def due(self, step: int, last: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last)

    @torch.no_grad()
    def run(self, run: Any) -> dict[str, Any]:
        """`{source name: {"lm_loss": x}, task: {metric: value}}` for the run's current model."""
        encoder = run.encoder
        module = run.module
        if not isinstance(getattr(module, "module", module), PhaseModule):
            module = PhaseModule(encoder)  # a fine-tuning phase trains a head module
        was_training, was_bidirectional = encoder.training, encoder.bidirectional
        encoder.eval()
        encoder.bidirectional = False
        out: dict[str, Any] = {}
        try:
            for name, batch in self.batches.items():
                labels = next_token_labels(batch.input_ids, batch.cu_seqlens)
                device = run.device
                with run.amp():
                    loss = module(
                        batch.input_ids.to(device),
                        batch.cu_seqlens.to(device),
                        batch.max_seqlen,
                        labels.to(device),
                    )
                out[name] = {"lm_loss": float(loss.float())}
            encoder.bidirectional = was_bidirectional
            if self.tasks and self.evaluator is not None:
                if run.info.is_main:
                    for task, metrics in self.evaluator(encoder, self.tasks).items():
                        out[task] = {
                            k: float(v)
                            for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)
                        }
                dist_utils.barrier(run.info)
        finally:
            encoder.bidirectional = was_bidirectional
            encoder.train(was_training)
        return out
