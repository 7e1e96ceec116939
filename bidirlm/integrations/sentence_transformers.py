"""Export an `Encoder` as a sentence-transformers folder that loads offline, bidirectionally.

The folder holds a Hugging Face checkpoint whose config.json records bidirectional attention the
way transformers reads it (Qwen3 `is_causal: false`, Gemma3 `use_bidirectional_attention: true`),
so `SentenceTransformer(folder)` needs neither bidirlm nor custom code and gives the embeddings
of `Encoder.encode(texts, pooling=...)` (up to float rounding). The tokenizer pads on the right:
transformers numbers padded positions 0..S-1, so left padding would shift the RoPE positions of
short texts and change their embeddings.

sentence-transformers is an optional dependency (the `[st]` extra): it is imported inside the
functions that use it, so this module imports without it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from bidirlm import kernels
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
    # The intermediate HF folder lives inside `target` (the hidden folder beside the output): the
    # same filesystem as the output, never a whole copy under $TMPDIR (issue 24 items 10, 18).
    with tempfile.TemporaryDirectory(prefix=".bidirlm-hf-", dir=target) as tmp:
        was_bidirectional, was_side = encoder.bidirectional, encoder.tokenizer.padding_side
        encoder.bidirectional = True
        encoder.tokenizer.padding_side = "right"
        try:
            encoder.save_pretrained(tmp)
        finally:
            encoder.bidirectional, encoder.tokenizer.padding_side = was_bidirectional, was_side
        # the encoder's dtype unless asked: a bf16 base stays bf16 (transformers loads float32)
        model_kwargs = {"dtype": dtype if dtype is not None else encoder.dtype}
        transformer = Transformer(tmp, max_seq_length=max_length, model_kwargs=model_kwargs)
        modules = [transformer, Pooling(encoder.hidden_size, pooling_mode=ST_POOLING[pooling])]
        if normalize:
            modules.append(Normalize())
        st = SentenceTransformer(modules=modules, device="cpu")
        st.save(str(target))


# --- sentence-transformers losses on the fused InfoNCE kernel ---------------------------------
#
# The classes subclass sentence-transformers' own losses, so they take the same arguments, have
# the same config and model card entries, and pass every `isinstance` check; only the loss math
# changes: `bidirlm.kernels.infonce_loss`, which never allocates the [B, M] score matrix. They
# are built on first access (module `__getattr__`): importing sentence-transformers takes
# seconds, and this module is also imported for `export_sentence_transformers`.

LOSS_CLASSES = (
    "FusedMultipleNegativesRankingLoss",
    "FusedCachedMultipleNegativesRankingLoss",
    "FusedMultipleNegativesSymmetricRankingLoss",
    "InfoNCELoss",  # = FusedMultipleNegativesRankingLoss
)
_loss_classes: dict[str, type] = {}


def fused_settings(loss) -> dict | None:  # noqa: ANN001
    """`infonce_loss` keyword arguments equivalent to a sentence-transformers MNRL-family loss's
    settings, or None when the kernel does not cover them (other similarity functions, the
    query_to_query / doc_to_doc directions, a joint softmax over two directions, hardness
    weighting): those run sentence-transformers' own computation, unchanged."""
    from sentence_transformers import util

    symmetric_class = _st_losses()[2]
    if loss.similarity_fct is util.cos_sim:
        normalize = True
    elif loss.similarity_fct is util.dot_score:
        normalize = False
    else:
        return None
    # Older sentence-transformers releases have no directions / partition / hardness settings:
    # their MNRL is the default direction, their symmetric loss the per-direction pair.
    if getattr(loss, "hardness_mode", None) is not None and getattr(loss, "hardness_strength", 0):
        return None
    directions = getattr(loss, "directions", None)
    if directions is None:
        symmetric = isinstance(loss, symmetric_class)
        directions = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
    directions = set(directions)
    partition = getattr(loss, "partition_mode", "per_direction")
    if directions == {"query_to_doc"}:
        symmetric = False
    elif directions == {"query_to_doc", "doc_to_query"} and partition == "per_direction":
        symmetric = True
    else:
        return None
    return {
        "temperature": 1.0 / float(loss.scale),
        "symmetric": symmetric,
        "normalize": normalize,
        "gather_across_devices": bool(loss.gather_across_devices),
    }


def _fused_loss(embeddings: list[torch.Tensor], settings: dict) -> torch.Tensor:
    """Anchors `embeddings[0]` against the positives `embeddings[1]` and every hard negative
    column after it (all rows of every column are negatives of every other anchor)."""
    if len(embeddings) < 2:
        raise ValueError(f"expected at least 2 embedding columns, got {len(embeddings)}")
    queries = embeddings[0]
    docs = torch.cat(embeddings[1:], dim=0) if len(embeddings) > 2 else embeddings[1]
    return kernels.infonce_loss(queries, docs, **settings)  # looked up per call (patchable)


def _st_losses() -> tuple[type, type, type]:
    """sentence-transformers' (MNRL, CachedMNRL, symmetric MNRL), in its current or older layout."""
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # older layout
        from sentence_transformers import losses
    return (
        losses.MultipleNegativesRankingLoss,
        losses.CachedMultipleNegativesRankingLoss,
        losses.MultipleNegativesSymmetricRankingLoss,
    )


def _build_loss_classes() -> dict[str, type]:
    if _loss_classes:
        return _loss_classes
    (
        MultipleNegativesRankingLoss,
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesSymmetricRankingLoss,
    ) = _st_losses()

    class _FusedMixin:
        def forward(self, sentence_features, labels):  # noqa: ANN001, ANN202
            if hasattr(super(), "compute_loss_from_embeddings") or fused_settings(self) is None:
                return super().forward(sentence_features, labels)
            # older releases compute the symmetric loss inside forward: embed, then ours
            embeddings = [self.model(f)["sentence_embedding"] for f in sentence_features]
            return self.compute_loss_from_embeddings(embeddings, labels)

        def compute_loss_from_embeddings(
            self, embeddings: list[torch.Tensor], labels: torch.Tensor
        ) -> torch.Tensor:
            settings = fused_settings(self)
            if settings is None:
                return super().compute_loss_from_embeddings(embeddings, labels)
            return _fused_loss(list(embeddings), settings)

    class FusedMultipleNegativesRankingLoss(_FusedMixin, MultipleNegativesRankingLoss):
        """sentence-transformers' `MultipleNegativesRankingLoss` (same arguments: model, scale,
        similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
        hardness_strength) computed by bidirlm's fused InfoNCE kernel: the same loss and
        gradients without the `[B, B * (1 + negatives)]` score matrix. Settings the kernel does
        not cover (see `fused_settings`) fall back to sentence-transformers' computation."""

    class FusedMultipleNegativesSymmetricRankingLoss(
        _FusedMixin, MultipleNegativesSymmetricRankingLoss
    ):
        """sentence-transformers' `MultipleNegativesSymmetricRankingLoss` (model, scale,
        similarity_fct, gather_across_devices) on the fused kernel (`symmetric=True`)."""

    class FusedCachedMultipleNegativesRankingLoss(CachedMultipleNegativesRankingLoss):
        """sentence-transformers' `CachedMultipleNegativesRankingLoss` (GradCache: same arguments,
        `mini_batch_size` and `mini_batch_num_tokens` bound the embedding passes) whose loss
        stage is the fused kernel over the whole batch at once: it never materializes a score
        matrix, so it needs no chunking over `mini_batch_size` rows."""

        def calculate_loss(
            self,
            reps: list[list[torch.Tensor]],
            labels: torch.Tensor | None = None,
            *,
            with_backward: bool = False,
        ) -> torch.Tensor:
            settings = fused_settings(self)
            if settings is None:  # (older releases take no labels; current ones ignore them)
                return super().calculate_loss(reps, with_backward=with_backward)
            loss = _fused_loss([torch.cat(r) for r in reps], settings)
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    classes = {
        "FusedMultipleNegativesRankingLoss": FusedMultipleNegativesRankingLoss,
        "FusedCachedMultipleNegativesRankingLoss": FusedCachedMultipleNegativesRankingLoss,
        "FusedMultipleNegativesSymmetricRankingLoss": FusedMultipleNegativesSymmetricRankingLoss,
    }
    for name, cls in classes.items():  # importable (and picklable) from this module
        cls.__module__ = __name__
        cls.__qualname__ = name
    classes["InfoNCELoss"] = FusedMultipleNegativesRankingLoss
    _loss_classes.update(classes)
    return _loss_classes


def __getattr__(name: str) -> type:
    if name in LOSS_CLASSES:
        return _build_loss_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
