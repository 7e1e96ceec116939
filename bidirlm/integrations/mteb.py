"""MTEB adapter: run an `Encoder` on MTEB tasks (`mteb.evaluate(MTEBEncoder(path), tasks)`).

`MTEBEncoder` implements mteb's `EncoderProtocol` (mteb >= 2): `encode(DataLoader, *,
task_metadata, hf_split, hf_subset, prompt_type)` returns float32 numpy embeddings, and
`similarity` / `similarity_pairwise` are cosine, as the model is trained with. Texts are embedded
with `Encoder.encode` (length-sorted packing, pooling, optional L2 normalization).

Instructions: `prompts` maps keys to a prefix added to the texts, looked up in mteb's order of
priority: ``"<task name>-<query|document>"``, ``"<task name>"``, ``"<task type>-<query|document>"``,
``"<task type>"``, ``"query"`` / ``"document"``. Example (instruction on queries only, as the
contrastive phase trains)::

    MTEBEncoder("runs/demo/runs/mntp_contrastive/final",
                prompts={"query": "Instruct: retrieve relevant passages\\nQuery: "})

mteb is an optional dependency (``pip install mteb``); importing this module does not need it,
building the metadata does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidirlm.runtime.models import load_model


def _prompt_type_name(prompt_type: Any) -> str | None:
    """mteb's PromptType enum ("query"/"document") as a plain string."""
    if prompt_type is None:
        return None
    return str(getattr(prompt_type, "value", prompt_type))


def _media_items(kind: str, values: Iterable[Any]) -> list[Any]:
    """mteb's image (PIL) / audio ({"array", "sampling_rate"}) batch values as encode items."""
    if kind == "image":
        return list(values)
    return [{"array": a["array"], "sampling_rate": int(a["sampling_rate"])} for a in values]


class MTEBEncoder:
    """An mteb `EncoderProtocol` over a bidirlm `Encoder` (or a checkpoint folder)."""

    def __init__(
        self,
        model: Any,
        *,
        pooling: str = "mean",
        batch_size: int = 32,
        max_length: int = 512,
        normalize: bool = True,
        prompts: Mapping[str, str] | None = None,
        bidirectional: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            model = load_model(path, dtype=dtype, device=device, bidirectional=bidirectional)
            name = name or f"bidirlm/{path.resolve().name}"
        if not hasattr(model, "encode"):
            raise TypeError(
                f"model must be a bidirlm Encoder or a checkpoint folder, got {model!r}"
            )
        if pooling not in ("mean", "last", "first"):
            raise ValueError(f"pooling={pooling!r} is not one of mean, last, first")
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be >= 1")
        self.model = model
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        self.prompts = dict(prompts or {})
        self.name = name or "bidirlm/encoder"
        self.revision = revision
        self._meta = None

    # --- metadata -------------------------------------------------------------------------------

    @property
    def mteb_model_meta(self) -> Any:
        """mteb `ModelMeta` describing the wrapped model (built on first use)."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta

            params = sum(p.numel() for p in self.model.parameters())
            hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
            self._meta = ModelMeta(
                loader=None,
                name=self.name,
                revision=self.revision,
                release_date=None,
                languages=None,
                n_parameters=params,
                memory_usage_mb=None,
                max_tokens=self.max_length,
                embed_dim=hidden,
                license=None,
                open_weights=True,
                public_training_code=None,
                public_training_data=None,
                framework=["PyTorch"],
                similarity_fn_name="cosine",
                use_instructions=bool(self.prompts),
                training_datasets=None,
                modalities=["text"]
                + [
                    m
                    for m, tower in (("image", "visual"), ("audio", "audio_tower"))
                    if getattr(self.model, tower, None) is not None
                ],
            )
        return self._meta

    # --- prompts --------------------------------------------------------------------------------

    def prompt_for(self, task_name: str, task_type: str | None, prompt_type: Any) -> str:
        """The prefix for texts of this task and side (empty when no key matches)."""
        side = _prompt_type_name(prompt_type)
        keys: list[str] = []
        for base in (task_name, task_type):
            if base:
                if side:
                    keys.append(f"{base}-{side}")
                keys.append(base)
        if side:
            keys.append(side)
        return next((self.prompts[k] for k in keys if k in self.prompts), "")

    # --- EncoderProtocol ------------------------------------------------------------------------

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed every text of mteb's DataLoader batches -> float32 `[N, d]` numpy array."""
        del hf_split, hf_subset, kwargs  # one model for every split and language
        prefix = self.prompt_for(
            getattr(task_metadata, "name", ""), getattr(task_metadata, "type", None), prompt_type
        )
        texts: list[Any] = []
        omni = hasattr(self.model, "embed_items")  # an OmniEncoder also takes images and audio
        for batch in inputs:
            media = [k for k in ("image", "audio") if k in batch] if omni else []
            if len(media) == 1 and "text" not in batch:
                texts.extend(_media_items(media[0], batch[media[0]]))
                continue
            if "text" not in batch or media:
                kinds = "text, image or audio" if omni else "text only"
                raise ValueError(
                    f"MTEBEncoder embeds {kinds} (one per batch); the batch has {sorted(batch)} "
                    f"(task {getattr(task_metadata, 'name', '?')})"
                )
            # Empty strings would tokenize to special tokens only; keep them (mteb pads tasks
            # with empty texts) by encoding a single space instead.
            texts.extend(prefix + (t if t else " ") for t in batch["text"])
        if not texts:
            hidden = self.mteb_model_meta.embed_dim or 0
            return np.zeros((0, hidden), dtype=np.float32)
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            pooling=self.pooling,
            normalize=self.normalize,
            max_length=self.max_length,
        )
        return torch.as_tensor(emb).float().cpu().numpy()

    def similarity(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity matrix `[N1, N2]`."""
        a = torch.nn.functional.normalize(torch.as_tensor(embeddings1).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(embeddings2).float(), dim=-1)
        return a.reshape(-1, a.shape[-1]) @ b.reshape(-1, b.shape[-1]).T

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> torch.Tensor:
        """Cosine similarity of each pair `[N]`."""
        a = torch.nn.functional.normalize(torch.as_tensor(embeddings1).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(embeddings2).float(), dim=-1)
        return (a * b).sum(-1)
