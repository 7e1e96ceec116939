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
finished run returns at once. SIGTERM checkpoints and raises `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import json
import math
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
from .data import PackedBatch, PackedBatches, PairBatches, check_sources, pack_texts
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
    """The run stopped early (SIGTERM or `stop_after`) after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(
            f"training stopped at step {step}; checkpoint {checkpoint}; "
            "run the same command again to resume"
        )
        self.step = step
        self.checkpoint = checkpoint


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
    ) -> torch.Tensor:
        hidden = self.encoder(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
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
    if config.phase in TASK_PHASES:  # fine-tuning: labelled records, checked by task_data
        from .task_data import check_task

        paths = [s.path for s in config.data.sources]
        spec = check_task(
            config.phase, config.task, paths, names=[s.name for s in config.data.sources]
        )
        return model_path, [spec]
    if config.phase == "contrastive":
        sources = check_sources(config.data.sources, fields=("query", "positive"))
    else:
        sources = []
        for source_config in config.data.sources:
            sources += check_sources([source_config], fields=(source_config.text_field,))
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


class _SigtermFlag:
    """Sets `.raised` on SIGTERM while active (main thread only; restores the old handler)."""

    def __init__(self) -> None:
        self.raised = False
        self._old: Any = None

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


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
            )
        if self.phase == "mntp":
            from .masking import resolve_mask_token_id

            self.mask_token_id = resolve_mask_token_id(self.tokenizer, config.mntp.mask_token)
            self.special_ids = tuple(
                i for i in self.tokenizer.all_special_ids if i != self.mask_token_id
            )
        self.step = 0
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
        if self.peak_flops:
            # 6 N FLOPs per token (Kaplan et al.): forward + backward of the matmuls, attention
            # scores ignored; an underestimate for long sequences.
            row["mfu"] = 6 * self.n_params * tokens / elapsed / (self.peak_flops * world)
        return row

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
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
        return path or cio.checkpoint_dir(self.output) / cio.step_name(self.step)

    def resume(self, path: Path) -> None:
        ckpt = cio.load_checkpoint(path, rank=self.info.rank)
        if ckpt.state.get("phase", self.phase) != self.phase:
            raise ValueError(
                f"{path} is a {ckpt.state.get('phase')} checkpoint but the config's phase is "
                f"{self.phase}: use another train.output"
            )
        dist_utils.load_full_state(self.module, self.optimizer, ckpt.model, ckpt.optimizer)
        self.stream.load_state_dict(ckpt.state["data"])
        self.step = ckpt.step
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
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        dist_utils.barrier(self.info)
        return final


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


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
    if latest is not None and final.joinpath("config.json").is_file():
        done = cio.load_checkpoint(latest).step
        task_state = cio.load_checkpoint(latest).state.get("task") or {}
        if done >= config.train.steps or task_state.get("stopped"):
            log(f"{output} already holds a finished run ({done} steps): nothing to do", main=main)
            return final
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        log("config:\n" + config.to_toml(), main=main)
        log(f"model {model_path} on {info.device} (world size {info.world_size})", main=main)
    run = _Run(config, info, model_path, sources)
    metrics_path = output / "metrics.jsonl"
    if latest is not None:
        run.resume(latest)
        log(f"resumed from {latest} (step {run.step})", main=main)
    if main:
        _truncate_metrics(metrics_path, run.step)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.train.steps,
        initial=run.step,
        disable=not (main and config.train.progress_bar),
        desc=f"{config.phase}",
        file=sys.stderr,
    )
    started = run.step
    with _SigtermFlag() as sigterm, bar:
        while run.step < config.train.steps:
            row = run.run_step()
            if run.task is not None:  # dev evaluation, best model, early stopping
                run.task.after_step(run, row)
            if main:
                with metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if on_step is not None:
                on_step(row)
            if run.nonfinite_in_row >= config.train.max_nonfinite_steps:
                raise TrainingError(
                    f"{run.nonfinite_in_row} non-finite losses in a row (loss {row['loss']}, "
                    f"grad norm {row['grad_norm']}) at step {run.step}: stopping; lower optim.lr, "
                    "check the data, or raise train.max_nonfinite_steps"
                )
            every = config.train.checkpoint_every
            stop = (stop_after is not None and run.step - started >= stop_after) or sigterm.raised
            early = run.task is not None and run.task.stopped
            if (every and run.step % every == 0) or stop or early or run.step == config.train.steps:
                path = run.save_checkpoint()
                if stop and run.step < config.train.steps:
                    raise TrainingInterrupted(run.step, path)
            if early:
                log(f"early stop at step {run.step}: task.patience evaluations without a "
                    "better dev score", main=main)  # fmt: skip
                break
    if run.nonfinite_total and main:
        log(f"{run.nonfinite_total} step(s) were skipped for a non-finite loss", main=main)
    path = run.save_final()
    log(f"final model: {path}", main=main)
    return path
