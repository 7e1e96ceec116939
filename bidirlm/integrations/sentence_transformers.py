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
import tempfile
from pathlib import Path

import torch

from bidirlm.runtime.models import Encoder, load_model
from bidirlm.runtime.outputs import AtomicFolder

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
    force: bool = False,
    allow_non_finite: bool | None = None,
) -> Path:
    """Write a sentence-transformers model folder to `output` and return its path.

    `model` is an `Encoder` (with a tokenizer) or a checkpoint folder for `load_model`. The
    exported model is always bidirectional; `pooling` is `mean`, `last` or `first`; `normalize`
    appends a Normalize module; `max_length` becomes `max_seq_length` (truncation, as in
    `encode`). `dtype` sets the exported weights' dtype (None keeps the encoder's).

    The folder is written beside `output` and swapped in only when complete: an existing
    non-empty `output` needs `force` and is removed only after the new one is in place; an
    output that is (or contains) the input model or the working directory is refused
    (`OutputError`). `allow_non_finite` is `load_model`'s opt-out for NaN/Inf weights.
    """
    if pooling not in ST_POOLING:
        raise ValueError(f"pooling={pooling!r} is not valid; choose one of {', '.join(ST_POOLING)}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = Path(output)
    inputs = [] if isinstance(model, Encoder) else [model]
    empty = out.is_dir() and not any(out.iterdir())
    folder = AtomicFolder(out, force=force or empty, inputs=inputs)
    with folder as tmp:  # checks the output before the model is even loaded
        _export(tmp, model, pooling, normalize, max_length, dtype, allow_non_finite)
        folder.commit()
    return out


def _export(
    target: Path,
    model: Encoder | str | os.PathLike,
    pooling: str,
    normalize: bool,
    max_length: int,
    dtype: torch.dtype | None,
    allow_non_finite: bool | None,
) -> None:
    if isinstance(model, Encoder):
        encoder = model
    else:
        encoder = load_model(model, dtype=dtype, allow_non_finite=allow_non_finite)
    if hasattr(encoder, "text_encoder"):  # an omnimodal model: export its text path
        encoder = encoder.text_encoder()
    if encoder.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer (no tokenizer files in its folder): sentence-transformers "
            "needs one"
        )
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Normalize = _modules()
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
        st.save(str(target))
