"""`Encoder`: a Qwen3 or Gemma3 text model run bidirectionally (or causally).

`load_model` (in `loading.py`) reads a checkpoint folder into one.

Inputs are padded (`input_ids [B, S]`, `attention_mask [B, S]`) or packed (`input_ids [T]` with
int32 `cu_seqlens [N+1]`, positions restarting at 0 in each sequence). Every layer works on the
flattened tokens `[N, d]`; attention runs `bidirlm.kernels.flash_attn_func` (padded) or
`flash_attn_varlen_func` (packed), which pick Triton or the torch reference per BIDIRLM_KERNELS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bidirlm.runtime.models import checkpoint as ckpt
from bidirlm.runtime.models.common import ArchSpec, AttentionLayout, rope_cos_sin
from bidirlm.runtime.models.config import ModelConfig
from bidirlm.runtime.models.pooling import packed_positions, pool


class Encoder(nn.Module):
    """A decoder LLM used as an encoder: token ids -> final-norm hidden states.

    Attributes: `config` (our `ModelConfig`), `hf_config` (the config.json dict it came from),
    `tokenizer` (a transformers tokenizer or None), `bidirectional` (settable; False runs the
    stock causal model), `gradient_checkpointing` (recompute each block in backward when training).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        bidirectional: bool = True,
        hf_config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        lm_head: bool = True,
    ) -> None:
        super().__init__()
        self.spec: ArchSpec = ckpt.ARCHS[config.arch]
        self.config = config
        self.hf_config = dict(hf_config or {"model_type": self.spec.model_types[0]})
        self.tokenizer = tokenizer
        self.bidirectional = bool(bidirectional)
        self.gradient_checkpointing = False
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(self.spec.block(config) for _ in range(config.num_layers))
        self.norm = self.spec.norm(d, eps=config.rms_norm_eps)
        untied = lm_head and not config.tie_word_embeddings
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False) if untied else None
        self._has_head = lm_head
        # A fine-tuning head (`bidirlm.runtime.models.heads.ClassificationHead`) or None; saved
        # with the encoder as a *ForSequenceClassification / *ForTokenClassification folder.
        self.head: nn.Module | None = None
        self._rope_scaling: dict[str, float] = {}
        self.reset_rope()

    # --- properties the training runtime uses -------------------------------------------------

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output embedding `[V, d]` (the input embedding when tied)."""
        if not self._has_head:
            raise RuntimeError(
                "this checkpoint has no LM head (an untied *Model checkpoint without "
                "lm_head.weight): MNTP needs a *ForCausalLM checkpoint"
            )
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma3's `final_logit_softcapping` for the LM head logits (None when unset)."""
        return self.config.final_logit_softcap

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE inverse-frequency buffers (float32), one per layer type."""
        for layer_type in sorted(set(self.config.layer_types)):
            inv, scaling = self.config.rope[layer_type].inv_freq(self.config.head_dim)
            self.register_buffer(f"inv_freq_{layer_type}", inv.to(device), persistent=False)
            self._rope_scaling[layer_type] = scaling

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Encoder:
        # `.to(dtype)` would round the RoPE frequencies too: recompute them in float32 after any
        # conversion or move (bf16 frequencies shift the angle at position 4096 by up to 4.7 rad)
        super()._apply(fn, recurse)
        self.reset_rope(self.embed.weight.device)
        return self

    # --- forward --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states: `[B, S, d]` (padded) or `[T, d]` (packed).

        Padded: `input_ids [B, S]`, `attention_mask [B, S]` (1 = real token, None = no padding),
        positions default to `0..S-1` in every row as in transformers (use right padding, or pass
        `position_ids`); values at padding positions are unspecified. Packed: `input_ids [T]`,
        int32 `cu_seqlens [N+1]`, `max_seqlen` (computed with a host sync when None); positions
        restart at 0 in each sequence.
        """
        input_ids, position_ids, layout, out_shape = self._prepare(
            input_ids, attention_mask, cu_seqlens, max_seqlen, position_ids
        )
        x = self.embed(input_ids)
        if self.spec.scale_embeddings:
            # Gemma multiplies by sqrt(d) rounded to the weight dtype, as transformers does
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype, device=x.device)
        rope = {
            t: rope_cos_sin(position_ids, getattr(self, f"inv_freq_{t}"), self._rope_scaling[t])
            for t in self._rope_scaling
        }
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            window = self.config.window_for(layer_type, bidirectional=self.bidirectional)
            cos, sin = rope[layer_type]
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, layout, window, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, window)
        return self.norm(x).view(out_shape)

    def _prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionLayout, tuple[int, ...]]:
        """Validate inputs -> (flat ids [N], positions [N], attention layout, output shape)."""
        d = self.config.hidden_size
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError(
                    "attention_mask: pass attention_mask (padded) or cu_seqlens, not both"
                )
            if input_ids.dim() != 1:
                raise ValueError(
                    f"input_ids: packed input (cu_seqlens given) must be [T], "
                    f"got {tuple(input_ids.shape)}"
                )
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError(f"cu_seqlens: expected [N+1], got {tuple(cu_seqlens.shape)}")
            if cu_seqlens.dtype != torch.int32:
                raise ValueError(f"cu_seqlens: expected int32, got {cu_seqlens.dtype}")
            total = input_ids.shape[0]
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            if position_ids is None:
                position_ids = packed_positions(cu_seqlens, total)
            elif tuple(position_ids.shape) != (total,):
                raise ValueError(
                    f"position_ids: expected [T]={total}, got {tuple(position_ids.shape)}"
                )
            layout = AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen))
            return input_ids, position_ids, layout, (total, d)
        if input_ids.dim() != 2:
            raise ValueError(
                "input_ids: padded input must be [B, S] (or pass cu_seqlens for packed [T]), "
                f"got {tuple(input_ids.shape)}"
            )
        b, s = input_ids.shape
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, s):
                raise ValueError(
                    f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {(b, s)}"
                )
            mask = attention_mask != 0
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        elif position_ids.shape[-1] != s or position_ids.dim() > 2:
            raise ValueError(
                f"position_ids: expected [B, S] or [S], got {tuple(position_ids.shape)}"
            )
        position_ids = position_ids.expand(b, s).reshape(-1)
        layout = AttentionLayout(batch=b, seqlen=s, key_padding_mask=mask)
        return input_ids.reshape(-1), position_ids, layout, (b, s, d)

    # --- inference ------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 512,
    ) -> torch.Tensor:
        """Embed `texts` -> float32 `[N, d]` (input order), with the attached tokenizer.

        Texts are sorted by token length and packed `batch_size` at a time (`cu_seqlens`, no
        padding), then pooled (`mean`, `last` or `first`) and optionally L2-normalized. An empty
        list gives an empty float32 `[0, d]`.
        """
        if isinstance(texts, str):
            raise ValueError("texts: expected a sequence of strings, got one str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if pooling not in ("mean", "last", "first"):
            raise ValueError(f"pooling={pooling!r} is not valid; choose one of mean, last, first")
        if len(texts) == 0:  # (even without a tokenizer: nothing to tokenize)
            return torch.empty(0, self.config.hidden_size, dtype=torch.float32)
        if self.tokenizer is None:
            raise ValueError(
                "encode needs a tokenizer: the checkpoint folder had none; set .tokenizer"
            )
        ids = self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        empty = [i for i, seq in enumerate(ids) if len(seq) == 0]
        if empty:
            raise ValueError(f"texts: entries {empty[:5]} tokenize to nothing")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), self.config.hidden_size, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                lengths = [len(ids[i]) for i in chunk]
                flat = torch.tensor([t for i in chunk for t in ids[i]], device=self.device)
                cu = torch.zeros(len(chunk) + 1, dtype=torch.int32)
                cu[1:] = torch.tensor(lengths).cumsum(0)
                cu = cu.to(self.device)
                hidden = self(flat, cu_seqlens=cu, max_seqlen=max(lengths))
                vecs = pool(hidden, pooling=pooling, cu_seqlens=cu).float()
                if normalize:
                    vecs = torch.nn.functional.normalize(vecs, dim=-1)
                out[torch.tensor(chunk)] = vecs.cpu()
        finally:
            self.train(was_training)
        return out

    # --- saving ---------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> None:
        """Write a Hugging Face `*ForCausalLM` checkpoint that transformers and `load_model` read.

        config.json records the current direction (Qwen3 `is_causal: false`, Gemma3
        `use_bidirectional_attention: true` when bidirectional); weights go to safetensors (sharded
        above `max_shard_size` bytes); the tokenizer's files when one is attached. With a `head`
        (fine-tuned classifier) the folder is a `*ForSequenceClassification` /
        `*ForTokenClassification` one instead: `score.*` tensors, labels in config.json, no LM head.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        hf = self.spec.to_hf_config(self.config, self.hf_config, self.bidirectional, self.dtype)
        hf.pop("bidirlm_head", None)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("inv_freq_")}
        if self.head is not None:
            hf.update(self.head.hf_fields(self.spec.name))
            state.pop("lm_head.weight", None)
            if hf.get("pad_token_id") is None and self.tokenizer is not None:
                # transformers finds the last token of each row as the last non-pad one
                hf["pad_token_id"] = self.tokenizer.pad_token_id
        ckpt.write_state(folder, self.spec, self.config, state, max_shard_bytes=max_shard_size)
        text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
        (folder / "config.json").write_text(text, encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
