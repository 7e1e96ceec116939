"""`bidirlm env`: versions, device, and the kernel implementation `auto` picks (and why)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    import torch

    from bidirlm.kernels import dispatch

    info = {
        "bidirlm": _version("bidirlm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sentence-transformers": _version("sentence-transformers"),
    }
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        backend = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        info["device"] = f"{name} ({backend}, {torch.cuda.device_count()} visible)"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores, no GPU visible to torch)"
    info["BIDIRLM_KERNELS"] = os.environ.get("BIDIRLM_KERNELS", "auto (unset)")
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    try:
        decision = dispatch.decide()
        info["kernels"] = f"{decision.impl} -- {decision.reason}"
    except (RuntimeError, ValueError) as exc:
        info["kernels"] = f"error -- {exc}"
    return info


def run(args: argparse.Namespace) -> int:
    del args
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    sys.stdout.flush()
    return 1 if info["kernels"].startswith("error") else 0
