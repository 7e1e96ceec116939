"""Per-vendor/architecture launch-config selection shared by the kernels.

Each kernel keeps a table of fixed best configs keyed by `arch_key()`; `BIDIRLM_AUTOTUNE=1`
switches to a full `triton.autotune` sweep (which needs a GPU: autotune with more than one config
fails in the interpreter). Device properties are queried lazily, never at import time.
"""

from __future__ import annotations

import functools
import os

import torch

from .dispatch import interpreting


def autotune_enabled() -> bool:
    return os.environ.get("BIDIRLM_AUTOTUNE", "0") not in ("", "0") and not interpreting()


def debug_checks() -> bool:
    """Checks that need a device sync (e.g. cu_seqlens contents on a GPU) run only when set."""
    return os.environ.get("BIDIRLM_DEBUG", "0") not in ("", "0")


def is_hip() -> bool:
    return getattr(torch.version, "hip", None) is not None


@functools.lru_cache(maxsize=16)
def _arch_key_for(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    if is_hip():
        # e.g. "gfx942:sramecc+:xnack-" -> "gfx942"
        return "amd-" + getattr(props, "gcnArchName", "unknown").split(":")[0]
    return f"nvidia-sm{props.major}{props.minor}"


def arch_key(device: torch.device) -> str:
    """'interpreter', 'cpu', 'nvidia-sm90', 'nvidia-sm80', 'amd-gfx942', ..."""
    if device.type != "cuda":
        return "interpreter" if interpreting() else "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _arch_key_for(index)


def arch_family(device: torch.device) -> str:
    """Coarse family: 'hopper', 'ampere', 'nvidia', 'cdna', 'amd' or 'interpreter'."""
    key = arch_key(device)
    if (
        key.startswith("nvidia-sm9")
        or key.startswith("nvidia-sm10")
        or key.startswith("nvidia-sm12")
    ):
        return "hopper"
    if key.startswith("nvidia-sm8"):
        return "ampere"
    if key.startswith("nvidia"):
        return "nvidia"
    if key.startswith("amd-gfx9"):
        return "cdna"
    if key.startswith("amd"):
        return "amd"
    return "interpreter"
