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
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

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
    # an empty OUT may be replaced, but only if it is still empty when the export is complete
    folder = AtomicFolder(out, force=force, replace_empty=True, inputs=inputs)
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
    "FusedCachedMultipleNegativesSymmetricRankingLoss",
    "FusedGISTEmbedLoss",
    "FusedCachedGISTEmbedLoss",
    "InfoNCELoss",  # = FusedMultipleNegativesRankingLoss
)
_loss_classes: dict[str, type] = {}


def fused_settings(loss) -> dict | None:  # noqa: ANN001
    """`infonce_loss` keyword arguments equivalent to a sentence-transformers MNRL-family loss's
    settings, or None when the kernel does not cover them (other similarity functions, a joint
    softmax over exactly the two directions query_to_doc + doc_to_query, hardness weighting):
    those run sentence-transformers' own computation, unchanged.

    Every `directions` setting sentence-transformers accepts maps onto the kernel otherwise:
    ("query_to_doc",) -> the default; + "doc_to_query" with partition_mode "per_direction" ->
    `symmetric=True`; any set with "query_to_query" / "doc_to_doc" (partition_mode "joint", the
    only one sentence-transformers allows with them) -> the kernel's joint softmax with
    `query_to_query` / `doc_to_doc` (and `symmetric` for "doc_to_query")."""
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
    if "query_to_doc" not in directions:
        return None
    extra = {}
    query_to_query, doc_to_doc = "query_to_query" in directions, "doc_to_doc" in directions
    symmetric = "doc_to_query" in directions
    if query_to_query or doc_to_doc:
        if partition != "joint":
            return None
        extra = {"query_to_query": query_to_query, "doc_to_doc": doc_to_doc}
    elif symmetric and partition != "per_direction":
        return None  # one softmax over both directions: not a kernel mode
    return {
        "temperature": 1.0 / float(loss.scale),
        "symmetric": symmetric,
        "normalize": normalize,
        "gather_across_devices": bool(loss.gather_across_devices),
        **extra,
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
    losses = _st_loss_module()
    return (
        losses.MultipleNegativesRankingLoss,
        losses.CachedMultipleNegativesRankingLoss,
        losses.MultipleNegativesSymmetricRankingLoss,
    )


def _st_loss_module():  # noqa: ANN202
    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # older layout
        from sentence_transformers import losses
    return losses


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

    class _FusedCachedMixin:
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

    class FusedCachedMultipleNegativesRankingLoss(
        _FusedCachedMixin, CachedMultipleNegativesRankingLoss
    ):
        """sentence-transformers' `CachedMultipleNegativesRankingLoss` (GradCache: same arguments,
        `mini_batch_size` and `mini_batch_num_tokens` bound the embedding passes) whose loss
        stage is the fused kernel over the whole batch at once: it never materializes a score
        matrix, so it needs no chunking over `mini_batch_size` rows."""

    more: dict[str, type] = {}
    losses = _st_loss_module()
    cached_symmetric = getattr(losses, "CachedMultipleNegativesSymmetricRankingLoss", None)
    if cached_symmetric is not None:
        # sentence-transformers deprecates the class (it warns when subclassed too); using ours
        # warns as theirs does, but defining it on the first import of any loss class should not
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)

            class FusedCachedMultipleNegativesSymmetricRankingLoss(
                _FusedCachedMixin, cached_symmetric
            ):
                """sentence-transformers' `CachedMultipleNegativesSymmetricRankingLoss`
                (GradCache, same arguments) whose loss stage is the fused kernel with
                `symmetric=True`."""

        more["FusedCachedMultipleNegativesSymmetricRankingLoss"] = (
            FusedCachedMultipleNegativesSymmetricRankingLoss
        )
    more.update(_build_gist_classes(losses))

    classes = {
        "FusedMultipleNegativesRankingLoss": FusedMultipleNegativesRankingLoss,
        "FusedCachedMultipleNegativesRankingLoss": FusedCachedMultipleNegativesRankingLoss,
        "FusedMultipleNegativesSymmetricRankingLoss": FusedMultipleNegativesSymmetricRankingLoss,
        **more,
    }
    for name, cls in classes.items():  # importable (and picklable) from this module
        cls.__module__ = __name__
        cls.__qualname__ = name
    classes["InfoNCELoss"] = FusedMultipleNegativesRankingLoss
    _loss_classes.update(classes)
    return _loss_classes


# --- GIST: the guide model's scores mask false negatives -----------------------------------------
#
# GISTEmbedLoss's score row of anchor i is one joint softmax over cos(a_i, p_j) and cos(a_i, n_j)
# (query_to_doc over [positives; negatives]), cos(a_i, a_j), j != i (query_to_query) and
# cos(p_i, p_j), j != i (positives only), over the temperature, where every entry whose *guide*
# similarity exceeds the guide's anchor-positive similarity (minus the margin) is dropped. The
# InfoNCE kernel has no mask input, so the anchors without a dropped entry run its directions
# (query_to_doc, query_to_query, and positives against positives with their own column excluded)
# and the anchors with one run an exact float32 torch row, `logsumexp(scores - positive)` as
# cross-entropy computes it, row-chunked with activation checkpointing (no [B, M] autograd graph).
# The guide similarities themselves are [B, M] without gradients, as in sentence-transformers.


def _cos_no_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fa = torch.nn.functional.normalize(a.float(), dim=-1)
        return fa @ torch.nn.functional.normalize(b.float(), dim=-1).T


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _gist_rows(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    docs: torch.Tensor,
    all_anchors: torch.Tensor | None,
    all_positives: torch.Tensor | None,
    hidden: torch.Tensor,
    positive_col: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-anchor GIST loss of a chunk of anchors: `hidden` marks the dropped entries of the
    concatenated [docs | anchors | positives] score row; `positive_col` the positive's column.
    Scores are divided by the temperature, as sentence-transformers does (multiplying by its
    inverse measured a 1.5x larger float32 gradient error at temperature 0.01)."""
    unit = _unit(anchors)
    parts = [unit @ _unit(docs).T]
    if all_anchors is not None:
        parts.append(unit @ _unit(all_anchors).T)
    if all_positives is not None:
        parts.append(_unit(positives) @ _unit(all_positives).T)
    scores = torch.cat(parts, dim=1) / temperature
    positive = scores.gather(1, positive_col[:, None])
    return torch.logsumexp((scores - positive).masked_fill(hidden, float("-inf")), dim=1)


def gist_loss(
    anchor: torch.Tensor,
    candidates: list[torch.Tensor],
    anchor_guide: torch.Tensor,
    candidates_guide: list[torch.Tensor],
    *,
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    offset: int = 0,
) -> torch.Tensor:
    """sentence-transformers' GISTEmbedLoss from embeddings: `anchor [B, d]`, `candidates` =
    [positives, negatives...] (each `[W * B, d]` when gathered, this rank's rows from `offset`),
    and the guide model's embeddings of the same rows. Returns the float32 mean loss."""
    from bidirlm.kernels.infonce import _direction

    if margin_strategy not in ("absolute", "relative"):
        raise ValueError(
            f"margin_strategy must be 'absolute' or 'relative', got {margin_strategy!r}"
        )
    batch = anchor.shape[0]
    scale = 1.0 / float(temperature)
    rows = torch.arange(batch, device=anchor.device)
    docs = torch.cat(candidates) if len(candidates) > 1 else candidates[0]
    docs_guide = torch.cat(candidates_guide) if len(candidates_guide) > 1 else candidates_guide[0]
    positives, positives_guide = candidates[0], candidates_guide[0]
    local = slice(offset, offset + batch)
    with torch.no_grad():
        guide_ad = _cos_no_grad(anchor_guide, docs_guide)
        threshold = guide_ad[rows, offset + rows][:, None]
        if margin_strategy == "absolute":
            threshold = threshold - margin
        else:
            threshold = threshold - threshold.abs() * margin
        dropped = [guide_ad > threshold]
        dropped[0][rows, offset + rows] = False  # never the positive
        structural = [torch.zeros_like(dropped[0])]  # the kernel's own exclusions
        use_aa = contrast_anchors and batch > 1
        use_pp = contrast_positives and positives.shape[0] > 1
        if use_aa:
            dropped.append(_cos_no_grad(anchor_guide, anchor_guide) > threshold)
            dropped[-1][rows, rows] = False
            structural.append(torch.zeros_like(dropped[-1]))
            structural[-1][rows, rows] = True
        if use_pp:
            dropped.append(_cos_no_grad(positives_guide[local], positives_guide) > threshold)
            dropped[-1][rows, offset + rows] = False
            structural.append(torch.zeros_like(dropped[-1]))
            structural[-1][rows, offset + rows] = True
        dropped, structural = torch.cat(dropped, dim=1), torch.cat(structural, dim=1)
        exact = dropped.any(dim=1)
    per_anchor = None
    if not bool(exact.all()):  # the fused directions, for the anchors without a dropped entry
        lse, pos = _direction(anchor, docs, offset, scale, True)
        parts = [lse]
        if use_aa:
            parts.append(_direction(anchor, anchor, batch, scale, True, (0, batch, batch))[0])
        if use_pp:
            excl = (offset, offset + batch, batch)
            parts.append(
                _direction(positives[local], positives, positives.shape[0], scale, True, excl)[0]
            )
        per_anchor = (torch.logsumexp(torch.stack(parts), dim=0) if len(parts) > 1 else lse) - pos
    if bool(exact.any()):
        idx = exact.nonzero()[:, 0]
        hidden = dropped[idx] | structural[idx]
        positive_col = offset + idx
        width = hidden.shape[1]
        step = max(1, (1 << 20) // max(width, 1))
        grad = torch.is_grad_enabled() and (anchor.requires_grad or docs.requires_grad)
        values = []
        for start in range(0, idx.shape[0], step):
            sub = idx[start : start + step]
            args = (
                anchor[sub], positives[offset + sub], docs, anchor if use_aa else None,
                positives if use_pp else None, hidden[start : start + step],
                positive_col[start : start + step], float(temperature),
            )  # fmt: skip
            values.append(
                checkpoint(_gist_rows, *args, use_reentrant=False) if grad else _gist_rows(*args)
            )
        exact_values = torch.cat(values)
        if per_anchor is None:
            per_anchor = torch.zeros(batch, dtype=torch.float32, device=anchor.device)
        per_anchor = per_anchor.index_put((idx,), exact_values)
    return per_anchor.mean()


def _retokenized(loss, feature: dict, batch_to_device) -> dict:  # noqa: ANN001
    """The guide's features for one column whose token ids come from the trained model's
    tokenizer: decode them (padded batch or packed `cu_seq_lens_q` layout) and tokenize again."""
    ids = feature["input_ids"]
    if "cu_seq_lens_q" in feature:
        flat, bounds = ids[0].tolist(), feature["cu_seq_lens_q"].tolist()
        ids = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    texts = loss.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return batch_to_device(loss.guide.preprocess(texts), loss.guide.device)


def _gist_options(loss) -> dict:  # noqa: ANN001
    return {
        "temperature": loss.temperature,
        "margin_strategy": loss.margin_strategy,
        "margin": loss.margin,
        "contrast_anchors": loss.contrast_anchors,
        "contrast_positives": loss.contrast_positives,
    }


def _build_gist_classes(losses) -> dict[str, type]:  # noqa: ANN001
    gist, cached_gist = (getattr(losses, n, None) for n in ("GISTEmbedLoss", "CachedGISTEmbedLoss"))
    classes: dict[str, type] = {}
    if gist is not None:

        class FusedGISTEmbedLoss(gist):
            """sentence-transformers' `GISTEmbedLoss` (model, guide, temperature,
            margin_strategy, margin, contrast_anchors, contrast_positives,
            gather_across_devices) whose scores never form a `[B, M]` autograd graph: the guide
            model's similarities become a mask of false negatives around bidirlm's fused
            InfoNCE directions (see `gist_loss`). Distributed gathering and embedding use
            sentence-transformers' own helpers."""

            def forward(self, sentence_features, labels):  # noqa: ANN001, ANN201
                st = sys.modules[gist.__module__]
                features = list(sentence_features)
                guide_features = [dict(f) for f in features]
                embeddings = st.embed_columns(self.model, features)
                with torch.no_grad():
                    if self.must_retokenize:
                        guide_features = [
                            _retokenized(self, f, st.batch_to_device) for f in features
                        ]
                    guide_embeddings = st.embed_columns(self.guide, guide_features)
                if len(embeddings) not in (2, 3):
                    raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
                anchor, *candidates = embeddings
                anchor_guide, *candidates_guide = guide_embeddings
                offset = 0
                if self.gather_across_devices:
                    candidates = [st.all_gather_with_grad(c) for c in candidates]
                    candidates_guide = [st.all_gather_with_grad(c) for c in candidates_guide]
                    offset = st.get_rank() * anchor.shape[0]
                return gist_loss(
                    anchor, candidates, anchor_guide, candidates_guide, offset=offset,
                    **_gist_options(self),
                )  # fmt: skip

        classes["FusedGISTEmbedLoss"] = FusedGISTEmbedLoss
    if cached_gist is not None:

        class FusedCachedGISTEmbedLoss(cached_gist):
            """sentence-transformers' `CachedGISTEmbedLoss` (GradCache, same arguments) whose
            loss stage is `gist_loss` over the whole batch at once (the fused directions need
            no chunking over `mini_batch_size` rows)."""

            def calculate_loss(self, reps, reps_guided, *, with_backward=False):  # noqa: ANN001, ANN201
                st = sys.modules[cached_gist.__module__]
                if len(reps) != len(reps_guided):
                    raise ValueError("reps and reps_guided must have the same length")
                anchor, anchor_guide = torch.cat(reps[0]), torch.cat(reps_guided[0])
                candidates = [torch.cat(r) for r in reps[1:]]
                candidates_guide = [torch.cat(r) for r in reps_guided[1:]]
                offset = 0
                if self.gather_across_devices:
                    candidates = [st.all_gather_with_grad(c) for c in candidates]
                    candidates_guide = [st.all_gather_with_grad(c) for c in candidates_guide]
                    offset = st.get_rank() * anchor.shape[0]
                loss = gist_loss(
                    anchor, candidates, anchor_guide, candidates_guide, offset=offset,
                    **_gist_options(self),
                )  # fmt: skip
                if with_backward:
                    loss.backward()
                    loss = loss.detach()
                return loss

        classes["FusedCachedGISTEmbedLoss"] = FusedCachedGISTEmbedLoss
    return classes


def __getattr__(name: str) -> type:
    if name in LOSS_CLASSES:
        return _build_loss_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
