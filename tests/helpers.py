"""Shared numerical helpers for tests (float64 references, relative-error checks).

The check follows flash-attention and ml-cross-entropy: the kernel's error against a float64
reference must be no worse than a small multiple of PyTorch's own error in the same dtype, plus
a dtype-aware absolute floor.
"""

from __future__ import annotations

import torch

# Absolute floors per dtype: a few ulps at unit scale.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are empty or b is all zeros and a == b)."""
    if a.numel() == 0:
        return 0.0
    denom = b.double().abs().max().item()
    err = max_err(a, b)
    return err / denom if denom > 0 else err


def assert_close_to_ref(
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_out: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """Assert err(out, ref64) <= factor * err(torch_out, ref64) + atol.

    `torch_out` is PyTorch's own computation in the same low precision as `out`; without it the
    check is err <= atol (use for float32/float64 paths).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if atol is None:
        atol = ATOL.get(out.dtype, 1e-5)
    err = max_err(out, ref64)
    bound = atol
    if torch_out is not None:
        bound += factor * max_err(torch_out, ref64)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} ({out.dtype})"


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """Keyword tolerances for torch.testing.assert_close, by dtype."""
    base = {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (1e-4, 1e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }[dtype]
    return {"rtol": base[0] * scale, "atol": base[1] * scale}


def count_triton_launches(monkeypatch) -> list[str]:
    """Names of the Triton launches as they run: the `run` of compiled and interpreted kernels
    is wrapped (the kernel still runs; `kernel[grid](...)` goes through `run` in both)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names: list[str] = []
    for cls in (JITFunction, InterpretedFunction):

        def run(fn, *args, _original=cls.run, **kwargs):
            names.append(fn.fn.__name__)
            return _original(fn, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return names
