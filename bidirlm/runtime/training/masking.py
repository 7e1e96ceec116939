"""MNTP masking: build masked inputs and shifted labels from token ids.

Masked next-token prediction (LLM2Vec, BidirLM) masks a fraction of the tokens and trains the
output at position i to predict the original token at i + 1 when that token was masked: the model
keeps its next-token head, now reading a bidirectional context. So

    inputs[j] = mask_token_id                 for the chosen positions j
    labels[i] = original[i + 1]                if position i + 1 was chosen (same sequence)
              = ignore_index                   otherwise

A position is eligible when it is a real token (not padding), not a special token, and the
position to its left belongs to the same sequence and is a real token: the first token of a
sequence has no output to its left that could predict it.

Every masked token becomes `mask_token_id` (no BERT-style 10% random / 10% kept tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime.models.checkpoint import has_tokenizer


def _check_ratio(mask_ratio: float) -> float:
    ratio = float(mask_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
    return ratio


def _sequence_ids(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Per-position sequence index (tail past the last sequence: -1) and number of sequences."""
    if input_ids.dim() == 2:
        b, s = input_ids.shape
        ids = torch.arange(b, device=input_ids.device)[:, None].expand(b, s)
        return ids, b
    t = input_ids.shape[0]
    if cu_seqlens is None:
        return torch.zeros(t, dtype=torch.long, device=input_ids.device), 1
    cu = cu_seqlens.to(device=input_ids.device, dtype=torch.long)
    pos = torch.arange(t, device=input_ids.device)
    ids = torch.searchsorted(cu, pos, right=True) - 1
    ids = torch.where(pos < cu[-1], ids, torch.full_like(ids, -1))
    return ids, cu.numel() - 1


def _validate(
    input_ids: torch.Tensor,
    mask_token_id: int,
    cu_seqlens: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
        torch.int64,
        torch.int32,
    ):
        raise ValueError("input_ids must be an int64/int32 tensor of token ids")
    if input_ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids must be [B, S] or packed [T], got shape {tuple(input_ids.shape)}"
        )
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    if cu_seqlens is not None:
        if input_ids.dim() != 1:
            raise ValueError("cu_seqlens is only valid with packed input_ids of shape [T]")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be [N + 1], got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.long().cpu()
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > input_ids.numel():
            raise ValueError(
                "cu_seqlens must start at 0, be non-decreasing and end at most at "
                f"len(input_ids)={input_ids.numel()}; got {cu.tolist()}"
            )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
            f"{tuple(input_ids.shape)}"
        )


def mask_for_mntp(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    special_token_ids: Iterable[int] = (),
    cu_seqlens: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked inputs and MNTP labels for `input_ids [B, S]` or packed `[T]`.

    Args:
        input_ids: token ids, `[B, S]` (padded batch) or `[T]` (packed sequences).
        mask_token_id: id written at masked positions.
        mask_ratio: fraction of eligible positions masked in each sequence. The count per
            sequence is `floor(mask_ratio * eligible + u)`, `u ~ U(0, 1)`: exactly mask_ratio
            in expectation, even for short sequences.
        generator: torch.Generator for reproducible masks (random numbers are drawn on its
            device, the CPU by default, then moved to input_ids' device).
        special_token_ids: ids never masked (BOS, EOS, PAD, ...).
        cu_seqlens: `[N + 1]` sequence offsets for packed input; positions past `cu_seqlens[-1]`
            are padding. Packed input without it is one sequence.
        attention_mask: same shape as input_ids, nonzero = real token; zeros are padding.
        ignore_index: label of positions without a target.

    Returns (inputs, labels), both int64 with input_ids' shape: `labels[..., i]` is the original
    token at i + 1 when it was masked, else ignore_index; the last position is always ignored.
    """
    _validate(input_ids, mask_token_id, cu_seqlens, attention_mask)
    ratio = _check_ratio(mask_ratio)
    ids = input_ids.long()
    dev = ids.device
    seq, n_seq = _sequence_ids(ids, cu_seqlens)
    real = seq >= 0
    if attention_mask is not None:
        real = real & attention_mask.to(dev).bool()
    specials = torch.tensor(sorted({int(t) for t in special_token_ids}), dtype=torch.long)
    eligible = real & ~torch.isin(ids, specials.to(dev))
    # the left neighbour must be a real token of the same sequence
    left_ok = torch.zeros_like(eligible)
    left_ok[..., 1:] = real[..., :-1] & (seq[..., 1:] == seq[..., :-1])
    eligible &= left_ok

    # Random key per position; ineligible positions sort last. Sorting by (sequence, key) ranks
    # positions within their sequence, and the first k of each sequence are masked.
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(ids.shape, generator=generator, device=gen_dev).to(dev, torch.float64)
    u = torch.rand(n_seq, generator=generator, device=gen_dev).to(dev, torch.float64)
    keys = torch.where(eligible, keys, torch.full_like(keys, 2.0))
    flat_seq = torch.where(seq >= 0, seq, torch.full_like(seq, n_seq)).reshape(-1)
    order = torch.argsort(flat_seq.double() * 4.0 + keys.reshape(-1), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev)
    counts = torch.bincount(flat_seq, minlength=n_seq + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_seq = rank - starts[flat_seq]
    n_eligible = torch.zeros(n_seq + 1, dtype=torch.long, device=dev)
    n_eligible.index_add_(0, flat_seq, eligible.reshape(-1).long())
    k = torch.floor(ratio * n_eligible[:n_seq].double() + u).long()
    k = torch.minimum(k, n_eligible[:n_seq])
    k = torch.cat([k, k.new_zeros(1)])
    masked = (rank_in_seq < k[flat_seq]).reshape(ids.shape) & eligible

    inputs = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
    labels = torch.full_like(ids, ignore_index)
    labels[..., :-1] = torch.where(masked[..., 1:], ids[..., 1:], labels[..., :-1])
    return inputs, labels


def resolve_mask_token_id(tokenizer: Any, mask_token: str | None = None) -> int:
    """The id used for masking: the tokenizer's own mask token, else `mask_token` as one id.

    Decoder tokenizers (Qwen3, Gemma3) usually have no mask token; the BidirLM recipe then uses a
    configured string such as "_" that must map to exactly one existing token.
    """
    own = getattr(tokenizer, "mask_token_id", None)
    if own is not None:
        return int(own)
    if mask_token is None:
        name = type(tokenizer).__name__
        raise ValueError(
            f"{name} has no mask token; pass mask_token (e.g. '_') naming an existing token"
        )
    if not isinstance(mask_token, str) or not mask_token:
        raise ValueError(f"mask_token must be a non-empty string, got {mask_token!r}")
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if mask_token in vocab:
        return int(vocab[mask_token])
    pieces = tokenizer.encode(mask_token, add_special_tokens=False)
    if len(pieces) != 1 or (unk is not None and pieces[0] == unk):
        raise ValueError(
            f"mask_token {mask_token!r} is not a single token of this tokenizer "
            f"(encodes to {list(pieces)}); choose a string that is one vocabulary entry"
        )
    return int(pieces[0])


def mask_token_id_for(tokenizer: Any, mask_token: str | None, key: str = "mntp.mask_token") -> int:
    """`resolve_mask_token_id` for a config: a problem is a ValueError naming the key `key`."""
    try:
        return resolve_mask_token_id(tokenizer, mask_token)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def check_mask_token(model_path: Any, mask_token: str | None, key: str = "mntp.mask_token") -> int:
    """Load the tokenizer of the model folder `model_path` and resolve the MNTP mask token.

    Run before training (and by `bidirlm pipeline --check`): a tokenizer without a mask token and
    a `mask_token` that is not one vocabulary entry fail in seconds, naming `key`.
    """
    folder = Path(model_path)
    if not has_tokenizer(folder):
        raise ValueError(f"model {folder} has no tokenizer files (needed for MNTP masking)")
    from transformers import AutoTokenizer  # optional dependency (the [train] extra)

    return mask_token_id_for(AutoTokenizer.from_pretrained(str(folder)), mask_token, key)


@dataclass
class MNTPCollator:
    """Turns a batch of token ids into `{"input_ids", "labels", ...}` for MNTP training.

    Call it with a list of token-id sequences (padded on the right with `pad_token_id`; an
    `attention_mask` is added) or with a mapping holding an `input_ids` tensor (plus optional
    `attention_mask` / `cu_seqlens`, passed through). Masks are reproducible from `seed`.
    """

    mask_token_id: int
    mask_ratio: float = 0.2
    special_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    ignore_index: int = -100
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_ratio(self.mask_ratio)
        self.special_token_ids = tuple(int(t) for t in self.special_token_ids)
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.seed))

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        *,
        mask_ratio: float = 0.2,
        mask_token: str | None = None,
        seed: int | None = None,
        ignore_index: int = -100,
    ) -> MNTPCollator:
        """Mask id from `resolve_mask_token_id`; the tokenizer's special ids are never masked."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        return cls(
            mask_token_id=resolve_mask_token_id(tokenizer, mask_token),
            mask_ratio=mask_ratio,
            special_token_ids=tuple(getattr(tokenizer, "all_special_ids", ()) or ()),
            pad_token_id=int(pad),
            ignore_index=ignore_index,
            seed=seed,
        )

    def __call__(self, batch: Mapping[str, Any] | Sequence[Sequence[int]]) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            out = dict(batch)
            input_ids = torch.as_tensor(out["input_ids"])
        else:
            seqs = [list(map(int, s)) for s in batch]
            if not seqs:
                raise ValueError("batch must hold at least one sequence")
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, : len(s)] = 1
            out = {"attention_mask": mask}
        inputs, labels = mask_for_mntp(
            input_ids,
            mask_token_id=self.mask_token_id,
            mask_ratio=self.mask_ratio,
            generator=self.generator,
            special_token_ids=self.special_token_ids,
            cu_seqlens=out.get("cu_seqlens"),
            attention_mask=out.get("attention_mask"),
            ignore_index=self.ignore_index,
        )
        out["input_ids"] = inputs
        out["labels"] = labels
        return out
