"""Model FLOPs utilization: achieved training FLOP/s over the device's dense bf16 peak.

`PEAK_BF16_FLOPS` is keyed by a fragment of the name `torch.cuda.get_device_name` reports (the
first fragment found in the name wins, so the more specific names come first). Values are the
vendors' data-sheet dense bf16 peaks (no sparsity) of one device as torch sees it: an MI250X
or MI250 shows up as two devices, one per GCD, so its row is half the package's figure
(MI250X: 383 TFLOP/s per package, 191.5 per GCD).
"""

from __future__ import annotations

import torch

PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "MI355": 2500e12,
    "MI325": 1307e12,
    "MI300": 1307e12,
    "MI250X": 191.5e12,  # per GCD (one torch device)
    "MI250": 181e12,  # per GCD (one torch device)
}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a device by its name; None when it is not in the table."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """The peak of a CUDA/ROCm device (None on the CPU or an unknown device)."""
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def mfu(n_params: int, tokens: int, seconds: float, peak_flops: float, devices: int = 1) -> float:
    """6 N FLOPs per token (Kaplan et al.: forward + backward of the matmuls, attention scores
    ignored, an underestimate for long sequences) over `devices` times the peak."""
    return 6 * n_params * tokens / seconds / (peak_flops * devices)
