"""Fine-tuning heads on an `Encoder`: sequence classification / regression and token tagging.

A head (`ClassificationHead`) maps the encoder's final hidden states to logits. It is registered
on the encoder itself as `encoder.head`, so moving, saving and loading the encoder carry it:

- `SequenceClassifier(encoder, num_labels, pooling=..., problem_type=...)` and
  `TokenClassifier(encoder, num_labels)` attach a fresh head and run encoder + head in one
  forward (`ClassifierOutput(logits, loss)`);
- `Encoder.save_pretrained(path)` then writes a Hugging Face `*ForSequenceClassification` /
  `*ForTokenClassification` folder (the head's tensors `score.*` beside the `model.*` ones,
  `id2label`, `label2id`, `problem_type` and our `bidirlm_head` record in config.json);
- `load_model(path)` reads such a folder back with `encoder.head` set (None for a plain model),
  and `as_classifier(encoder)` wraps it again as a `SequenceClassifier` / `TokenClassifier`.

Sequence pooling: `mean`, `first`, `last` (pool the hidden states, then one linear `score`
without bias, the layout of transformers' `GenericForSequenceClassification`), or `late`: the
released BidirLM classifiers' late interaction, `score(gelu(dense(h_t)))` on every token, then
the mean of the token logits over the sequence. transformers always scores the *last* non-pad
token, so only `last` pooling gives the same logits there; a `mean` / `first` / `late` folder still
loads in transformers, which then computes `score` at the last token (and ignores `dense`).

Problem types: `single_label` (cross-entropy over int labels, -100 ignored), `multi_label`
(binary cross-entropy with logits over multi-hot float labels) and `regression` (mean squared
error over float targets `[N]` or `[N, num_labels]`). Token heads are single-label per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from bidirlm.runtime.models import checkpoint as ckpt
from bidirlm.runtime.models.encoder import Encoder
from bidirlm.runtime.models.pooling import pool

SEQUENCE_POOLINGS = ("mean", "first", "last", "late")
PROBLEM_TYPES = ("single_label", "multi_label", "regression")
KINDS = ("sequence", "token")
# Our problem types <-> transformers' `config.problem_type`.
HF_PROBLEM_TYPES = {
    "single_label": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}
_HEAD_TENSORS = ("score.weight", "score.bias", "dense.weight", "dense.bias")


@dataclass
class ClassifierOutput:
    """`logits` and, when labels were given, the float32 `loss`."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class ClassificationHead(nn.Module):
    """Hidden states -> logits, for a `sequence` or `token` task.

    `labels` names the classes (`id2label`; default `LABEL_i`); `class_weights` (optional, one per
    label) weights the cross-entropy (single-label, token) or is the positive weight of the binary
    cross-entropy (multi-label). Parameters: `score` (Linear, bias only for token heads, as in
    transformers) and, for `late` pooling, `dense` (Linear d -> d, then GELU).
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        *,
        kind: str = "sequence",
        pooling: str = "mean",
        problem_type: str = "single_label",
        dropout: float = 0.0,
        labels: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not valid; choose one of {', '.join(KINDS)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"problem_type={problem_type!r} is not valid; choose one of "
                f"{', '.join(PROBLEM_TYPES)}"
            )
        if kind == "sequence" and pooling not in SEQUENCE_POOLINGS:
            raise ValueError(
                f"pooling={pooling!r} is not valid; choose one of {', '.join(SEQUENCE_POOLINGS)}"
            )
        if kind == "token" and problem_type != "single_label":
            raise ValueError(f"problem_type={problem_type!r}: token heads are single_label")
        if problem_type == "single_label" and kind == "sequence" and num_labels < 2:
            raise ValueError("num_labels must be >= 2 for single_label classification")
        names = [f"LABEL_{i}" for i in range(num_labels)] if labels is None else list(labels)
        if len(names) != num_labels or len(set(names)) != num_labels:
            raise ValueError(f"labels: expected {num_labels} distinct names, got {names}")
        self.kind = kind
        self.num_labels = num_labels
        self.pooling = pooling if kind == "sequence" else "none"
        self.problem_type = problem_type
        self.labels = names
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout)
        kw = {"device": device, "dtype": dtype}
        self.dense = nn.Linear(hidden_size, hidden_size, **kw) if pooling == "late" else None
        self.score = nn.Linear(hidden_size, num_labels, bias=kind == "token", **kw)
        for layer in (self.dense, self.score):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, pooling={self.pooling}, problem_type={self.problem_type}"

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token heads: `[T, C]` / `[B, S, C]`; sequence heads: `[N, C]` (one row per sequence).

        `hidden` is packed `[T, d]` with `cu_seqlens [N+1]`, or padded `[B, S, d]` with an optional
        `attention_mask [B, S]`, as `Encoder.forward` returns it.
        """
        if self.kind == "token":
            return self.score(self.dropout(hidden))
        if self.dense is not None:  # late interaction: score every token, average the logits
            token_logits = self.score(F.gelu(self.dense(self.dropout(hidden))))
            return pool(
                token_logits, pooling="mean", cu_seqlens=cu_seqlens, attention_mask=attention_mask
            )
        pooled = pool(
            hidden, pooling=self.pooling, cu_seqlens=cu_seqlens, attention_mask=attention_mask
        )
        return self.score(self.dropout(pooled))

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The float32 training loss of `logits` against `labels` (see the module docstring)."""
        logits = logits.float()
        weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
        if self.kind == "token" or self.problem_type == "single_label":
            flat = logits.reshape(-1, self.num_labels)
            target = labels.reshape(-1).long()
            if target.shape[0] != flat.shape[0]:
                raise ValueError(
                    f"labels: {tuple(labels.shape)} does not match logits {tuple(logits.shape)}"
                )
            return F.cross_entropy(flat, target, weight=weight, ignore_index=-100)
        if self.problem_type == "multi_label":
            if tuple(labels.shape) != tuple(logits.shape):
                raise ValueError(
                    f"labels: multi-hot {tuple(labels.shape)} != logits {tuple(logits.shape)}"
                )
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weight)
        target = labels.float().reshape(logits.shape[0], -1)
        if target.shape[1] != self.num_labels:
            raise ValueError(
                f"labels: regression targets {tuple(labels.shape)} != logits {tuple(logits.shape)}"
            )
        return F.mse_loss(logits, target)

    # --- Hugging Face layout ---------------------------------------------------------------

    def hf_fields(self, arch_name: str) -> dict[str, Any]:
        """config.json entries for a saved classifier of architecture `arch_name` (qwen3/gemma3)."""
        if self.kind == "sequence":
            cls = "Qwen3ForSequenceClassification"
            if arch_name == "gemma3":
                cls = "Gemma3TextForSequenceClassification"
        else:
            # transformers 5.x has no Gemma3 token classification class: a Gemma3 token model
            # is read back by `load_model` only (its architecture name is ours).
            cls = "Qwen3ForTokenClassification"
            if arch_name == "gemma3":
                cls = "Gemma3TextForTokenClassification"
        out: dict[str, Any] = {
            "architectures": [cls],
            "id2label": {str(i): name for i, name in enumerate(self.labels)},
            "label2id": {name: i for i, name in enumerate(self.labels)},
            "classifier_dropout": self.dropout_p,
            "bidirlm_head": {
                "kind": self.kind,
                "pooling": self.pooling,
                "problem_type": self.problem_type,
                "dropout": self.dropout_p,
            },
        }
        if self.kind == "sequence":
            out["problem_type"] = HF_PROBLEM_TYPES[self.problem_type]
        return out


def head_kind(hf: dict[str, Any]) -> str | None:
    """`sequence`, `token` or None (not a classifier), from a config.json dict."""
    record = hf.get("bidirlm_head")
    if isinstance(record, dict) and record.get("kind") in KINDS:
        return record["kind"]
    for arch in hf.get("architectures") or []:
        if str(arch).endswith("ForSequenceClassification"):
            return "sequence"
        if str(arch).endswith("ForTokenClassification"):
            return "token"
    return None


def load_head(
    folder: str | Path,
    hf: dict[str, Any],
    hidden_size: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> ClassificationHead | None:
    """The head saved in a classifier folder (None when config.json describes no classifier).

    Reads `score.*` (and `dense.*`) from the folder's safetensors. A folder written by
    transformers (no `bidirlm_head` record) is a `last`-pooling head, as transformers computes it.
    """
    kind = head_kind(hf)
    if kind is None:
        return None
    folder = Path(folder)
    files = ckpt.weight_files(folder)
    if "score.weight" not in files:
        raise ckpt.CheckpointError(
            f"{folder}: config.json describes a {kind} classifier but score.weight is missing"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in _HEAD_TENSORS:
        if name in files:
            with safe_open(str(files[name]), framework="pt") as fh:
                tensors[name] = fh.get_tensor(name)
    record = hf.get("bidirlm_head") if isinstance(hf.get("bidirlm_head"), dict) else {}
    num_labels = int(tensors["score.weight"].shape[0])
    if tuple(tensors["score.weight"].shape) != (num_labels, hidden_size):
        raise ckpt.CheckpointError(
            f"{folder}: score.weight has shape {tuple(tensors['score.weight'].shape)}, "
            f"expected [num_labels, {hidden_size}]"
        )
    id2label = hf.get("id2label") or {}
    labels = None
    if len(id2label) == num_labels:
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    problem = record.get("problem_type")
    if problem is None:
        reverse = {v: k for k, v in HF_PROBLEM_TYPES.items()}
        problem = reverse.get(hf.get("problem_type"), "single_label")
        if problem == "single_label" and kind == "sequence" and num_labels == 1:
            problem = "regression"  # transformers' convention for num_labels == 1
    pooling = record.get("pooling", "last") if kind == "sequence" else "mean"
    if kind == "sequence" and pooling == "late" and "dense.weight" not in tensors:
        raise ckpt.CheckpointError(f"{folder}: late pooling needs dense.weight, which is missing")
    head = ClassificationHead(
        hidden_size,
        num_labels,
        kind=kind,
        pooling=pooling,
        problem_type=problem if kind == "sequence" else "single_label",
        dropout=float(record.get("dropout", 0.0)),
        labels=labels,
        device="meta",
        dtype=dtype,
    )
    expected = head.state_dict()
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ckpt.CheckpointError(f"{folder}: missing head tensor(s) {', '.join(missing)}")
    state = {n: tensors[n].to(device=device, dtype=dtype) for n in expected}
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ckpt.CheckpointError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name].shape)}"
            )
    head.load_state_dict(state, assign=True)
    return head


# --------------------------------------------------------------------------------------------
# encoder + head in one module
# --------------------------------------------------------------------------------------------


class _Classifier(nn.Module):
    """`encoder` (with `encoder.head` set) run end to end: input ids -> `ClassifierOutput`."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        if getattr(encoder, "head", None) is None:
            raise ValueError("encoder has no head: build a SequenceClassifier/TokenClassifier")
        self.encoder = encoder

    @property
    def head(self) -> ClassificationHead:
        return self.encoder.head

    @property
    def score(self) -> nn.Linear:
        return self.encoder.head.score

    @property
    def dropout(self) -> nn.Dropout:
        return self.encoder.head.dropout

    @property
    def num_labels(self) -> int:
        return self.encoder.head.num_labels

    @property
    def labels(self) -> list[str]:
        return self.encoder.head.labels

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """Padded `[B, S]` or packed `[T]` input (as `Encoder.forward`) -> logits (+ loss).

        Sequence heads give `[N, C]`; token heads `[B, S, C]` / `[T, C]`, where padding positions
        (attention_mask 0) are ignored by the loss like label -100.
        """
        hidden = self.encoder(
            input_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            position_ids=position_ids,
        )
        head = self.encoder.head
        logits = head(hidden, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        loss = None
        if labels is not None:
            if head.kind == "sequence" and labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"labels: expected {logits.shape[0]} rows (one per sequence), got "
                    f"{tuple(labels.shape)}"
                )
            if head.kind == "token":
                if tuple(labels.shape) != tuple(logits.shape[:-1]):
                    raise ValueError(
                        f"labels: shape {tuple(labels.shape)} != token shape "
                        f"{tuple(logits.shape[:-1])}"
                    )
                if attention_mask is not None:
                    labels = labels.long().masked_fill(attention_mask == 0, -100)
            loss = head.loss(logits, labels, class_weights)
        return ClassifierOutput(logits=logits, loss=loss)


class SequenceClassifier(_Classifier):
    """`encoder` -> pooled vector -> dropout -> linear: logits `[N, num_labels]`.

    Attaches a new `ClassificationHead` to `encoder.head` (replacing any). `num_labels == 1`
    defaults to regression (MSE against float labels `[N]`).
    """

    def __init__(
        self,
        encoder: Encoder,
        num_labels: int,
        pooling: str = "mean",
        dropout: float = 0.0,
        *,
        problem_type: str | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if problem_type is None:
            problem_type = "regression" if num_labels == 1 else "single_label"
        encoder.head = ClassificationHead(
            encoder.hidden_size,
            num_labels,
            kind="sequence",
            pooling=pooling,
            problem_type=problem_type,
            dropout=dropout,
            labels=labels,
            device=encoder.device,
            dtype=encoder.dtype,
        )
        super().__init__(encoder)


class TokenClassifier(_Classifier):
    """`encoder` -> dropout -> linear per token: logits `[B, S, C]` (padded) or `[T, C]` (packed).

    Loss: cross-entropy over tokens whose label is not `-100` (padding positions are ignored too).
    """

    def __init__(
        self,
        encoder: Encoder,
        num_labels: int,
        dropout: float = 0.0,
        *,
        labels: Sequence[str] | None = None,
    ) -> None:
        encoder.head = ClassificationHead(
            encoder.hidden_size,
            num_labels,
            kind="token",
            dropout=dropout,
            labels=labels,
            device=encoder.device,
            dtype=encoder.dtype,
        )
        super().__init__(encoder)


def as_classifier(encoder: Encoder) -> SequenceClassifier | TokenClassifier:
    """Wrap an encoder that already carries a head (e.g. from `load_model`) without replacing it."""
    head = getattr(encoder, "head", None)
    if head is None:
        raise ValueError(
            "this model has no classification head (not a fine-tuned classifier folder)"
        )
    cls = SequenceClassifier if head.kind == "sequence" else TokenClassifier
    out = cls.__new__(cls)
    _Classifier.__init__(out, encoder)
    return out
