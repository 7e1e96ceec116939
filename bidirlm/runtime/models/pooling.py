"""Sequence pooling (mean, last token, first token) over packed or padded hidden states."""

from __future__ import annotations

import torch

POOLINGS = ("mean", "last", "first")


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token inside its sequence, `[T]` int64, from `cu_seqlens [N+1]`.

    Uses `searchsorted` (no host sync, traceable by torch.compile).
    """
    idx = torch.arange(total, device=cu_seqlens.device)
    seq = sequence_ids(cu_seqlens, total)
    return idx - cu_seqlens.long()[seq]


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the sequence each packed token belongs to, `[T]` int64."""
    idx = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)


def pool(
    hidden: torch.Tensor,
    *,
    pooling: str,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One vector per sequence, `[N, d]` in `hidden`'s dtype (averages accumulate in float32).

    Packed: `hidden [T, d]` with `cu_seqlens [N+1]` (every sequence non-empty). Padded:
    `hidden [B, S, d]` with `attention_mask [B, S]` (1 = real token; None = no padding); `first` and
    `last` pick the first/last real token, so left and right padding both work. `mean` averages
    the real tokens.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not valid; choose one of {', '.join(POOLINGS)}")
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("attention_mask: pass attention_mask (padded) or cu_seqlens, not both")
        if hidden.dim() != 2:
            raise ValueError(f"hidden: packed input must be [T, d], got {tuple(hidden.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens: expected [N+1] with N >= 1, got {tuple(cu_seqlens.shape)}"
            )
        cu = cu_seqlens.long()
        if pooling == "first":
            return hidden[cu[:-1]]
        if pooling == "last":
            return hidden[cu[1:] - 1]
        n = cu.numel() - 1
        seq = sequence_ids(cu, hidden.shape[0])
        sums = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seq, hidden.float())
        counts = (cu[1:] - cu[:-1]).clamp(min=1).to(torch.float32)
        return (sums / counts[:, None]).to(hidden.dtype)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: padded input must be [B, S, d], got {tuple(hidden.shape)}")
    b, s, _ = hidden.shape
    if attention_mask is None:
        mask = torch.ones(b, s, dtype=torch.bool, device=hidden.device)
    else:
        if tuple(attention_mask.shape) != (b, s):
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} != hidden's [B, S] {(b, s)}"
            )
        mask = attention_mask != 0
    rows = torch.arange(b, device=hidden.device)
    if pooling == "first":
        return hidden[rows, mask.int().argmax(dim=1)]
    if pooling == "last":
        return hidden[rows, s - 1 - mask.flip(1).int().argmax(dim=1)]
    weights = mask.to(torch.float32)
    sums = torch.einsum("bsd,bs->bd", hidden.float(), weights)
    return (sums / weights.sum(1).clamp(min=1)[:, None]).to(hidden.dtype)
