"""Multi-process training through torchrun: process group, DDP / FSDP2 wrapping, small collectives.

`torchrun --nproc-per-node N -m bidirlm.cli train CONFIG.toml` (or `bidirlm train` under any
launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) runs one process
per device. Without those variables (or with WORLD_SIZE=1) everything here is a no-op. The
backend is NCCL (RCCL on ROCm) on GPUs and gloo on the CPU, so the multi-process path is testable
on a CPU machine.

`distributed.strategy` picks the wrapper: `ddp` (replicated weights, gradients all-reduced) or
`fsdp` (FSDP2 `torch.distributed.fsdp.fully_shard`: every block of each `nn.ModuleList` is a
shard unit, then the root).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` -> `cuda:<local_rank>` when a GPU is visible, else the CPU; else as given."""
    if requested == "auto":
        return (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"train.device: {requested!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"train.device: {requested!r} cannot train; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={requested!r} but no GPU is visible to torch")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"train.device={requested!r} but torch sees {torch.cuda.device_count()} GPU(s)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={requested!r} but MPS is not available")
    return device


def init_distributed(device_request: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a (small) tensor; the input itself when alone."""
    if not info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def stream_state(stream: object, info: DistInfo) -> dict[str, object]:
    """A batch stream's checkpoint state: its own for a global stream (every rank's is the
    same), every rank's (`{"per_rank": [...]}`, gathered: a collective) for a stream each rank
    reads on its own (`per_rank`: a streamed source)."""
    state = stream.state_dict()  # type: ignore[attr-defined]
    inner = getattr(stream, "stream", stream)
    if not (info.enabled and getattr(inner, "per_rank", False)):
        return state
    states: list[object] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return {"per_rank": states}


def own_stream_state(state: dict[str, object], info: DistInfo) -> dict[str, object]:
    """This rank's part of a `stream_state` (ValueError when the world size changed)."""
    if "per_rank" not in state:
        return state
    states = state["per_rank"]
    if len(states) != info.world_size:  # type: ignore[arg-type]
        raise ValueError(
            f"the checkpoint's data was read per rank by {len(states)} ranks "  # type: ignore[arg-type]
            f"(a streamed source); resume it on {len(states)} ranks, not {info.world_size}"  # type: ignore[arg-type]
        )
    return states[info.rank]  # type: ignore[index]


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 around `model` (already on `info.device`); `model` itself when alone."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"distributed.strategy {strategy!r} is not one of ddp, fsdp")


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Suspend gradient synchronisation (accumulation micro-steps): DDP `no_sync`, FSDP2
    `set_requires_gradient_sync(False)`; nothing for an unwrapped model."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The unsharded model state dict on the CPU (complete on rank 0; collective under FSDP)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=info.enabled)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> dict[str, object]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=info.enabled)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, object],
) -> None:
    """Load full (unsharded) states into a possibly sharded model and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def nonfinite_parameters(model: nn.Module, info: DistInfo) -> list[str]:
    """Names of this rank's parameters holding NaN/Inf; every rank agrees on whether any does
    (the count is all-reduced: "(on another rank)" when only others have some)."""
    names = []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not bool(torch.isfinite(local.detach()).all()):
            names.append(name)
    count = torch.tensor(float(len(names)), device=info.device)
    if float(all_reduce_sum(count, info)) > 0 and not names:
        names.append("(on another rank)")
    return names
