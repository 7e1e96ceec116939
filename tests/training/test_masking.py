"""MNTP collator: mask ratio, the shift, specials/padding/sequence boundaries, seeding, mask ids."""

from __future__ import annotations

import pytest
import torch

from bidirlm.runtime.training.masking import MNTPCollator, mask_for_mntp, resolve_mask_token_id

MASK = 3
SPECIALS = (0, 1, 2)  # pad, bos, eos in these tests; ordinary tokens are >= 10


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_shift(ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """labels[i] == ids[i+1] exactly where inputs[i+1] was masked; returns the masked positions."""
    masked = (inputs == MASK) & (ids != MASK)
    expect = torch.full_like(ids, -100)
    expect[..., :-1] = torch.where(masked[..., 1:], ids[..., 1:], expect[..., :-1])
    assert torch.equal(labels, expect)
    assert torch.equal(inputs[~masked], ids[~masked]), "unmasked positions must be unchanged"
    return masked


def test_ratio_shift_and_specials_dense() -> None:
    b, s = 64, 128
    ids = torch.randint(10, 1000, (b, s))
    ids[:, 0] = 1  # BOS
    ids[:, -1] = 2  # EOS
    ids[:, 50] = 0  # stray special inside the text
    inputs, labels = mask_for_mntp(
        ids, mask_token_id=MASK, mask_ratio=0.3, generator=_gen(), special_token_ids=SPECIALS
    )
    assert inputs.shape == labels.shape == ids.shape
    assert inputs.dtype == labels.dtype == torch.int64
    masked = _check_shift(ids, inputs, labels)
    assert not masked[:, [0, 50, s - 1]].any(), "special tokens must never be masked"
    assert masked[:, 1].any(), "position 1 has BOS to its left: eligible"
    eligible = s - 3  # BOS, EOS, the stray special
    ratio = masked.sum(1).double() / eligible
    # per-row counts are floor(0.3 * n + u): within one token of the target
    assert ((ratio - 0.3).abs() <= 1.0 / eligible + 1e-9).all()
    assert abs(masked.sum().item() / (b * eligible) - 0.3) < 0.01
    assert (labels[:, -1] == -100).all()
    # labels only where something is predicted
    assert ((labels != -100) == torch.roll(masked, -1, dims=1)).all()


def test_first_token_and_padding_never_masked() -> None:
    ids = torch.randint(10, 1000, (8, 40))
    attn = torch.ones_like(ids)
    attn[0, 30:] = 0  # right padding
    attn[1, :5] = 0  # left padding
    ids[attn == 0] = 0
    inputs, labels = mask_for_mntp(
        ids, mask_token_id=MASK, mask_ratio=1.0, generator=_gen(1), attention_mask=attn
    )
    masked = _check_shift(ids, inputs, labels)
    assert not masked[attn == 0].any(), "padding must never be masked"
    assert not masked[:, 0].any(), "the first token has nothing to its left"
    assert not masked[1, 5], "the first real token after left padding has no real left neighbour"
    # ratio 1.0 masks every eligible position
    eligible = attn.bool().clone()
    eligible[:, 0] = False
    eligible[1, 5] = False
    assert torch.equal(masked, eligible)
    assert (labels[0, 29:] == -100).all()


def test_packed_sequences_respect_boundaries() -> None:
    lens = [7, 1, 30, 12]
    total = sum(lens)
    ids = torch.randint(10, 1000, (total + 5,))  # 5 tail positions past the last sequence
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    inputs, labels = mask_for_mntp(
        ids, mask_token_id=MASK, mask_ratio=1.0, generator=_gen(2), cu_seqlens=cu
    )
    masked = _check_shift(ids, inputs, labels)
    starts = cu[:-1].long()
    assert not masked[starts].any(), "a sequence's first token is never masked"
    assert not masked[total:].any(), "positions past cu_seqlens[-1] are padding"
    assert int(masked.sum()) == sum(n - 1 for n in lens)
    # the last token of a sequence never gets the next sequence's first token as label
    ends = cu[1:].long() - 1
    assert (labels[ends] == -100).all()
    # without cu_seqlens the packed input is a single sequence
    inputs1, _ = mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=1.0, generator=_gen(2))
    assert int((inputs1 == MASK).sum()) == ids.numel() - 1


def test_ratio_statistics_short_sequences() -> None:
    # floor(r * n + u) keeps the expected count exact even for 3-token sequences
    ids = torch.randint(10, 1000, (4000, 4))
    _, labels = mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=0.2, generator=_gen(3))
    frac = (labels != -100).sum().item() / (4000 * 3)
    assert abs(frac - 0.2) < 0.015


def test_seeded_and_edge_ratios() -> None:
    ids = torch.randint(10, 1000, (4, 64))
    a = mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=0.4, generator=_gen(7))
    b = mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=0.4, generator=_gen(7))
    c = mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=0.4, generator=_gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    inputs, labels = mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=0.0)
    assert torch.equal(inputs, ids) and (labels == -100).all()
    inputs, labels = mask_for_mntp(
        ids.int(), mask_token_id=MASK, mask_ratio=0.5, ignore_index=-1, generator=_gen()
    )
    assert labels.dtype == torch.int64 and inputs.dtype == torch.int64
    assert (labels == -1).any() and (labels != -1).any() and not (labels == -100).any()
    assert set(labels[labels != -1].tolist()) <= set(ids.flatten().tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"mask_token_id": -1}, "mask_token_id"),
        ({"cu_seqlens": torch.tensor([0, 4])}, "cu_seqlens"),
        ({"attention_mask": torch.ones(2, 3)}, "attention_mask"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"mask_token_id": MASK, "mask_ratio": 0.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        mask_for_mntp(torch.randint(10, 100, (2, 8)), **args)


def test_bad_input_ids_and_cu_seqlens() -> None:
    with pytest.raises(ValueError, match="input_ids"):
        mask_for_mntp(torch.rand(2, 8), mask_token_id=MASK, mask_ratio=0.2)
    with pytest.raises(ValueError, match="input_ids"):
        mask_for_mntp(torch.zeros(1, 2, 3, dtype=torch.long), mask_token_id=MASK, mask_ratio=0.2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ids = torch.randint(10, 100, (8,))
        mask_for_mntp(ids, mask_token_id=MASK, mask_ratio=0.2, cu_seqlens=torch.tensor([0, 9]))


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    """A tiny word-level tokenizer trained locally on the stdlib's own text (no download)."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = list(pydoc_data.topics.topics.values())[:50]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=500, special_tokens=["<pad>", "<unk>", "<s>"])
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )


def test_resolve_mask_token_id(tokenizer) -> None:  # noqa: ANN001
    assert tokenizer.mask_token_id is None
    with pytest.raises(ValueError, match="no mask token"):
        resolve_mask_token_id(tokenizer)
    word = "the"
    assert resolve_mask_token_id(tokenizer, word) == tokenizer.get_vocab()[word]
    with pytest.raises(ValueError, match="single token"):
        resolve_mask_token_id(tokenizer, "zzqx not-a-word")
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    try:
        assert resolve_mask_token_id(tokenizer, word) == tokenizer.convert_tokens_to_ids("<mask>")
    finally:
        tokenizer.mask_token = None


def test_collator_from_tokenizer(tokenizer) -> None:  # noqa: ANN001
    collate = MNTPCollator.from_tokenizer(tokenizer, mask_ratio=0.5, mask_token="the", seed=0)
    mask_id = collate.mask_token_id
    bos = tokenizer.bos_token_id
    texts = ["the object is a callable and returns", "a class the", "if the"]
    seqs = [[bos, *tokenizer.encode(t, add_special_tokens=False)] for t in texts]
    out = collate(seqs)
    ids, attn = out["input_ids"], out["attention_mask"]
    assert ids.shape == (3, max(map(len, seqs)))
    assert torch.equal(attn.sum(1), torch.tensor([len(s) for s in seqs]))
    assert (ids[:, 0] == bos).all(), "specials are never masked"
    assert (ids[attn == 0] == tokenizer.pad_token_id).all(), "padding is never masked"
    original = torch.full_like(ids, tokenizer.pad_token_id)
    for i, s in enumerate(seqs):
        original[i, : len(s)] = torch.tensor(s)
    masked = (ids == mask_id) & (original != mask_id)
    assert masked.any()
    labels = out["labels"]
    assert torch.equal(labels[:, :-1][masked[:, 1:]], original[:, 1:][masked[:, 1:]])
    # same seed, same masks; mapping input passes other keys through
    again = MNTPCollator.from_tokenizer(tokenizer, mask_ratio=0.5, mask_token="the", seed=0)
    out2 = again({"input_ids": original, "attention_mask": attn, "extra": 1})
    assert torch.equal(out2["input_ids"], ids) and out2["extra"] == 1
    with pytest.raises(ValueError, match="mask_ratio"):
        MNTPCollator(mask_token_id=1, mask_ratio=2.0)
