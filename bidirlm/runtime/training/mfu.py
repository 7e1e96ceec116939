"""Model FLOPs utilization: achieved training FLOP/s over the device's dense peak, per dtype.

`PEAK_FLOPS` is keyed by a fragment of the name `torch.cuda.get_device_name` reports (the first
fragment found in the name wins, so the more specific names come first: "H100 PCIe" before
"H100"); each row holds the vendor's data-sheet dense peak (no sparsity) in bfloat16 and float16
of ONE device as torch sees it. An MI250X (or MI250) package is two GCDs and torch shows two
devices, so its row is half the package's figure: 383 TFLOP/s per MI250X package, 191.5 per GCD.

Names torch reports, for reference: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
"NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "AMD Instinct MI250X" (some ROCm
releases: "AMD Instinct MI250X / MI250"), "AMD Instinct MI300X", "AMD Instinct MI325X". A device
that is not in the table (or the CPU) has no peak: the run logs tokens/s and says MFU is unknown.
"""

from __future__ import annotations

import torch

TFLOPS = 1e12

# name fragment -> {dtype: dense peak FLOP/s of one torch device}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS},
    "H100 PCIe": {"bfloat16": 756 * TFLOPS, "float16": 756 * TFLOPS},
    "H100 NVL": {"bfloat16": 835 * TFLOPS, "float16": 835 * TFLOPS},
    "H100": {"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS},  # SXM5 (80GB HBM3)
    "H800": {"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS},
    "GH200": {"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS},
    "B200": {"bfloat16": 2250 * TFLOPS, "float16": 2250 * TFLOPS},
    "A100": {"bfloat16": 312 * TFLOPS, "float16": 312 * TFLOPS},  # SXM4 and PCIe alike
    "L40S": {"bfloat16": 362 * TFLOPS, "float16": 362 * TFLOPS},
    "MI355": {"bfloat16": 2500 * TFLOPS, "float16": 2500 * TFLOPS},
    "MI325": {"bfloat16": 1307 * TFLOPS, "float16": 1307 * TFLOPS},
    "MI300X": {"bfloat16": 1307 * TFLOPS, "float16": 1307 * TFLOPS},
    "MI300A": {"bfloat16": 980.6 * TFLOPS, "float16": 980.6 * TFLOPS},
    "MI250X": {"bfloat16": 191.5 * TFLOPS, "float16": 191.5 * TFLOPS},  # per GCD (torch device)
    "MI250": {"bfloat16": 181 * TFLOPS, "float16": 181 * TFLOPS},  # per GCD (torch device)
}

# The bfloat16 column, as the table was first published (kept importable).
PEAK_BF16_FLOPS: dict[str, float] = {k: v["bfloat16"] for k, v in PEAK_FLOPS.items()}

# The device classes `bidirlm pipeline --check` estimates run times for (name -> table key).
DEVICE_CLASSES: dict[str, str] = {
    "H100 SXM": "H100",
    "H100 PCIe": "H100 PCIe",
    "H200": "H200",
    "A100": "A100",
    "MI250X GCD": "MI250X",
    "MI300X": "MI300X",
    "MI325X": "MI325",
}


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)


def peak_flops(device_name: str, dtype: torch.dtype | str = "bfloat16") -> float | None:
    """The dense peak FLOP/s of one device by its torch name in `dtype` (bfloat16 / float16);
    None when the device or the dtype is not in the table."""
    row = next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
    return None if row is None else row.get(_dtype_name(dtype))


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a device by its name; None when it is not in the table."""
    return peak_flops(device_name, "bfloat16")


def device_name(device: torch.device) -> str:
    """What torch calls `device` ("cpu" for the CPU)."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def device_peak_flops(device: torch.device, dtype: torch.dtype | str = "bfloat16") -> float | None:
    """The peak of a CUDA/ROCm device in `dtype` (None on the CPU or an unknown device)."""
    if device.type != "cuda":
        return None
    return peak_flops(device_name(device), dtype)


def mfu(n_params: int, tokens: int, seconds: float, peak_flops: float, devices: int = 1) -> float:
    """6 N FLOPs per token (Kaplan et al.: forward + backward of the matmuls, attention scores
    ignored, an underestimate for long sequences) over `devices` times the peak."""
    return 6 * n_params * tokens / seconds / (peak_flops * devices)


def device_hours(n_params: int, tokens: int, peak: float, utilization: float) -> float:
    """Device-hours to train `n_params` on `tokens` at `utilization` of `peak` (6 N per token):
    an estimate, not a measurement."""
    return 6 * n_params * tokens / (peak * utilization) / 3600
