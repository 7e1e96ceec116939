"""The training loop shared by every phase (`training.phases`, one module each).

`train(config) -> OUTPUT/final` runs `config.phase` on `config.model`. The phase (looked up in
`training.registry.PHASES`) checks its data and gives the module it trains, its batch stream
(tokenized, resumable), one micro-step's loss, its parameter groups, its checkpoint state and
what it adds to a step's row; this loop does the rest: the learning-rate schedule, gradient
accumulation, clipping, the non-finite policy, checkpoints and exact resume, signals and logs.

One optimizer step = `grad_accum` micro-batches on each rank (`train.grad_accum`, or derived
from `train.tokens_per_step` / `pairs_per_step`: `batching.py`). The data streams are global:
micro-batch j of a step is rank `j % world`'s, so W processes see the batches of one process
with W times the accumulation (a streamed source is read per rank). Everything random is derived
from `train.seed` and the step: a resumed run continues bitwise like an uninterrupted one.

Outputs under `train.output`: `config.toml`, `metrics.jsonl` (one JSON object per step: step,
loss, lr, tokens_per_s, grad_norm, skipped, grad_accum, ...; `mfu` on a GPU of the peak table
(`mfu.py`) with a bf16/fp16 autocast, else the run says MFU is unknown; `token_shares` every
`data.log_shares_every` steps; `heldout` every `heldout.every` steps), `tensorboard/` (with the
package; `monitor.py`), `checkpoints/step-N/` (the last `keep_checkpoints`), `final/`.
Re-running the same command resumes from the latest checkpoint; a finished run returns at once.
SIGTERM and a first Ctrl-C checkpoint and raise `TrainingInterrupted`; a second Ctrl-C aborts at
once (`signals.py`). Resuming under a changed config is refused unless allowed (`audit.py`); a
checkpoint or final model with non-finite parameters is never written (`TrainingError` naming
the step); a bad data record found mid-run first checkpoints the steps done since the last
checkpoint, then raises.

Console: a config summary, then every `train.log_every` steps a progress-bar update (stderr is a
terminal) or one line. Profiling: stages run in the `torch.profiler.record_function` ranges
`bidirlm.train.data` (draw and tokenize a batch), `.forward` (the micro-step's loss, with the
backward of phases that run their own), `.backward`, `.optimizer` (clipping and the step) and
`.checkpoint`; free when no profiler runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from bidirlm.runtime.embedded.names import resolve_model_path
from bidirlm.runtime.models import load_model
from bidirlm.runtime.outputs import check_output, lock_output

from . import checkpoints as cio
from . import distributed as dist_utils
from .audit import check_config_change, config_summary, write_config
from .audit import config_changes as config_changes  # re-exported (defined here before)
from .batching import step_plan
from .config import TrainConfig
from .data import BadRecordError
from .heldout import Evaluator, HeldoutEvaluation, check_heldout
from .mfu import PEAK_BF16_FLOPS as PEAK_BF16_FLOPS
from .mfu import device_peak_flops, mfu
from .monitor import StepLog, check_monitors, start_notes, token_shares
from .phases import MicroStep, PhaseContext, autocast_dtype, get_phase
from .phases import PhaseModule as PhaseModule
from .schedules import lr_factor
from .signals import StopSignals


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


def validate(config: TrainConfig) -> tuple[Path, Any]:
    """Check the model folder and the phase's data before any work; returns (model, data)."""
    model_path = resolve_model_path(config.model)
    if not (model_path / "config.json").is_file():
        what = "does not exist" if not model_path.exists() else "has no config.json"
        raise FileNotFoundError(f"model {config.model}: {model_path} {what}")
    step_plan(config, dist_utils.env_world_size())  # the step's size divides (one-line error)
    check_monitors(config)
    check_heldout(config)  # its sources exist (opened once the model is loaded)
    return model_path, get_phase(config.phase).check(config, model_path, log)


class _Run:
    """State of one training run (one process): the phase, the wrapped module, the optimizer,
    the counters. `step`, `output`, `info`, `module`, `device`, `amp` and `save_final` are what
    a phase sees after a step (`phases.base.RunView`)."""

    def __init__(self, config: TrainConfig, info: dist_utils.DistInfo, model_path: Path, data):
        self.config, self.info, self.model_path = config, info, model_path
        self.output = Path(config.train.output)
        self.autocast = autocast_dtype(config.train.dtype, info.device)
        phase_cls = get_phase(config.phase)
        self.encoder = load_model(
            model_path,
            dtype=torch.float32,
            device=info.device,
            bidirectional=phase_cls.bidirectional(config),
        )
        if self.encoder.tokenizer is None:
            raise ValueError(f"model {config.model}: {model_path} has no tokenizer files")
        self.tokenizer = self.encoder.tokenizer
        self.encoder.gradient_checkpointing = config.train.gradient_checkpointing
        self.encoder.train()
        context = PhaseContext(
            config, info, model_path, data, self.autocast, lambda m: log(m, main=info.is_main)
        )
        self.phase = phase_cls(context, self.encoder)
        self.module = dist_utils.wrap_model(self.phase.module(), config.distributed.strategy, info)
        opt = config.optim
        fused = info.device.type == "cuda" if opt.fused == "auto" else bool(opt.fused)
        self.optimizer = torch.optim.AdamW(
            self.phase.param_groups(self.module, opt.weight_decay),
            lr=opt.lr,
            betas=tuple(opt.betas),
            eps=opt.eps,
            fused=fused,
        )
        self.stream = self.phase.batches()
        self.plan = step_plan(config, info.world_size)
        self.step = 0
        self.saved_step = 0  # the step of the last checkpoint written or resumed from
        self.step_start: tuple[dict[str, Any], Any] | None = None
        self.nonfinite_total = self.nonfinite_in_row = 0
        self.tokens_seen = 0
        self.n_params = sum(p.numel() for p in self.encoder.parameters())
        self.peak_flops = (
            device_peak_flops(info.device, self.autocast) if self.autocast is not None else None
        )

    @property
    def device(self) -> torch.device:
        return self.info.device

    def amp(self) -> contextlib.AbstractContextManager:
        """The run's autocast (a no-op in float32)."""
        return self.phase.context.amp()

    # --- one optimizer step ---------------------------------------------------------------

    def run_step(self) -> dict[str, Any]:
        config, info = self.config, self.info
        accum, world = self.plan.grad_accum, info.world_size
        lr = config.optim.lr * lr_factor(
            self.step,
            total_steps=config.train.steps,
            schedule=config.optim.schedule,
            warmup_steps=config.optim.warmup_for(config.train.steps),
            decay_fraction=config.optim.decay_fraction,
            min_lr_ratio=config.optim.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # e.g. a head's multiplier
        # Where this step starts, to checkpoint exactly here if a bad record stops it midway.
        self.step_start = (json.loads(json.dumps(self.stream.state_dict())), cio.capture_rng())
        self.module.zero_grad(set_to_none=True)  # every parameter, optimized or not
        step_tokens = 0
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        for index in range(accum):
            micro = MicroStep(self.step, index, accum, info.rank, world)
            last = index == accum - 1
            with record_function("bidirlm.train.data"):
                batch = self.stream.next_batch()
            step_tokens += batch.num_tokens
            with contextlib.nullcontext() if last else dist_utils.no_sync(self.module):
                with record_function("bidirlm.train.forward"):
                    loss = self.phase.loss(self.module, batch, micro)
                if not self.phase.backpropagates:
                    with record_function("bidirlm.train.backward"):
                        loss.backward()
            total += loss.detach().double().cpu()
        loss_value = float(dist_utils.all_reduce_mean(total, info))
        tokens = int(dist_utils.all_reduce_sum(torch.tensor(step_tokens), info))
        with record_function("bidirlm.train.optimizer"):
            grad_norm = self._clip_grad_norm()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.nonfinite_in_row = 0
            else:
                self.nonfinite_total += 1
                self.nonfinite_in_row += 1
            self.module.zero_grad(set_to_none=True)  # every parameter, optimized or not
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
            "grad_accum": accum,
            "world_size": world,
        }
        if self.plan.unit in ("tokens", "pairs"):
            row[f"{self.plan.unit}_per_step"] = self.plan.per_step
        if config.data.skip_bad_records:
            row["bad_records"] = getattr(self.stream, "bad_records", 0)
        if self.peak_flops:
            row["mfu"] = mfu(self.n_params, tokens, elapsed, self.peak_flops, world)
        every = config.data.log_shares_every
        if every and (self.step % every == 0 or self.step == config.train.steps):
            shares = token_shares(self.stream, self.info)
            if shares is not None:
                row["token_shares"] = shares
        return row

    def _clip_grad_norm(self) -> float:
        """The total gradient norm, clipped to `train.max_grad_norm` (<= 0: not clipped)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.config.train.max_grad_norm
        max_norm = max_norm if max_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # --- checkpoints ------------------------------------------------------------------------

    def check_finite(self, what: str) -> None:
        """TrainingError (one line, naming the step) when a parameter is non-finite."""
        bad = dist_utils.nonfinite_parameters(self.module, self.info)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            last = f"step {self.saved_step}" if self.saved_step else "none"
            raise TrainingError(
                f"step {self.step}: the parameters are non-finite ({shown}); {what} not "
                f"written (last checkpoint: {last}); lower optim.lr or check the data and model"
            )

    def checkpoint_before_failed_step(self) -> Path | None:
        """Checkpoint the state at the start of the step that just failed, if not saved yet."""
        if self.step_start is None or self.step <= self.saved_step:
            return None
        data_state, (rng_tensors, rng_data) = self.step_start
        self.stream.load_state_dict(data_state)
        cio.restore_rng(rng_tensors, rng_data)
        self.module.zero_grad(set_to_none=True)  # every parameter, optimized or not
        return self.save_checkpoint()

    @record_function("bidirlm.train.checkpoint")
    def save_checkpoint(self) -> Path | None:
        self.check_finite("checkpoint")
        info = self.info
        model_state = dist_utils.full_state_dict(self.module, info)
        optim_state = dist_utils.full_optimizer_state(self.module, self.optimizer, info)
        data_state = dist_utils.stream_state(self.stream, info)  # collective: per-rank streams
        tmp = cio.temp_path(self.output, self.step)
        if info.is_main:
            cio.prepare_temp(self.output, self.step)
        dist_utils.barrier(info)
        cio.write_rank_files(tmp, info.rank)
        if info.is_main:
            state = {
                "data": data_state,
                "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_row": self.nonfinite_in_row,
                "tokens_seen": self.tokens_seen,
                "world_size": info.world_size,
                "phase": self.config.phase,
                "task": self.phase.state_dict(),  # the phase's own state (None: nothing)
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
        phase = self.config.phase
        if ckpt.state.get("phase", phase) != phase:
            raise ValueError(
                f"{path} is a {ckpt.state.get('phase')} checkpoint but the config's phase is "
                f"{phase}: use another train.output"
            )
        cio.check_shapes(path, ckpt.model, self.encoder.state_dict(), self.config.model)
        try:
            dist_utils.load_full_state(self.module, self.optimizer, ckpt.model, ckpt.optimizer)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{path} does not fit the model {self.config.model}: {first}; use another "
                "train.output"
            ) from None
        self.stream.load_state_dict(dist_utils.own_stream_state(ckpt.state["data"], self.info))
        self.step = self.saved_step = ckpt.step
        self.nonfinite_total = int(ckpt.state.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(ckpt.state.get("nonfinite_in_row", 0))
        self.tokens_seen = int(ckpt.state.get("tokens_seen", 0))
        self.phase.load_state_dict(ckpt.state.get("task"))
        if ckpt.rng_data is not None:
            cio.restore_rng(ckpt.rng_tensors, ckpt.rng_data)

    @record_function("bidirlm.train.checkpoint")
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
                # Sharded parameters cannot be saved directly: load the gathered full weights
                # into an unsharded copy on the CPU (with what the phase added, e.g. a head).
                encoder = load_model(
                    self.model_path, dtype=torch.float32, bidirectional=self.encoder.bidirectional
                )
                self.phase.prepare_copy(encoder)
                prefix = "encoder."
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


def train(
    config: TrainConfig,
    *,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    evaluator: Evaluator | None = None,
) -> Path:
    """Run (or resume) the training run `config` describes; returns `OUTPUT/final`.

    `stop_after`: stop after this many optimizer steps in this call, checkpointing and raising
    `TrainingInterrupted` as SIGTERM does (time-sliced jobs, tests). `on_step` is called on every
    rank with each step's metrics row. `evaluator` scores `heldout.tasks` (`heldout.py`; built
    above training, e.g. by `bidirlm.runtime.evaluation.in_run.task_evaluator`).

    Raises ValueError / FileNotFoundError for a bad config, model or data source (before any
    training), `TrainingError` after `train.max_nonfinite_steps` non-finite losses in a row, and
    `TrainingInterrupted` on SIGTERM (after a checkpoint).
    """
    if config.heldout.tasks and evaluator is None:
        raise ValueError("heldout.tasks needs an evaluator (bidirlm train / pipeline hand one in)")
    model_path, data = validate(config)
    info = dist_utils.init_distributed(config.train.device, config.distributed.backend)
    try:
        # OUTPUT/final is replaced at the end: never when it is the model or the working folder
        check_output(Path(config.train.output) / "final", inputs=[model_path], what="train.output")
        # one run per output folder (a second run would interleave metrics and checkpoints)
        with lock_output(config.train.output, enabled=info.is_main):
            return _train(config, info, model_path, data, stop_after, on_step, evaluator)
    finally:
        dist_utils.shutdown(info)


def _train(config, info, model_path, data, stop_after, on_step, evaluator=None) -> Path:
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
        check_config_change(config, output, latest_step, lambda m: log(m, main=main), main)
    if latest is not None and final.joinpath("config.json").is_file():
        phase_state = cio.load_checkpoint(latest).state.get("task") or {}
        if latest_step >= config.train.steps or phase_state.get("stopped"):
            done = f"{output} already holds a finished run ({latest_step} steps)"
            log(f"{done}: nothing to do", main=main)
            return final
    if main:
        output.mkdir(parents=True, exist_ok=True)
        if latest is None or not (output / "config.toml").is_file():
            write_config(output / "config.toml", config.to_toml())
        log(config_summary(config, info, output), main=main)
        log(f"model {model_path} on {info.device} (world size {info.world_size})", main=main)
    run = _Run(config, info, model_path, data)
    heldout = HeldoutEvaluation(config, run.tokenizer, evaluator, lambda m: log(m, main=main))
    for line in start_notes(run.plan, run.autocast, run.peak_flops, info.device):
        log(line, main=main)  # the effective batch; MFU unknown on a device without a peak
    if latest is not None:
        run.resume(latest)
        log(f"resumed from {latest} (step {run.step})", main=main)
    if main:
        cio.truncate_metrics(output / "metrics.jsonl", run.step)
    steps, started = config.train.steps, run.step
    step_log = StepLog(config, output, main=main, initial=run.step, log=lambda m: log(m, main=main))
    with StopSignals(lambda m: log(m, main=main)) as stop_signal, contextlib.closing(step_log):
        while run.step < steps:
            try:
                row = run.run_step()
            except BadRecordError as exc:
                saved = run.checkpoint_before_failed_step()
                kept = f"saved checkpoint {saved}" if saved else "nothing new to save"
                raise ValueError(
                    f"{exc} (found at step {run.step + 1}; {kept}; fix the record or set "
                    "data.skip_bad_records=true, then run the same command to resume)"
                ) from None
            run.phase.after_step(run, row)  # e.g. dev evaluation, best model, early stopping
            if heldout.due(run.step, steps):
                row["heldout"] = heldout.run(run)
            step_log.write(row)  # metrics.jsonl, TensorBoard / W&B, console (main process)
            if on_step is not None:
                on_step(row)
            if run.nonfinite_in_row >= config.train.max_nonfinite_steps:
                raise TrainingError(
                    f"{run.nonfinite_in_row} non-finite losses in a row (loss {row['loss']}, "
                    f"grad norm {row['grad_norm']}) at step {run.step}: stopping; lower optim.lr, "
                    "check the data, or raise train.max_nonfinite_steps"
                )
            if run.step == steps and run.nonfinite_in_row:
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
            early = run.phase.stop_reason
            if (every and run.step % every == 0) or stop or early or run.step == steps:
                path = run.save_checkpoint()
                if stop and run.step < steps:
                    raise TrainingInterrupted(run.step, path, stop_signal.reason)
            if early:
                log(f"early stop at step {run.step}: {early}", main=main)
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
