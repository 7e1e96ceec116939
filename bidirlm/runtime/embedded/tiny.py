"""The embedded tiny model: a small random Qwen3 with a tokenizer trained here.

`embedded_tiny_model(cache_dir=None)`: a small random Qwen3 (transformers `Qwen3ForCausalLM`)
with a byte-level BPE tokenizer trained here on the embedded corpus, saved in Hugging Face
layout. Special tokens: `<s>` (bos), `</s>` (eos), `<pad>`, and a dedicated `<mask>` for MNTP.
Configs name it `model = "embedded:tiny"`. Built once, atomically, under `$BIDIRLM_CACHE`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .corpus import _build_atomic, cache_root, python_code_texts, python_docs_texts

# Bump when the tiny model changes, so stale caches are not reused.
_TINY_VERSION = 1
TINY_MODEL_NAME = f"tiny-qwen3-v{_TINY_VERSION}"
TINY_VOCAB_SIZE = 2048
TINY_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<mask>")
# Enough text for the BPE merges to settle, small enough to train in a few seconds.
_TOKENIZER_TRAIN_CHARS = 3_000_000


def _train_tokenizer():
    # optional dependencies ([train] extra): tokenizers trains the BPE, transformers wraps it
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus():
        budget = _TOKENIZER_TRAIN_CHARS
        docs, code = python_docs_texts(), python_code_texts()
        # Interleave prose and code so both shape the vocabulary.
        for i in range(max(len(docs), len(code))):
            for source in (docs, code):
                if i < len(source) and budget > 0:
                    budget -= len(source[i])
                    yield source[i]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=1024,
    )


def tiny_qwen3_config(vocab_size: int, **overrides):
    """The tiny model's architecture: 2 layers, width 64, GQA 4:2, head dim 16, tied head."""
    from transformers import Qwen3Config  # optional dependency ([train] extra)

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.02,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def save_random_qwen3(folder: Path, tokenizer: Any, **overrides: Any) -> None:
    """Write a random Qwen3 (seed 0, `tiny_qwen3_config(**overrides)`) + `tokenizer` to `folder`.

    The vocabulary is the tokenizer's, rounded up to a multiple of 64 (friendlier shapes for the
    kernels); the global RNG is left untouched.
    """
    from transformers import Qwen3ForCausalLM  # optional dependency ([train] extra)

    config = tiny_qwen3_config(
        -(-len(tokenizer) // 64) * 64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))


def embedded_tiny_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the embedded tiny model (Hugging Face folder), building it on first use.

    Random Qwen3 weights (seed 0) and a byte-level BPE tokenizer (vocab 2048) trained on the
    embedded corpus. Built once under `cache_dir` (default `$BIDIRLM_CACHE` or
    `~/.cache/bidirlm`) in `models/tiny-qwen3-v1`, atomically.
    """
    final = cache_root(cache_dir) / "models" / TINY_MODEL_NAME

    def build(tmp: Path) -> None:
        save_random_qwen3(tmp, _train_tokenizer())
        (tmp / "README.md").write_text(
            "Embedded tiny model of bidirlm: random Qwen3 weights, BPE tokenizer trained on "
            "Python's stdlib docs and sources. For tests, examples and the demo only.\n",
            encoding="utf-8",
        )

    return _build_atomic(final, build)
