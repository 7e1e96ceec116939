"""Merge methods with mergekit's semantics: their specs (`SPECS`) and arithmetic, on whole
tensors (`registry` holds one class per method; `extra_methods` mergekit's newer ones).

Every function takes the input tensors of one output tensor, already cast to the merge dtype
and ordered as in the YAML (the base where mergekit puts it), and returns the merged tensor in
that dtype. The operations are mergekit 0.1.5's, in its order, so a deterministic method gives
the same bits as mergekit for the same YAML (see `tests/merging/test_merge_methods.py`).

Notation: `b` the base tensor, `x_i` the other inputs, `d_i = x_i - b` their task vectors, `w_i`
their weights, `rho_i` their densities, `lambda` the global scale.

The random sparsifications (`dare_*`, `della*`) draw their masks from a generator seeded per
output tensor and input (`tensor_generator`), so a merge is reproducible whatever the thread
count or tensor order. mergekit draws from torch's global generator in its task-graph order
instead: its stream cannot be reproduced outside its scheduler, so these methods match mergekit
in distribution (same keep probabilities, same rescaling), not bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

REQUIRED = object()


@dataclass(frozen=True)
class MethodSpec:
    """What a method reads: shared parameters (one value per tensor) and per-input parameters
    with their defaults (`REQUIRED` when none), and the inputs it accepts (mergekit's contract)."""

    shared: dict[str, Any] = field(default_factory=dict)
    per_input: dict[str, Any] = field(default_factory=dict)
    per_input_base: bool = False  # per-input parameters also bind to the base (scope INPUT)
    base: str = "ignored"  # required | optional | ignored
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    streamable: bool = False  # elementwise: merged slice by slice instead of whole tensors
    random: bool = False
    # Valid range of a parameter, `(low, high)` inclusive, None for no bound: mergekit checks
    # only della's epsilon (mid-merge); a value outside is refused before anything is written.
    domains: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    integers: tuple[str, ...] = ()  # parameters that take whole numbers
    float32_result: bool = False  # mergekit's arithmetic promotes bf16/fp16 results to float32


UNIT = (0.0, 1.0)
NON_NEGATIVE = (0.0, None)
GTA_DOMAINS = {"density": UNIT, "gamma": UNIT, "epsilon": NON_NEGATIVE}


def _gta(normalize: bool, rescale: bool, extra: dict[str, Any] | None = None) -> MethodSpec:
    return MethodSpec(
        shared={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        per_input={"weight": REQUIRED, "density": 1.0, **(extra or {})},
        base="required",
        domains=GTA_DOMAINS,
    )


SPECS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        shared={"normalize": True},
        per_input={"weight": REQUIRED},
        per_input_base=True,
        streamable=True,
    ),
    "task_arithmetic": MethodSpec(**{**_gta(False, False).__dict__, "streamable": True}),
    "ties": _gta(True, False),
    "dare_ties": MethodSpec(**{**_gta(False, True).__dict__, "random": True}),
    "dare_linear": MethodSpec(**{**_gta(False, True).__dict__, "random": True}),
    "breadcrumbs": _gta(False, False, {"gamma": 0.01}),
    "breadcrumbs_ties": _gta(False, False, {"gamma": 0.01}),
    "della": MethodSpec(**{**_gta(True, True, {"epsilon": 0.15}).__dict__, "random": True}),
    "della_linear": MethodSpec(**{**_gta(False, True, {"epsilon": 0.15}).__dict__, "random": True}),
    "slerp": MethodSpec(
        shared={"t": REQUIRED}, base="required", min_inputs=2, max_inputs=2, domains={"t": UNIT}
    ),
    "nuslerp": MethodSpec(
        shared={"nuslerp_row_wise": False, "nuslerp_flatten": True},
        per_input={"weight": REQUIRED},
        base="optional",
        min_non_base=2,
        max_non_base=2,
    ),
    "model_stock": MethodSpec(shared={"filter_wise": False}, base="required", min_inputs=3),
    "passthrough": MethodSpec(per_input={"scale": None}, per_input_base=True, max_inputs=1),
    # mergekit's newer methods (implemented in `extra_methods`)
    "sce": MethodSpec(
        shared={"int8_mask": False, "select_topk": 1.0},
        base="required",
        domains={"select_topk": UNIT},
    ),
    "ram": MethodSpec(shared={"epsilon": 1e-5}, base="required", domains={"epsilon": NON_NEGATIVE}),
    "ramplus_tl": MethodSpec(
        shared={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        base="required",
        domains={"r": NON_NEGATIVE, "alpha": NON_NEGATIVE, "epsilon": NON_NEGATIVE},
        float32_result=True,
    ),
    "multislerp": MethodSpec(
        shared={"normalize_weights": True, "eps": 1e-8},
        per_input={"weight": REQUIRED},
        base="optional",
        min_non_base=1,
        domains={"eps": NON_NEGATIVE},
    ),
    "karcher": MethodSpec(
        shared={"max_iter": 10, "tol": 1e-5},
        domains={"max_iter": NON_NEGATIVE, "tol": NON_NEGATIVE},
        integers=("max_iter",),
    ),
    "arcee_fusion": MethodSpec(
        base="required", min_inputs=2, max_inputs=2, float32_result=True, random=True
    ),
    "nearswap": MethodSpec(
        shared={"t": REQUIRED},
        base="required",
        min_inputs=2,
        max_inputs=2,
        domains={"t": NON_NEGATIVE},
    ),
}
METHODS = tuple(SPECS)
# Every parameter some method reads: mergekit accepts these on any method and ignores the ones
# the method does not read (we do too, with a warning); other names are typos (refused).
ALL_PARAMETERS = tuple(dict.fromkeys(k for s in SPECS.values() for k in (*s.shared, *s.per_input)))

# (consensus, sparsification) of mergekit's generalized task arithmetic family.
GTA_FAMILY = {
    "task_arithmetic": (None, None),
    "ties": ("sum", "magnitude"),
    "dare_ties": ("sum", "random"),
    "dare_linear": (None, "random"),
    "breadcrumbs": (None, "magnitude_outliers"),
    "breadcrumbs_ties": ("sum", "magnitude_outliers"),
    "della": ("sum", "della_magprune"),
    "della_linear": (None, "della_magprune"),
}


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """The generator of input `index`'s mask for output tensor `name` (order-independent)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# --- sparsification (mergekit.sparsify) -------------------------------------------------------


def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`tensor * mask`, scaled back to the L1 norm of `tensor` when `rescale` (and both norms
    are at least 1e-7)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the `max(1, int(density * n))` largest magnitudes (TIES' trim step)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    w = tensor.abs().reshape(-1).float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, rescale: bool, gamma: float
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `int(gamma * n)` largest magnitudes, then the smallest ones,
    keeping `int(density * n)` elements."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = tensor.abs().reshape(-1).float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype)
    mask[indices[n_bot : n_bot + target]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DARE: keep each element with probability `density` (in float32, bf16 stays bf16)."""
    if density >= 1:
        return tensor
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    probs = torch.full(tensor.shape, density, dtype=work)
    mask = torch.bernoulli(probs, generator=generator)
    return _rescaled(tensor.to(work), mask, rescale).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA's MagPrune: per row, keep element j with probability
    `density - epsilon + 2 * epsilon * (rank_j - 1) / (n - 1)` (rank by magnitude, 1-based)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"epsilon must keep density +/- epsilon in (0, 1), got density {density}, "
            f"epsilon {epsilon}"
        )
    shape = tensor.shape
    work = tensor.dtype if tensor.dtype == torch.bfloat16 else torch.float32
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    ranks = torch.argsort(tensor.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return _rescaled(tensor.to(work), mask, rescale).to(tensor.dtype).reshape(shape)


def sign_consensus(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES' elect step: True where an input's sign agrees with the sign of the summed deltas
    (ties go to +)."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


# --- generalized task arithmetic ---------------------------------------------------------------


def generalized_task_arithmetic(
    xs: Sequence[torch.Tensor],
    base: int,
    params: Sequence[dict[str, Any]],
    shared: dict[str, Any],
    *,
    consensus: str | None,
    sparsification: str | None,
    generators: Sequence[torch.Generator | None] = (),
) -> torch.Tensor:
    """`b + lambda * sum_i m_i * w_i * s(d_i) / D` (mergekit's generalized task arithmetic).

    `s` is the sparsification (identity, magnitude top-k, Bernoulli, outlier-trimmed magnitude or
    MagPrune, each optionally L1-rescaled); `m_i` the sign-consensus mask (1 without consensus);
    `D = sum_i m_i * w_i` (1 where 0; `|D| < 1e-8` -> 1 without consensus) when `normalize`,
    else 1. `params[j]` and `generators[j]` belong to the j-th non-base input. Computed in the
    merge dtype, as mergekit.
    """
    b = xs[base]
    others = [x for i, x in enumerate(xs) if i != base]
    if not others:
        return b
    rescale = bool(shared["rescale"])
    deltas = b.new_empty((len(others), *b.shape))
    for j, x in enumerate(others):
        delta = x - b
        p = params[j]
        if sparsification == "magnitude":
            delta = magnitude(delta, p["density"], rescale)
        elif sparsification == "random":
            delta = bernoulli(delta, p["density"], rescale, generators[j])
        elif sparsification == "magnitude_outliers":
            delta = magnitude_outliers(delta, p["density"], rescale, p["gamma"])
        elif sparsification == "della_magprune":
            delta = della_magprune(delta, p["density"], p["epsilon"], rescale, generators[j])
        deltas[j] = delta
    weights = torch.tensor([p["weight"] for p in params], dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if consensus:
        mask = sign_consensus(deltas, torch.int8 if shared["int8_mask"] else b.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if shared["normalize"]:
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    return (b + mixed).to(b.dtype)


# --- interpolations ----------------------------------------------------------------------------

SLERP_CHUNK = 1024 * 1024  # mergekit's chunk for the norms and the dot product


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors, in float32 (float64 for float64):
    `theta = acos(<v0/|v0|, v1/|v1|>)`, result `sin((1-t) theta)/sin theta * v0 +
    sin(t theta)/sin theta * v1`, linear `(1-t) v0 + t v1` when `|cos theta| > 0.9995`; rounded to
    the input dtype. Norms and dot are accumulated over 2**20-element chunks as mergekit's YAML
    path does (one tensor per kernel call: bitwise equal); mergekit's Python API may batch G
    same-shape tensors into one call with 2**20 / G-element chunks, which agrees within float32
    rounding."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    tt = tt.to(dtype)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    n = a.shape[1]
    step = SLERP_CHUNK
    na = [torch.linalg.vector_norm(a[:, s : s + step].to(dtype), dim=1, keepdim=True)
          for s in range(0, n, step)]  # fmt: skip
    nb = [torch.linalg.vector_norm(b[:, s : s + step].to(dtype), dim=1, keepdim=True)
          for s in range(0, n, step)]  # fmt: skip
    norm_a = torch.linalg.vector_norm(torch.stack(na), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(nb), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = []
    for s in range(0, n, step):
        x = a[:, s : s + step].to(dtype) / norm_a
        y = b[:, s : s + step].to(dtype) / norm_b
        dots.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in range(0, n, step):
        x = a[:, s : s + step].to(dtype)
        y = b[:, s : s + step].to(dtype)
        result[:, s : s + step] = coef_a * x + coef_b * y
    return result.reshape(v0.shape)


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """mergekit's NuSLERP kernel, in the input dtype: slerp of the flattened tensors
    (`flatten`), of each row (`row_wise`: along dim 0) or along the last dim; linear where
    `1 - cos^2 <= eps^2`."""
    shape = v0.shape

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    dim = 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(
    xs: Sequence[torch.Tensor], base: int | None, weights: Sequence[float], shared: dict[str, Any]
) -> torch.Tensor:
    """NuSLERP of the two non-base inputs at `t = w_2 / (w_1 + w_2)` (0.5 when the sum is ~0);
    with a base, of their task vectors: `b + nuslerp(t, x_1 - b, x_2 - b)`."""
    others = [x for i, x in enumerate(xs) if i != base]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    kw = {"row_wise": bool(shared["nuslerp_row_wise"]), "flatten": bool(shared["nuslerp_flatten"])}
    if base is not None:
        b = xs[base]
        return b + nuslerp(t, others[0] - b, others[1] - b, **kw)
    return nuslerp(t, others[0], others[1], **kw)


def model_stock(xs: Sequence[torch.Tensor], base: int, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: `t * mean_i x_i + (1 - t) * b` with `t = k cos / (1 + (k - 1) cos)`, `cos` the
    mean pairwise cosine of the task vectors (per row when `filter_wise`), `k` inputs; `t = 0`
    where the denominator is ~0."""
    w0 = xs[base]
    ws = [x for i, x in enumerate(xs) if i != base]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos_thetas = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            norm = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos_thetas.append(((oa * ob).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


def passthrough(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The single input, times `scale` when set (layer stacking with `slices:`)."""
    return x if scale is None else x * scale
