"""mergekit's newer merge methods: sce, ram, ramplus_tl, multislerp, karcher, arcee_fusion,
nearswap (and the operations they share), on whole tensors.

Like `methods`, every function takes the inputs of one output tensor in the merge dtype, in the
YAML's order, and performs mergekit 0.1.5's operations in its order and dtypes, so the result
has the same bits (and the same dtype: `ramplus_tl` and `arcee_fusion` return float32 for bf16
inputs, as mergekit writes them). Notation as in `methods`: `b` the base, `x_i` the others,
`d_i = x_i - b` their task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .config import MergeError
from .methods import sign_consensus

# --- SCE: select (by variance), calculate (weights from energy), erase (sign conflicts) --------


def sce_select(deltas: torch.Tensor, density: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """Mask of the `int(nonzero * density)` elements whose variance across the task vectors is
    largest (`nonzero`: elements of non-zero variance); all ones at density >= 1."""
    if density <= 0:
        return torch.zeros_like(deltas[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(deltas[0], dtype=mask_dtype)
    spread = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(spread) * density)
    if k == 0:
        return torch.zeros_like(spread, dtype=mask_dtype)
    top = torch.topk(spread.abs().view(-1), k=k, largest=True).indices
    mask = torch.zeros_like(spread, dtype=mask_dtype)
    mask.view(-1)[top] = 1
    return mask


def sce_energy(deltas: torch.Tensor) -> torch.Tensor:
    """Per task vector, its mean square over the sum of them (uniform when the sum is ~0)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(xs: Sequence[torch.Tensor], base: int, shared: dict[str, Any]) -> torch.Tensor:
    """SCE: `b + sum_i e_i m_i s(d_i) / max(sum_i e_i m_i, 1e-6)`, `s` the variance top-k
    selection (`select_topk`), `e_i` the energy weights, `m_i` TIES' sign consensus."""
    b = xs[base]
    others = [x for i, x in enumerate(xs) if i != base]
    if not others:
        return b
    mask_dtype = torch.int8 if shared["int8_mask"] else b.dtype
    deltas = torch.stack([x - b for x in others], dim=0)
    if shared["select_topk"] < 1:
        deltas = deltas * sce_select(deltas, shared["select_topk"], mask_dtype).unsqueeze(0)
    agree = sign_consensus(deltas, mask_dtype)
    energy = sce_energy(deltas)
    while energy.dim() < deltas.dim():
        energy = energy.unsqueeze(-1)
    kept = energy * agree
    return b + (deltas * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


# --- RAM: overlapping task vectors are averaged, unique ones kept --------------------------------


def _ram_parts(
    xs: Sequence[torch.Tensor], base: int, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened task vectors with |d| <= epsilon zeroed, the active mask, the per-element count
    of active inputs, and the masks where that count is > 1 (shared) and == 1 (unique)."""
    b = xs[base]
    others = [x for i, x in enumerate(xs) if i != base]
    flat = torch.stack([x - b for x in others], dim=0).view(len(others), -1)
    active = flat.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return flat * active, active, counts, counts > 1, counts == 1


def ram(xs: Sequence[torch.Tensor], base: int, shared: dict[str, Any]) -> torch.Tensor:
    """RAM: `b + sum_i a_i d_i (1 if c == 1 else 1 / c)`, `a_i = |d_i| > epsilon`, `c` the
    number of active inputs of the element."""
    b = xs[base]
    if len(xs) == 1:
        return b
    delta, _, counts, overlap, unique = _ram_parts(xs, base, shared["epsilon"])
    merged = ((delta * unique) + (delta * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


def ramplus_tl(xs: Sequence[torch.Tensor], base: int, shared: dict[str, Any]) -> torch.Tensor:
    """RAM+ (tensor-local): unique elements of input i are scaled by
    `1 + r * clamp(shared_i / unique_i, 0, alpha)` (its counts of shared and unique active
    elements in this tensor); shared elements are averaged as in RAM."""
    b = xs[base]
    if len(xs) == 1:
        return b
    delta, active, counts, overlap, unique = _ram_parts(xs, base, shared["epsilon"])
    n_shared = (active & overlap).sum(dim=1)
    n_unique = (active & unique).sum(dim=1)
    ratio = n_shared / n_unique.clamp(min=shared["epsilon"])
    boost = 1 + shared["r"] * ratio.clamp(min=0, max=shared["alpha"])
    merged = ((delta * unique * boost.unsqueeze(-1)) + (delta * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return b + merged.reshape_as(b)


# --- spherical means -----------------------------------------------------------------------------


def multislerp(
    xs: Sequence[torch.Tensor],
    base: int | None,
    weights: Sequence[float],
    shared: dict[str, Any],
) -> torch.Tensor:
    """Barycentric interpolation on the sphere: unit vectors (of `x_i`, or `d_i` with a base)
    are mapped to the tangent space at their weighted mean direction, averaged there, mapped
    back (exponential map) and scaled by the weighted mean norm. One non-base input is returned
    as is; a zero mean direction falls back to the linear mix for two inputs."""
    eps = shared["eps"]
    others = [x for i, x in enumerate(xs) if i != base]
    if len(others) == 1:
        return others[0]
    stacked = torch.stack(others, dim=0)
    if base is not None:
        stacked -= xs[base]
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype)
    if shared["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise MergeError(
                "multislerp: the weighted directions of a tensor cancel out (antipodal inputs "
                "with balancing weights); change the weights"
            )
        out = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return out + xs[base] if base is not None else out
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    length = torch.norm(step) + eps
    out = mean * torch.cos(length) + step * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return out + xs[base] if base is not None else out


def karcher(xs: Sequence[torch.Tensor], shared: dict[str, Any]) -> torch.Tensor:
    """Equal-weight Karcher (Riemannian) mean of the directions of every input, by at most
    `max_iter` fixed-point steps (stopping below `tol`), scaled by the mean norm. Norms in
    float32 (float64 for float64 inputs), the iterate in the merge dtype."""
    if len(xs) == 1:
        return xs[0]
    max_iter, tol = int(shared["max_iter"]), shared["tol"]
    alphas = [1.0 / len(xs)] * len(xs)
    acc = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(acc)) for x in xs]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(xs, norms)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in xs)
    total = sum(alphas[i] for i in valid)
    coefs = [alphas[i] / total for i in valid]
    dirs = [units[i] for i in valid]
    mean = torch.zeros_like(dirs[0])
    for a, u in zip(coefs, dirs):
        mean += a * u
    size = torch.linalg.vector_norm(mean.to(acc))
    mean = dirs[0].clone() if size.item() < tol else (mean / size).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(coefs, dirs):
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(tangent.to(acc))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (tangent / length)).to(mean.dtype)
        size = torch.linalg.vector_norm(mean.to(acc))
        if size.item() > tol:
            mean = (mean / size).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


# --- two-model methods ---------------------------------------------------------------------------

QUANTILE_SAMPLE = 1_000_000  # arcee_fusion: quantiles from at most this many elements


def fusion_importance(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`|x - b| * KL(softmax(x) || softmax(b))` along the last dim (1e-8 added to each)."""
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    return (x - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def arcee_fusion(
    xs: Sequence[torch.Tensor], base: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Arcee Fusion: `b + (x - b) * [importance >= median + 1.5 * IQR]` (a float32 mask, so
    bf16 inputs give a float32 result as in mergekit). Quantiles are read from the sorted
    importance at `int(q * (n - 1))`; above 10**6 elements from 10**6 samples drawn with
    `generator` (mergekit draws from torch's global stream: same rule, other samples)."""
    b, x = xs[base], xs[1 - base]
    importance = fusion_importance(x, b)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return b + (x - b) * mask


def nearswap(xs: Sequence[torch.Tensor], base: int, shared: dict[str, Any]) -> torch.Tensor:
    """NearSwap: `w * x + (1 - w) * b`, `w = clamp(t / max(|b - x|, 1e-6), 0, 1)`: elements
    closer than `t` take the other model's value, far ones stay near the base."""
    b, x = xs[base], xs[1 - base]
    w = (shared["t"] / torch.abs(b - x).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * b
