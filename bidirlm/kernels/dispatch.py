"""Kernel dispatch: which implementation (Triton or the torch reference) an op runs.

`BIDIRLM_KERNELS=auto|triton|torch` (default `auto`). `auto` runs Triton when the inputs are on a
GPU or `TRITON_INTERPRET=1` is set, and the torch reference otherwise. An explicit `triton` that
cannot run raises instead of falling back. `bidirlm env` prints the choice and the reason.

Nothing here queries a device at import time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

VALID_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Decision:
    """The implementation an op will run and why."""

    impl: str  # "triton" or "torch"
    reason: str


def requested() -> str:
    """The value of BIDIRLM_KERNELS, validated."""
    value = os.environ.get("BIDIRLM_KERNELS", "auto").strip().lower() or "auto"
    if value not in VALID_CHOICES:
        raise ValueError(
            f"BIDIRLM_KERNELS={value!r} is not valid; choose one of {', '.join(VALID_CHOICES)}"
        )
    return value


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


_TRITON_IMPORTABLE: bool | None = None


def triton_importable() -> bool:
    # A plain module-level cache rather than functools.lru_cache: dynamo warns about tracing
    # through lru_cache-wrapped functions when an op is called under torch.compile.
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def decide(device: torch.device | str | None = None) -> Decision:
    """Pick the implementation for inputs living on `device` (None: the default GPU if any)."""
    choice = requested()
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    on_gpu = device.type == "cuda"  # ROCm devices are also "cuda" in torch
    have_triton = triton_importable()
    if choice == "torch":
        return Decision("torch", "BIDIRLM_KERNELS=torch")
    if choice == "triton":
        if not have_triton:
            raise RuntimeError("BIDIRLM_KERNELS=triton but the triton package is not installed")
        if not on_gpu and not interpreting():
            raise RuntimeError(
                f"BIDIRLM_KERNELS=triton but the inputs are on {device.type} and "
                "TRITON_INTERPRET=1 is not set: Triton cannot run there"
            )
        where = "GPU" if on_gpu else "Triton CPU interpreter (TRITON_INTERPRET=1)"
        return Decision("triton", f"BIDIRLM_KERNELS=triton, running on the {where}")
    # auto
    if not have_triton:
        return Decision("torch", "auto: triton is not installed")
    if on_gpu:
        return Decision("triton", f"auto: inputs on a GPU ({device})")
    if interpreting():
        return Decision("triton", "auto: TRITON_INTERPRET=1 runs Triton kernels on the CPU")
    return Decision("torch", f"auto: inputs on {device.type} without TRITON_INTERPRET=1")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when an op called with these tensors should run its Triton kernel."""
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    return decide(device).impl == "triton"
