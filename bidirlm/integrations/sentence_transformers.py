"""Export an `Encoder` as a sentence-transformers folder that loads offline, bidirectionally.

The folder holds a Hugging Face checkpoint whose config.json records bidirectional attention the
way transformers reads it (Qwen3 `is_causal: false`, Gemma3 `use_bidirectional_attention: true`),
so `SentenceTransformer(folder)` needs neither bidirlm nor custom code and gives the embeddings
of `Encoder.encode(texts, pooling=...)` (up to float rounding). The tokenizer pads on the right:
transformers numbers padded positions 0..S-1, so left padding would shift the RoPE positions of
short texts and change their embeddings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from bidirlm.runtime.models import Encoder, load_model

# our pooling name -> sentence-transformers Pooling mode
ST_POOLING = {"mean": "mean", "last": "lasttoken", "first": "cls"}


def _modules():
    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # older layout
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def export_sentence_transformers(
    model: Encoder | str | os.PathLike,
    output: str | os.PathLike,
    *,
    pooling: str = "mean",
    normalize: bool = False,
    max_length: int = 512,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a sentence-transformers model folder to `output` and return its path.

    `model` is an `Encoder` (with a tokenizer) or a checkpoint folder for `load_model`. The
    exported model is always bidirectional; `pooling` is `mean`, `last` or `first`; `normalize`
    appends a Normalize module; `max_length` becomes `max_seq_length` (truncation, as in
    `encode`). `dtype` sets the exported weights' dtype (None keeps the encoder's).
    """
    if pooling not in ST_POOLING:
        raise ValueError(f"pooling={pooling!r} is not valid; choose one of {', '.join(ST_POOLING)}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    encoder = model if isinstance(model, Encoder) else load_model(model, dtype=dtype)
    if encoder.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer (no tokenizer files in its folder): sentence-transformers "
            "needs one"
        )
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Normalize = _modules()
    out = Path(output)
    with tempfile.TemporaryDirectory(prefix="bidirlm-export-") as tmp:
        was_bidirectional, was_side = encoder.bidirectional, encoder.tokenizer.padding_side
        encoder.bidirectional = True
        encoder.tokenizer.padding_side = "right"
        try:
            encoder.save_pretrained(tmp)
        finally:
            encoder.bidirectional, encoder.tokenizer.padding_side = was_bidirectional, was_side
        model_kwargs = {"dtype": dtype} if dtype is not None else None
        transformer = Transformer(tmp, max_seq_length=max_length, model_kwargs=model_kwargs)
        modules = [transformer, Pooling(encoder.hidden_size, pooling_mode=ST_POOLING[pooling])]
        if normalize:
            modules.append(Normalize())
        st = SentenceTransformer(modules=modules, device="cpu")
        if out.exists():
            shutil.rmtree(out)
        st.save(str(out))
    return out
