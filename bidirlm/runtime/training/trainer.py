"""The training loop shared by the causal, MNTP and contrastive phases.

`train(config) -> OUTPUT/final` runs `config.phase` on `config.model`:

- `causal`: the model in causal mode, packed token batches, loss = next-token cross-entropy
  within each packed sequence (`mntp_loss` with labels = the next token; it is cross-entropy
  through the LM head without materializing the logits);
- `mntp`: bidirectional, the masking collator (`bidirlm.runtime.training.masking.mask_for_mntp`),
  loss at the masked positions through `mntp_loss` (position i predicts masked token i+1);
- `contrastive`: bidirectional, pooled embeddings of queries and documents (positives then hard
  negatives), `infonce_loss` with documents gathered across ranks, optional gradient cache.

One optimizer step = `train.grad_accum` micro-batches on each of the world's ranks. The data
streams are global: micro-batch j of a step is assigned to rank `j % world`, so a run on W
processes sees the same batches as one process with W times the accumulation. Everything random
is derived from `train.seed` and the step, so a resumed run continues bitwise like an
uninterrupted one on the CPU.

Outputs under `train.output`: `config.toml` (the resolved config), `metrics.jsonl` (one JSON
object per step: step, loss, lr, tokens_per_s, grad_norm, skipped, ...; `mfu` on GPUs with a
bf16/fp16 autocast), `checkpoints/step-N/` (the last `keep_checkpoints`), `final/` (Hugging Face
layout with the tokenizer). Re-running the same command resumes from the latest checkpoint; a
finished run returns at once. SIGTERM and a first Ctrl-C (SIGINT) checkpoint and raise
`TrainingInterrupted`; a second Ctrl-C aborts at once.

Safety: resuming with a config that differs from the run's (`config.toml`) is refused, listing
the differing keys, unless `train.allow_config_change = true` (the change is then appended to
`config-changes.jsonl`, `config.toml` keeps the original). A checkpoint or final model with
non-finite parameters is never written (`TrainingError` naming the step). A bad data record
found mid-run first checkpoints the steps done since the last checkpoint, then raises.

Console: a one-line summary of the config (the full resolved config is `OUTPUT/config.toml`),
then every `train.log_every` steps a progress-bar update (stderr is a terminal) or one line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bidirlm.runtime.embedded import resolve_model_path
from bidirlm.runtime.outputs import check_output, lock_output

from . import checkpoints as cio
from . import distributed as dist_utils
from .config import TrainConfig
from .data import (
    BadRecordError,
    PackedBatch,
    PackedBatches,
    PairBatches,
    check_sources,
    pack_texts,
)
from .schedules import lr_factor
from .task_config import TASK_PHASES

IGNORE_INDEX = -100

# Dense bf16 peak FLOP/s by device-name fragment, for MFU (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "MI355": 2500e12,
    "MI325": 1307e12,
    "MI300": 1307e12,
    "MI250": 362e12,
}


class TrainingInterrupted(Exception):
    """The run stopped early (SIGTERM, Ctrl-C or `stop_after`) after writing a checkpoint.

    `reason` is "SIGTERM", "Ctrl-C" or "" (`stop_after`).
    """

    def __init__(self, step: int, checkpoint: Path | None, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"training stopped at step {step}{why}; saved checkpoint {checkpoint} (model, "
            f"optimizer and data position after step {step}); run the same command again to "
            "resume"
        )
        self.step = step
        self.checkpoint = checkpoint
        self.reason = reason


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


def log(message: str, *, main: bool = True) -> None:
    if main:
        print(f"[bidirlm train] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The module that computes a micro-batch's loss (or embeddings) inside one forward, so DDP and
# FSDP2 see every parameter use (FSDP2 unshards the root's tied head only inside forward).
# --------------------------------------------------------------------------------------------


class PhaseModule(nn.Module):
    """Wraps an `Encoder`: `forward(ids, cu, max, labels)` -> LM loss, or pooled embeddings."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        labels: torch.Tensor | None = None,
        items: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if items is not None:  # an OmniEncoder batch of text/image/audio (training.multimodal)
            return self.encoder.embed_prepared(items, pooling=self.pooling)
        hidden = self.encoder(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # The final norm of the float32 residual stream gives float32; the LM head (and the
            # pooled embeddings) run in the autocast dtype, as an autocast `nn.Linear` would.
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        if labels is not None:
            from bidirlm.kernels import mntp_loss

            weight = self.encoder.lm_head_weight
            return mntp_loss(
                hidden,
                weight.to(hidden.dtype),
                labels,
                ignore_index=IGNORE_INDEX,
                softcap=self.encoder.final_logit_softcap,
            )
        from bidirlm.runtime.models import pool

        return pool(hidden, pooling=self.pooling, cu_seqlens=cu_seqlens)


def next_token_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t+1] inside each packed sequence, IGNORE_INDEX at sequence ends."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = input_ids[1:]
    labels[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return labels


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def validate(config: TrainConfig) -> tuple[Path, list]:
    """Check the model folder and every data source before any work; returns (model, sources)."""
    model_path = resolve_model_path(config.model)
    if not (model_path / "config.json").is_file():
        what = "does not exist" if not model_path.exists() else "has no config.json"
        raise FileNotFoundError(f"model {config.model}: {model_path} {what}")
    skip = config.data.skip_bad_records
    if config.phase in TASK_PHASES:  # fine-tuning: labelled records, checked by task_data
        from .task_data import check_task

        paths = [s.path for s in config.data.sources]
        spec = check_task(
            config.phase, config.task, paths, names=[s.name for s in config.data.sources]
        )
        return model_path, [spec]
    if config.phase == "contrastive":
        sources = check_sources(
            config.data.sources, fields=("query", "positive"), skip_bad_records=skip, log=log
        )
    else:
        sources = []
        for source_config in config.data.sources:
            sources += check_sources(
                [source_config], fields=(source_config.text_field,), skip_bad_records=skip, log=log
            )
    if config.phase == "mntp":
        from .masking import check_mask_token

        check_mask_token(model_path, config.mntp.mask_token)
    return model_path, sources


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    choice = config.train.dtype
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if choice == "float32" else getattr(torch, choice)


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms and biases), as is customary."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class _StopSignals:
    """Sets `.raised` on SIGTERM or a first Ctrl-C while active; a second Ctrl-C raises
    KeyboardInterrupt at once (main thread only; restores the old handlers)."""

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}

    def __init__(self, *, main: bool = True) -> None:
        self.raised = False
        self.reason = ""
        self.main = main
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.raised:
            raise KeyboardInterrupt  # the second Ctrl-C: abort without saving
        self.raised = True
        self.reason = self.SIGNALS.get(signum, str(signum))
        again = " (press Ctrl-C again to abort without saving)" if signum == signal.SIGINT else ""
        log(
            f"{self.reason}: saving a checkpoint after this step, then stopping{again}",
            main=self.main,
        )

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}


_SigtermFlag = _StopSignals  # the former name


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Run:
    """State of one training run (one process)."""

    def __init__(self, config: TrainConfig, info: dist_utils.DistInfo, model_path: Path, sources):
        from bidirlm.runtime.models import load_model

        self.config, self.info, self.model_path = config, info, model_path
        self.output = Path(config.train.output)
        self.phase = config.phase
        self.device = info.device
        self.autocast = _autocast_dtype(config, self.device)
        bidirectional = self.phase != "causal"
        if self.phase in TASK_PHASES:
            bidirectional = config.task.attention == "bidirectional"
        self.encoder = load_model(
            model_path, dtype=torch.float32, device=self.device, bidirectional=bidirectional
        )
        if self.encoder.tokenizer is None:
            raise ValueError(f"model {config.model}: {model_path} has no tokenizer files")
        self.tokenizer = self.encoder.tokenizer
        self.encoder.gradient_checkpointing = config.train.gradient_checkpointing
        self.encoder.train()
        if config.contrastive.train_towers:  # omni towers are frozen unless asked (multimodal)
            if not hasattr(self.encoder, "freeze_towers"):
                raise ValueError("contrastive.train_towers: the model has no vision/audio tower")
            self.encoder.freeze_towers(False)
        self.task = None  # the fine-tuning phases' side of the run (finetune.TaskRun)
        phase_module: nn.Module = PhaseModule(self.encoder, config.contrastive.pooling)
        if self.phase in TASK_PHASES:
            from .finetune import TaskRun

            self.task = TaskRun(config, self.encoder, sources[0], info)  # attaches the head
            phase_module = self.task.module()
        self.module = dist_utils.wrap_model(phase_module, config.distributed.strategy, info)
        opt = config.optim
        fused = self.device.type == "cuda" if opt.fused == "auto" else bool(opt.fused)
        self.optimizer = torch.optim.AdamW(
            self.task.param_groups(self.module, opt.weight_decay)
            if self.task is not None
            else _param_groups(self.module, opt.weight_decay),
            lr=opt.lr,
            betas=tuple(opt.betas),
            eps=opt.eps,
            fused=fused,
        )
        weights = [s.weight for s in config.data.sources]
        if self.task is not None:
            self.stream = self.task.stream
        elif self.phase == "contrastive":
            self.stream: PackedBatches | PairBatches = PairBatches(
                sources,
                weights,
                batch_size=config.data.batch_size,
                seed=config.train.seed,
                negatives_per_query=config.data.negatives_per_query,
                instructions=[s.instruction for s in config.data.sources],
                skip_bad_records=config.data.skip_bad_records,
            )
            if config.data.batch_size % info.world_size:
                raise ValueError(
                    f"data.batch_size={config.data.batch_size} must be a multiple of the "
                    f"{info.world_size} processes"
                )
        else:
            self.stream = PackedBatches(
                sources,
                weights,
                self.tokenizer,
                tokens_per_batch=config.data.tokens_per_batch,
                max_seq_len=config.data.max_seq_len,
                seed=config.train.seed,
                text_fields=[s.text_field for s in config.data.sources],
                skip_bad_records=config.data.skip_bad_records,
            )
        if self.phase == "mntp":
            from .masking import mask_token_id_for

            self.mask_token_id = mask_token_id_for(self.tokenizer, config.mntp.mask_token)
            self.special_ids = tuple(
                i for i in self.tokenizer.all_special_ids if i != self.mask_token_id
            )
        self.step = 0
        self.saved_step = 0  # the step of the last checkpoint written or resumed from
        self._step_start: tuple[dict[str, Any], Any] | None = None
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.tokens_seen = 0
        self.n_params = sum(p.numel() for p in self.encoder.parameters())
        self.peak_flops = _peak_flops(self.device) if self.autocast is not None else None

    # --- micro-batch computations -----------------------------------------------------------

    def _amp(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _lm_loss(self, batch: PackedBatch, micro: int) -> torch.Tensor:
        if self.task is not None:  # fine-tuning: the head's loss on labelled examples
            return self.task.loss(self.module, batch, self.device, self._amp)
        ids, cu = batch.input_ids, batch.cu_seqlens
        if self.phase == "causal":
            inputs, labels = ids, next_token_labels(ids, cu)
        else:
            from .masking import mask_for_mntp

            gen = torch.Generator().manual_seed(_derived_seed(self.config.train.seed, 7, micro))
            inputs, labels = mask_for_mntp(
                ids,
                mask_token_id=self.mask_token_id,
                mask_ratio=self.config.mntp.mask_ratio,
                generator=gen,
                special_token_ids=self.special_ids,
                cu_seqlens=cu,
                ignore_index=IGNORE_INDEX,
            )
        dev = self.device
        with self._amp():
            return self.module(inputs.to(dev), cu.to(dev), batch.max_seqlen, labels.to(dev))

    def _embed(self, texts: list[str], max_len: int, *, count: bool = True) -> torch.Tensor:
        from .multimodal import embed_mixed, has_media

        if has_media(texts):  # image/audio records: the OmniEncoder path
            return embed_mixed(self, texts, max_len, count=count)
        ids, cu, longest = pack_texts(self.tokenizer, texts, max_len)
        if count:
            self._step_tokens += ids.numel()
        with self._amp():
            out = self.module(ids.to(self.device), cu.to(self.device), longest)
        return out.float()

    def _contrastive_loss(self, batch: Any, scale: float) -> torch.Tensor:
        """Backward of one contrastive micro-batch (this rank's shard); returns the loss."""
        from bidirlm.kernels import infonce_loss

        c, d = self.config.contrastive, self.config.data
        mine = batch.shard(self.info.rank, self.info.world_size)
        documents = mine.positives + mine.negatives

        def loss_fn(q: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
            loss = infonce_loss(
                q,
                docs,
                temperature=c.temperature,
                symmetric=c.symmetric,
                gather_across_devices=self.info.enabled,
            )
            return loss * scale

        if c.mini_batch_size > 0:
            from .gradcache import cached_backward

            def embed(items: list[tuple[str, int]]) -> torch.Tensor:
                # Texts are embedded twice (without, then with autograd): count them once.
                texts = [t for t, _ in items]
                return self._embed(texts, items[0][1], count=not torch.is_grad_enabled())

            return cached_backward(
                embed,
                [(t, d.query_max_len) for t in mine.queries],
                [(t, d.document_max_len) for t in documents],
                loss_fn,
                c.mini_batch_size,
                no_sync=lambda: dist_utils.no_sync(self.module),
            )
        q = self._embed(mine.queries, d.query_max_len)
        docs = self._embed(documents, d.document_max_len)
        loss = loss_fn(q, docs)
        loss.backward()
        return loss.detach()

    # --- one optimizer step ---------------------------------------------------------------

    def run_step(self) -> dict[str, Any]:
        config, info = self.config, self.info
        accum, world = config.train.grad_accum, info.world_size
        lr = config.optim.lr * lr_factor(
            self.step,
            total_steps=config.train.steps,
            schedule=config.optim.schedule,
            warmup_steps=config.optim.warmup_steps,
            decay_fraction=config.optim.decay_fraction,
            min_lr_ratio=config.optim.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # the head's multiplier
        # Where this step starts, to checkpoint exactly here if a bad record stops it midway.
        self._step_start = (json.loads(json.dumps(self.stream.state_dict())), cio.capture_rng())
        self.optimizer.zero_grad(set_to_none=True)
        self._step_tokens = 0
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(accum):
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last else dist_utils.no_sync(self.module)
            if self.phase == "contrastive":
                batch = self.stream.next_batch()
                with sync:
                    loss = self._contrastive_loss(batch, 1.0 / accum)
            else:
                batches = [self.stream.next_batch() for _ in range(world)]
                index = (self.step * accum + micro) * world + info.rank
                mine = batches[info.rank]
                self._step_tokens += mine.num_tokens
                with sync:
                    loss = self._lm_loss(mine, index) / accum
                    loss.backward()
                loss = loss.detach()
            total += loss.double().cpu()
        loss_value = float(dist_utils.all_reduce_mean(total, info))
        tokens = int(dist_utils.all_reduce_sum(torch.tensor(self._step_tokens), info))
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = config.train.max_grad_norm if config.train.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.step += 1
        self.tokens_seen += tokens
        row: dict[str, Any] = {
            "step": self.step,
            "loss": loss_value,
            "lr": lr,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "grad_norm": grad_norm,
            "tokens": self.tokens_seen,
            "step_time_s": elapsed,
            "skipped": not finite,
            "nonfinite_total": self.nonfinite_total,
        }
        if config.data.skip_bad_records:
            row["bad_records"] = getattr(self.stream, "bad_records", 0)
        if self.peak_flops:
            # 6 N FLOPs per token (Kaplan et al.): forward + backward of the matmuls, attention
            # scores ignored; an underestimate for long sequences.
            row["mfu"] = 6 * self.n_params * tokens / elapsed / (self.peak_flops * world)
        return row

    # --- checkpoints ------------------------------------------------------------------------

    def nonfinite_parameters(self) -> list[str]:
        """Names of parameters holding NaN/Inf (all ranks agree: the count is all-reduced)."""
        names = []
        for name, param in self.module.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if not bool(torch.isfinite(local.detach()).all()):
                names.append(name)
        count = torch.tensor(float(len(names)), device=self.device)
        if float(dist_utils.all_reduce_sum(count, self.info)) > 0 and not names:
            names.append("(on another rank)")
        return names

    def check_finite(self, what: str) -> None:
        """TrainingError (one line, naming the step) when a parameter is non-finite."""
        bad = self.nonfinite_parameters()
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            last = f"step {self.saved_step}" if self.saved_step else "none"
            raise TrainingError(
                f"step {self.step}: the parameters are non-finite ({shown}); {what} not "
                f"written (last checkpoint: {last}); lower optim.lr or check the data and model"
            )

    def checkpoint_before_failed_step(self) -> Path | None:
        """Checkpoint the state at the start of the step that just failed, if not saved yet."""
        if self._step_start is None or self.step <= self.saved_step:
            return None
        data_state, (rng_tensors, rng_data) = self._step_start
        self.stream.load_state_dict(data_state)
        cio.restore_rng(rng_tensors, rng_data)
        self.optimizer.zero_grad(set_to_none=True)
        return self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        self.check_finite("checkpoint")
        info = self.info
        model_state = dist_utils.full_state_dict(self.module, info)
        optim_state = dist_utils.full_optimizer_state(self.module, self.optimizer, info)
        tmp = cio.temp_path(self.output, self.step)
        if info.is_main:
            cio.prepare_temp(self.output, self.step)
        dist_utils.barrier(info)
        cio.write_rank_files(tmp, info.rank)
        if info.is_main:
            state = {
                "data": self.stream.state_dict(),
                "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row,
                "tokens_seen": self.tokens_seen,
                "world_size": info.world_size,
                "phase": self.phase,
                "task": self.task.state_dict() if self.task is not None else None,
            }
            cio.write_main_files(
                tmp,
                step=self.step,
                model_state=model_state,
                optimizer_state=optim_state,
                state=state,
            )
        dist_utils.barrier(info)
        path = None
        if info.is_main:
            path = cio.publish(self.output, self.step, self.config.train.keep_checkpoints)
        dist_utils.barrier(info)
        self.saved_step = self.step
        return path or cio.checkpoint_dir(self.output) / cio.step_name(self.step)

    def resume(self, path: Path) -> None:
        ckpt = cio.load_checkpoint(path, rank=self.info.rank)
        if ckpt.state.get("phase", self.phase) != self.phase:
            raise ValueError(
                f"{path} is a {ckpt.state.get('phase')} checkpoint but the config's phase is "
                f"{self.phase}: use another train.output"
            )
        _check_shapes(path, ckpt.model, self.encoder, self.config.model)
        try:
            dist_utils.load_full_state(self.module, self.optimizer, ckpt.model, ckpt.optimizer)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{path} does not fit the model {self.config.model}: {first}; use another "
                "train.output"
            ) from None
        self.stream.load_state_dict(ckpt.state["data"])
        self.step = ckpt.step
        self.saved_step = ckpt.step
        self.nonfinite_total = int(ckpt.state.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(ckpt.state.get("nonfinite_in_row", 0))
        self.tokens_seen = int(ckpt.state.get("tokens_seen", 0))
        if self.task is not None:
            self.task.load_state_dict(ckpt.state.get("task"))
        if ckpt.rng_data is not None:
            cio.restore_rng(ckpt.rng_tensors, ckpt.rng_data)

    def save_final(self, name: str = "final") -> Path:
        """`OUTPUT/<name>` (`final`; fine-tuning also writes `best`) in Hugging Face layout
        (written to a temporary folder, then renamed)."""
        final = self.output / name
        self.check_finite("final model")
        state = dist_utils.full_state_dict(self.module, self.info)
        if self.info.is_main:
            tmp = self.output / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            encoder = self.encoder
            if self.config.distributed.strategy == "fsdp" and self.info.enabled:
                from bidirlm.runtime.models import load_model

                # Sharded parameters cannot be saved directly: load the gathered full weights
                # into an unsharded copy on the CPU.
                encoder = load_model(
                    self.model_path, dtype=torch.float32, bidirectional=self.encoder.bidirectional
                )
                prefix = "encoder."
                if self.task is not None:  # a fresh head for the gathered head weights
                    from .finetune import attach_head

                    attach_head(encoder, self.config, self.task.spec)
                encoder.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
                    strict=False,
                )
            encoder.save_pretrained(tmp)
            if encoder.tokenizer is None:
                self.tokenizer.save_pretrained(str(tmp))
            # Swap: the previous `final` is moved aside, never deleted before the new one is in
            # place, so a crash here leaves one complete model (our own `.{name}.old`).
            old = None
            if final.exists():
                old = self.output / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier(self.info)
        return final


def _check_shapes(
    path: Path, state: dict[str, torch.Tensor], encoder: nn.Module, model: str
) -> None:
    """A checkpoint of another model (other shapes or tensors) is a one-line ValueError."""
    own = {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(own.keys() & saved.keys()):
        if own[key] != saved[key]:
            raise ValueError(
                f"{path} is a checkpoint of another model: {key} is {list(saved[key])} there but "
                f"{list(own[key])} in {model}; use another train.output"
            )
    missing = sorted(own.keys() - saved.keys())
    if missing and saved.keys() & own.keys():
        raise ValueError(
            f"{path} is a checkpoint of another model: it lacks {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; use another "
            "train.output"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be redone).

    An incomplete last line (a crash in the middle of writing it) is dropped; a bad line
    elsewhere is a ValueError naming the file and line. The file is rewritten atomically.
    """
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    keep = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if all(not rest.strip() for rest in lines[number:]):
                log(f"{path}: dropped the incomplete last line {number} (a crash mid-write)")
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(raw.decode("utf-8"))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


VOLATILE_KEYS = ("train.progress_bar", "train.log_every", "train.allow_config_change")
CONFIG_CHANGES = "config-changes.jsonl"


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, (list, tuple)) and any(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}.{i}"))
        return out
    return {prefix: list(data) if isinstance(data, tuple) else data}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config dicts -> (old, new); None = absent.

    Keys that only change the console output (`train.progress_bar`, `train.log_every`) and
    `train.allow_config_change` itself are ignored.
    """
    a, b = _flatten(old), _flatten(new)
    return {
        key: (a.get(key), b.get(key))
        for key in sorted(a.keys() | b.keys())
        if key not in VOLATILE_KEYS and a.get(key) != b.get(key)
    }


def _run_config(output: Path) -> dict[str, Any] | None:
    """The config the run in `output` last ran with: config.toml, or the last recorded change."""
    from .config import tomllib

    changes = output / CONFIG_CHANGES
    if changes.is_file():
        rows = [ln for ln in changes.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for line in reversed(rows):
            try:
                return json.loads(line)["config"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line: the one before it
    path = output / "config.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path}: not a readable config ({exc}); use another train.output"
        ) from None


def _check_config_change(config: TrainConfig, output: Path, step: int, main: bool) -> None:
    """Refuse to resume under a changed config unless allowed; record an allowed change."""
    old = _run_config(output)
    if old is None:
        return
    changes = config_changes(old, config.to_dict())
    if not changes:
        return
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if not config.train.allow_config_change:
        raise ValueError(
            f"{output} holds a run (step {step}) made with another config: {shown}; resume "
            "with the same config, use another train.output, or set "
            "train.allow_config_change=true (--allow-config-change) to continue with this one"
        )
    log(f"continuing {output} with a changed config: {shown}", main=main)
    if main:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "step": step,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
            "config": config.to_dict(),
        }
        with (output / CONFIG_CHANGES).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _summary(config: TrainConfig, info: dist_utils.DistInfo, output: Path) -> str:
    """The run on one line; the full resolved config is in OUTPUT/config.toml."""
    t, o = config.train, config.optim
    return (
        f"{config.phase} | model {config.model} | {t.steps} steps | lr {o.lr:g} {o.schedule} | "
        f"dtype {t.dtype} | {info.device} x{info.world_size} | "
        f"full config: {output / 'config.toml'}"
    )


def _write_config(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train(
    config: TrainConfig,
    *,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run (or resume) the training run `config` describes; returns `OUTPUT/final`.

    `stop_after`: stop after this many optimizer steps in this call, checkpointing and raising
    `TrainingInterrupted` as SIGTERM does (time-sliced jobs, tests). `on_step` is called on every
    rank with each step's metrics row.

    Raises ValueError / FileNotFoundError for a bad config, model or data source (before any
    training), `TrainingError` after `train.max_nonfinite_steps` non-finite losses in a row, and
    `TrainingInterrupted` on SIGTERM (after a checkpoint).
    """
    model_path, sources = validate(config)
    info = dist_utils.init_distributed(config.train.device, config.distributed.backend)
    try:
        # OUTPUT/final is replaced at the end: never when it is the model or the working folder
        check_output(Path(config.train.output) / "final", inputs=[model_path], what="train.output")
        # one run per output folder (a second run would interleave metrics and checkpoints)
        with lock_output(config.train.output, enabled=info.is_main):
            return _train(config, info, model_path, sources, stop_after, on_step)
    finally:
        dist_utils.shutdown(info)


def _train(config, info, model_path, sources, stop_after, on_step) -> Path:
    output = Path(config.train.output)
    main = info.is_main
    seed = config.train.seed
    torch.manual_seed(seed + info.rank)
    np.random.seed((seed + info.rank) % 2**32)
    random.seed(seed + info.rank)
    final = output / "final"
    latest = cio.latest_checkpoint(output)
    if latest is not None:
        # the step from the folder name: loading the whole checkpoint would read every tensor
        latest_step = cio.list_checkpoints(output)[-1][0]
        _check_config_change(config, output, latest_step, main)
    if latest is not None and final.joinpath("config.json").is_file():
        done = latest_step
        task_state = cio.load_checkpoint(latest).state.get("task") or {}
        if done >= config.train.steps or task_state.get("stopped"):
            log(f"{output} already holds a finished run ({done} steps): nothing to do", main=main)
            return final
    if main:
        output.mkdir(parents=True, exist_ok=True)
        if latest is None or not (output / "config.toml").is_file():
            _write_config(output / "config.toml", config.to_toml())
        log(_summary(config, info, output), main=main)
        log(f"model {model_path} on {info.device} (world size {info.world_size})", main=main)
    run = _Run(config, info, model_path, sources)
    metrics_path = output / "metrics.jsonl"
    if latest is not None:
        run.resume(latest)
        log(f"resumed from {latest} (step {run.step})", main=main)
    if main:
        _truncate_metrics(metrics_path, run.step)
    from tqdm.auto import tqdm

    log_every = config.train.log_every
    # A bar only on a terminal: in a log file its carriage-return frames pile up.
    use_bar = main and config.train.progress_bar and log_every > 0 and sys.stderr.isatty()
    bar = tqdm(
        total=config.train.steps,
        initial=run.step,
        disable=not use_bar,
        desc=f"{config.phase}",
        file=sys.stderr,
    )
    started = run.step
    with _StopSignals(main=main) as stop_signal, bar:
        while run.step < config.train.steps:
            try:
                row = run.run_step()
            except BadRecordError as exc:
                saved = run.checkpoint_before_failed_step()
                kept = f"saved checkpoint {saved}" if saved else "nothing new to save"
                raise ValueError(
                    f"{exc} (found at step {run.step + 1}; {kept}; fix the record or set "
                    "data.skip_bad_records=true, then run the same command to resume)"
                ) from None
            if run.task is not None:  # dev evaluation, best model, early stopping
                run.task.after_step(run, row)
            if main:
                with metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                bar.update(1)
                if log_every and (run.step % log_every == 0 or run.step == config.train.steps):
                    if use_bar:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                    else:
                        log(
                            f"step {run.step}/{config.train.steps} loss {row['loss']:.4f} "
                            f"lr {row['lr']:.2e} grad_norm {row['grad_norm']:.3g} "
                            f"tokens/s {row['tokens_per_s']:.0f}"
                        )
            if on_step is not None:
                on_step(row)
            if run.nonfinite_in_row >= config.train.max_nonfinite_steps:
                raise TrainingError(
                    f"{run.nonfinite_in_row} non-finite losses in a row (loss {row['loss']}, "
                    f"grad norm {row['grad_norm']}) at step {run.step}: stopping; lower optim.lr, "
                    "check the data, or raise train.max_nonfinite_steps"
                )
            if run.step == config.train.steps and run.nonfinite_in_row:
                last = f"step {run.saved_step}" if run.saved_step else "none"
                raise TrainingError(
                    f"step {run.step}: non-finite loss or gradients (loss {row['loss']}, grad "
                    f"norm {row['grad_norm']}) in the last {run.nonfinite_in_row} step(s): the "
                    f"final model is not written (last checkpoint: {last}); lower optim.lr or "
                    "check the data"
                )
            every = config.train.checkpoint_every
            stop = (
                stop_after is not None and run.step - started >= stop_after
            ) or stop_signal.raised
            early = run.task is not None and run.task.stopped
            if (every and run.step % every == 0) or stop or early or run.step == config.train.steps:
                path = run.save_checkpoint()
                if stop and run.step < config.train.steps:
                    raise TrainingInterrupted(run.step, path, stop_signal.reason)
            if early:
                log(f"early stop at step {run.step}: task.patience evaluations without a "
                    "better dev score", main=main)  # fmt: skip
                break
    if run.nonfinite_total and main:
        log(f"{run.nonfinite_total} step(s) were skipped for a non-finite loss", main=main)
    bad_records = getattr(run.stream, "bad_records", 0)  # the record streams count them
    if bad_records and main:
        log(
            f"skipped {bad_records} bad data record(s) (data.skip_bad_records); first: "
            f"{getattr(run.stream, 'first_bad', None) or 'before the last resume'}",
            main=main,
        )
    path = run.save_final()
    log(f"final model: {path}", main=main)
    return path
