"""The fine-tuning phases' common part (`sequence_classification.py`, `token_classification.py`).

They run the loop of every phase (optimizer steps of `train.grad_accum` micro-batches on every
rank, checkpoints, exact resume, DDP / FSDP2, autocast); `FineTunePhase` supplies what differs:

- the module: `TaskModule`, the encoder with its head (`encoder.head`,
  `models.heads.ClassificationHead`); `forward(ids, cu_seqlens, max_seqlen, labels)` returns the
  micro-batch loss (cross-entropy, binary cross-entropy or MSE, with the optional class
  weights), or the logits when `labels` is None (evaluation), inside one forward so DDP and
  FSDP2 see every parameter use. A fresh head is initialized from `train.seed` alone (identical
  on every rank); a model that already has a head of the same shape and labels keeps it. An
  untied LM head (unused) is frozen;
- media: on an omni model, records may carry `image` / `audio` beside the text; their batches go
  through `multimodal.task_inputs` and `OmniEncoder.forward_multimodal`; the towers stay frozen
  unless `task.train_towers = true`;
- the batches: the records, checked and labelled before training (`task_data.check_task`),
  tokenized once (`task_data.encode_records`) and drawn as packed micro-batches of
  `data.batch_size` examples (`task_data.TaskBatches`);
- the parameter groups: the head's learning rate is `optim.lr * task.head_lr_multiplier`;
- after a step: the dev set is evaluated every `task.eval_every` steps, at `task.eval_steps` and
  at the end (`task_eval.score_examples`). The metrics go into that step's metrics.jsonl row
  under `dev` (with `dev_score`, the `task.metric`); a better score saves `OUTPUT/best/`
  (Hugging Face layout, like `final/`) and `OUTPUT/best.json` (with the run's `max_seq_len`, which
  `bidirlm eval` / `predict` reuse); each evaluation prints `step N/T dev <metric> <value>` and
  the last one `best <metric> <value> at step N`; non-finite metrics are written as null (never a
  bare NaN in JSON); `task.patience` evaluations
  without improvement stop the run early (`early_stop` in the row; `final/` is the last model,
  `best/` the best one). The best score, its step and the patience counter are the phase's
  checkpoint state, so a resumed run decides as an uninterrupted one.

Every rank evaluates the whole dev set (FSDP2 needs all ranks in each forward); rank 0's
decision is broadcast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from bidirlm.runtime.models.heads import ClassificationHead

from ..config import TrainConfig
from ..distributed import DistInfo
from ..multimodal import check_task_media, task_inputs
from ..task_config import TaskConfig
from ..task_data import TaskBatch, TaskBatches, TaskSpec, check_task, encode_records
from ..task_eval import score_examples
from ..task_metrics import finite_or_none, json_text, primary_metric
from .base import MicroStep, PhaseBase, PhaseContext, RankBatches, RunView


class TaskModule(nn.Module):
    """`encoder` (with `encoder.head`) -> loss of a packed micro-batch, or logits. `media`: the
    omni model's extra inputs (`position_ids`, pixel / audio features) of a batch with media."""

    def __init__(self, encoder: nn.Module, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        labels: torch.Tensor | None = None,
        media: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if media is not None:  # image / audio records: `multimodal.task_inputs` laid them out
            hidden = self.encoder.forward_multimodal(
                input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **media
            )
        else:
            hidden = self.encoder(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        logits = self.encoder.head(hidden, cu_seqlens=cu_seqlens)
        if labels is None:
            return logits
        return self.encoder.head.loss(logits, labels, self.class_weights)


def _same_head(head: Any, kind: str, labels: list[str], task: TaskConfig, problem: str) -> bool:
    return (
        head is not None
        and head.kind == kind
        and list(head.labels) == list(labels)
        and head.problem_type == problem
        and (kind == "token" or head.pooling == task.pooling)
    )


def attach_head(encoder: nn.Module, config: TrainConfig, spec: TaskSpec) -> None:
    """Give `encoder` the task's head (kept when it already has a matching one)."""
    task = config.task
    if _same_head(getattr(encoder, "head", None), spec.kind, spec.labels, task, spec.problem_type):
        encoder.head.dropout.p = task.dropout
        encoder.head.dropout_p = task.dropout
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # the same initial head on every rank
        head = ClassificationHead(
            encoder.hidden_size,
            len(spec.labels),
            kind=spec.kind,
            pooling=task.pooling,
            problem_type=spec.problem_type,
            dropout=task.dropout,
            labels=spec.labels,
            dtype=encoder.dtype,
        )
    encoder.head = head.to(encoder.device)


class FineTunePhase(PhaseBase):
    """A fine-tuning phase; subclasses set `name` and `kind` ("sequence" or "token")."""

    kind: ClassVar[str] = ""

    @classmethod
    def check(cls, config: TrainConfig, model_path: Path, log: Callable[[str], None]) -> TaskSpec:
        paths = [s.path for s in config.data.sources]
        return check_task(cls.kind, config.task, paths, names=[s.name for s in config.data.sources])

    @classmethod
    def bidirectional(cls, config: TrainConfig) -> bool:
        return config.task.attention == "bidirectional"

    def __init__(self, context: PhaseContext, encoder: nn.Module) -> None:
        super().__init__(context, encoder)
        config, spec = self.config, context.data
        self.spec: TaskSpec = spec
        self.task = config.task
        attach_head(encoder, config, spec)
        if getattr(encoder, "lm_head", None) is not None:
            encoder.lm_head.requires_grad_(False)  # untied LM head: unused by the task
        self.class_weights = None
        if self.task.class_weights:
            self.class_weights = torch.tensor(self.task.class_weights, dtype=torch.float32)
        encode = dict(
            kind=self.kind,
            labels=spec.labels,
            problem_type=spec.problem_type,
            max_len=config.data.max_seq_len,
            label_all_subwords=self.task.label_all_subwords,
        )
        self.examples = [encode_records(src, self.tokenizer, **encode) for src in spec.sources]
        self.dev = encode_records(spec.dev, self.tokenizer, **encode) if spec.dev else None
        every = [ex for src in self.examples for ex in src] + list(self.dev or [])
        check_task_media(encoder, every, str(config.model))
        if self.task.train_towers:  # omni towers are frozen unless asked
            if not hasattr(encoder, "freeze_towers"):
                raise ValueError("task.train_towers: the model has no vision / audio tower")
            encoder.freeze_towers(False)
        self.metric = (
            self.task.metric
            if self.task.metric != "auto"
            else primary_metric(self.kind, spec.problem_type, spec.labels)
        )
        self.best: float | None = None
        self.best_step = 0
        self.bad_evals = 0

    # --- the Phase members --------------------------------------------------------------------

    def module(self) -> TaskModule:
        weights = self.class_weights
        device = self.encoder.device
        return TaskModule(self.encoder, None if weights is None else weights.to(device))

    def batches(self) -> RankBatches:
        stream = TaskBatches(
            self.examples,
            [s.weight for s in self.config.data.sources],
            batch_size=self.config.data.batch_size,
            seed=self.config.train.seed,
            kind=self.kind,
            problem_type=self.spec.problem_type,
        )
        return RankBatches(stream, self.context.info)

    def loss(self, module: nn.Module, batch: TaskBatch, micro: MicroStep) -> torch.Tensor:
        device = self.context.device
        ids, cu, max_seqlen, media = batch.input_ids, batch.cu_seqlens, batch.max_seqlen, None
        if batch.media is not None:
            media = task_inputs(self.encoder, batch)
            ids, cu, max_seqlen = (
                media.pop("input_ids"),
                media.pop("cu_seqlens"),
                media.pop("max_seqlen"),
            )
        with self.context.amp():
            loss = module(
                ids.to(device), cu.to(device), max_seqlen, batch.labels.to(device), media=media
            )
        return loss / micro.accum

    def param_groups(self, module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay on matrices only; the head's groups get `lr_scale`."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in module.named_parameters():
            if param.requires_grad:
                key = ("encoder.head." in name or name.startswith("head."), param.dim() >= 2)
                groups.setdefault(key, []).append(param)
        return [
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": self.task.head_lr_multiplier if is_head else 1.0,
            }
            for (is_head, decay), params in sorted(groups.items())
        ]

    def prepare_copy(self, encoder: nn.Module) -> None:
        attach_head(encoder, self.config, self.spec)

    def after_step(self, run: RunView, row: dict[str, Any]) -> None:
        """Evaluate when due; adds `dev`, `dev_score` (and `best`, `early_stop`) to `row`."""
        if self.dev is None:
            return
        step, total = run.step, self.config.train.steps
        every = self.task.eval_every
        if not ((every and step % every == 0) or step == total or step in self.task.eval_steps):
            return
        metrics = score_examples(
            run.module,
            self.dev,
            kind=self.kind,
            problem_type=self.spec.problem_type,
            labels=self.spec.labels,
            batch_size=self.task.eval_batch_size,
            device=run.device,
            amp=run.amp,
        )
        metrics = finite_or_none(metrics)
        raw = metrics[self.metric]
        score = float(raw) if raw is not None else float("nan")
        improved = self.best is None or (
            math.isfinite(score) and (not math.isfinite(self.best) or score > self.best)
        )
        improved = _broadcast(improved, run.info)
        row["dev"] = metrics
        row["dev_score"] = raw
        say = self.context.log if run.info.is_main else (lambda _m: None)
        if improved:
            self.best, self.best_step, self.bad_evals = score, step, 0
            row["best"] = True
            run.save_final("best")
            if run.info.is_main:
                record = {
                    "step": step,
                    "metric": self.metric,
                    "score": raw,
                    "dev": metrics,
                    "max_seq_len": self.config.data.max_seq_len,
                }
                tmp = run.output / ".best.json.tmp"
                tmp.write_text(json_text(record) + "\n", encoding="utf-8")
                tmp.replace(run.output / "best.json")
        else:
            self.bad_evals += 1
            if self.task.patience and self.bad_evals >= self.task.patience:
                self.stop_reason = "task.patience evaluations without a better dev score"
                row["early_stop"] = True
        shown = "nan" if raw is None else f"{raw:.4f}"
        say(f"step {step}/{total} dev {self.metric} {shown}" + (" (best)" if improved else ""))
        if step == total or self.stop_reason:
            say(self.best_line())

    def best_line(self) -> str:
        """`best <metric> <value> at step N`, the run's summary line."""
        value = "nan" if self.best is None or not math.isfinite(self.best) else f"{self.best:.4f}"
        return f"best {self.metric} {value} at step {self.best_step}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped": bool(self.stop_reason),
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.best = state.get("best")
        self.best_step = int(state.get("best_step", 0))
        self.bad_evals = int(state.get("bad_evals", 0))
        if state.get("stopped"):
            self.stop_reason = "task.patience evaluations without a better dev score"


def _broadcast(flag: bool, info: DistInfo) -> bool:
    """Rank 0's value of a boolean, on every rank."""
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if info.backend == "nccl":
        value = value.to(info.device)
    dist.broadcast(value, src=0)
    return bool(value.item())
