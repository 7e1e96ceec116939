"""`OmniEncoder`: the composed BidirLM-Omni checkpoint (text + vision + audio) as one encoder.

Choice of text backbone: our own bidirectional Qwen3 (`Encoder`, the same blocks and attention
kernels as every text model here), extended with embedding inputs, interleaved MRoPE and
DeepStack injection, so the text path of an omni checkpoint is bit for bit the text encoder it
came from and training reuses one runtime. The towers are transformers' own modules, frozen by
default: `Qwen3VLVisionModel` (patch embedding, blocks, merger, DeepStack mergers) and
`Qwen3ASREncoder` + `Qwen3ASRMultiModalProjector`.

Every item becomes one sequence, packed with the others (`cu_seqlens`, no padding):

- text: the tokenizer's ids; positions 0..L-1 (the three MRoPE axes equal: plain RoPE);
- image: `<vision_start> <image_pad> x n <vision_end>`; the pads take the merged patch features
  (n = t * h * w / merge**2), with 3-D positions (t, row, column) offset by 1 as in Qwen3-VL's
  `get_rope_index`, and the DeepStack features are added to them after the first layers;
- audio: `<audio_start> <audio_pad> x n <audio_end>` (markers when the config has their ids);
  the pads take the projected audio-tower outputs; positions 0..L-1.

Pooling (mean, first, last) runs over the real tokens of each sequence, markers included.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from bidirlm.runtime.models import checkpoint as ckpt
from bidirlm.runtime.models import released_layout as rel
from bidirlm.runtime.models.common import AttentionLayout
from bidirlm.runtime.models.config import ModelConfig
from bidirlm.runtime.models.encoder import Encoder
from bidirlm.runtime.models.heads import head_kind
from bidirlm.runtime.models.media import Item, parse_item
from bidirlm.runtime.models.pooling import pool

# A fine-tuned classifier's head tensors (`heads.ClassificationHead`), at the top level of the file
HEAD_TENSORS = ("score.weight", "score.bias", "dense.weight", "dense.bias")

MODEL_TYPE = "bidirlm_omni"
TEXT_PREFIX = "model.language_model."
TOWER_PREFIXES = {
    "visual.": "model.visual.",
    "audio_tower.": "model.audio_tower.",
    "audio_projector.": "model.multi_modal_projector.",
}
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
# Qwen2-VL/Qwen3-VL's smart_resize refuses images longer than 200x their width (or height).
MAX_ASPECT_RATIO = 200
AUDIO_PROCESSOR_FILE = "audio_preprocessor_config.json"


def _require(names: Sequence[str], what: str) -> list[Any]:
    """transformers classes by name, or one ValueError naming the installed version."""
    import transformers  # optional dependency ([omni] extra): the vision/audio towers

    missing = [n for n in names if not hasattr(transformers, n)]
    if missing:
        raise ValueError(
            f"{what} needs transformers' {', '.join(missing)}, missing in the installed "
            f"transformers {transformers.__version__} (upgrade transformers)"
        )
    return [getattr(transformers, n) for n in names]


def _known_fields(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    drop = {"architectures", "transformers_version", "_name_or_path", "model_type", "dtype"}
    return {k: v for k, v in config.items() if k not in drop}


def mrope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    section: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[N, D]` (float32) for 3-D `positions [3, N]` with Qwen3-VL's interleaved MRoPE:
    frequency i uses the height axis when i % 3 == 1 and i < 3 * section[1], the width axis when
    i % 3 == 2 and i < 3 * section[2], else the temporal axis (transformers'
    `Qwen3VLTextRotaryEmbedding`). With the three axes equal it is plain RoPE."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [3, N, D/2]
    out = freqs[0].clone()
    if section is not None:
        for axis in (1, 2):
            idx = slice(axis, section[axis] * 3, 3)
            out[:, idx] = freqs[axis][:, idx]
    emb = torch.cat((out, out), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class OmniEncoder(Encoder):
    """The text `Encoder` plus a frozen vision tower and audio tower + projector.

    Attributes beyond `Encoder`'s: `omni_config` (the composite config.json), `visual`,
    `audio_tower`, `audio_projector` (None when the modality is absent), `image_processor`,
    `feature_extractor`, `audio_rate` (the tower's sampling rate).
    """

    def __init__(
        self,
        config: ModelConfig,
        omni_config: dict[str, Any],
        *,
        bidirectional: bool = True,
        tokenizer: Any = None,
        lm_head: bool = True,
    ) -> None:
        super().__init__(
            config,
            bidirectional=bidirectional,
            hf_config=omni_config["text_config"],
            tokenizer=tokenizer,
            lm_head=lm_head,
        )
        if self.spec.name != "qwen3":
            raise ValueError(f"omni text backbone must be qwen3, got {self.spec.name}")
        self.omni_config = dict(omni_config)
        self.visual: nn.Module | None = None
        self.audio_tower: nn.Module | None = None
        self.audio_projector: nn.Module | None = None
        self.image_processor: Any = None
        self.feature_extractor: Any = None
        self.processor_configs: dict[str, dict[str, Any]] = {}
        self.audio_rate = 16000
        # Towers are built on the CPU even under a meta-device context: their non-persistent
        # buffers (rotary tables, sinusoidal positions) are computed in __init__.
        with torch.device("cpu"):
            if omni_config.get("vision_config") is not None:
                vcls, vcfg = _require(
                    ["Qwen3VLVisionModel", "Qwen3VLVisionConfig"], "the vision tower"
                )
                vc = vcfg(**_known_fields(vcfg, omni_config["vision_config"]))
                self.visual = vcls(vc)
            if omni_config.get("audio_config") is not None:
                enc, acfg = _require(
                    ["Qwen3ASREncoder", "Qwen3ASREncoderConfig"], "the audio tower"
                )
                from transformers.models.qwen3_asr.modeling_qwen3_asr import (  # optional dep
                    Qwen3ASRMultiModalProjector,
                )

                ac = acfg(**_known_fields(acfg, omni_config["audio_config"]))
                self.audio_tower = enc(ac)
                self.audio_projector = Qwen3ASRMultiModalProjector(SimpleNamespace(audio_config=ac))
        self.freeze_towers(True)

    # --- towers -----------------------------------------------------------------------------

    def towers(self) -> list[nn.Module]:
        return [m for m in (self.visual, self.audio_tower, self.audio_projector) if m is not None]

    def freeze_towers(self, frozen: bool = True) -> None:
        """Freeze (default) or unfreeze the vision and audio towers (and the projector)."""
        for tower in self.towers():
            for p in tower.parameters():
                p.requires_grad_(not frozen)

    def _tower_context(self, tower: nn.Module) -> contextlib.AbstractContextManager:
        frozen = not any(p.requires_grad for p in tower.parameters())
        return torch.no_grad() if frozen else contextlib.nullcontext()

    def token_id(self, key: str) -> int | None:
        value = self.omni_config.get(key)
        return int(value) if value is not None else None

    # --- inputs -----------------------------------------------------------------------------

    def parse(self, items: Sequence[Any]) -> list[Item]:
        """Classify and load items (text, image, audio); one-line errors naming the item."""
        if isinstance(items, (str, dict)) or not isinstance(items, Sequence):
            raise ValueError("items: expected a list of str, images or audio")
        parsed = [parse_item(x, i, audio_rate=self.audio_rate) for i, x in enumerate(items)]
        for i, it in enumerate(parsed):
            if it.kind == "image" and self.visual is None:
                raise ValueError(f"items[{i}]: an image, but this checkpoint has no vision tower")
            if it.kind == "audio" and self.audio_tower is None:
                raise ValueError(f"items[{i}]: audio, but this checkpoint has no audio tower")
            if it.kind == "text" and self.tokenizer is None:
                raise ValueError("text items need a tokenizer: the checkpoint folder had none")
        return parsed

    def _min_side(self) -> int:
        cfg = self.processor_configs.get("image", {})
        return int(cfg.get("patch_size", 16)) * int(cfg.get("merge_size", 2))

    def prepare(self, items: Sequence[Item], *, max_length: int = 512) -> dict[str, Any]:
        """Packed model inputs for parsed `items`: `input_ids [T]`, `position_ids [3, T]`,
        `cu_seqlens [N+1]` (int32), `max_seqlen`, and the towers' inputs (`pixel_values`,
        `image_grid_thw`, `input_features`, `input_features_mask`) when present."""
        out: dict[str, Any] = {}
        seqs: list[tuple[list[int], torch.Tensor]] = []
        texts = [it.value for it in items if it.kind == "text"]
        text_ids = iter(
            self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            if texts
            else []
        )
        images = [(i, it.value) for i, it in enumerate(items) if it.kind == "image"]
        grids = iter(())
        if images:
            side = self._min_side()
            for i, img in images:
                if min(img.size) < side:
                    raise ValueError(
                        f"items[{i}]: image of {img.size[0]}x{img.size[1]} pixels is below the "
                        f"minimum {side}x{side} (patch_size x merge_size)"
                    )
                ratio = max(img.size) / min(img.size)
                if ratio > MAX_ASPECT_RATIO:
                    raise ValueError(
                        f"items[{i}]: image of {img.size[0]}x{img.size[1]} pixels has aspect "
                        f"ratio {ratio:.0f}, above the vision processor's limit of "
                        f"{MAX_ASPECT_RATIO}; crop or pad it"
                    )
            proc = self.image_processor(images=[img for _, img in images], return_tensors="pt")
            out["pixel_values"] = proc["pixel_values"]
            out["image_grid_thw"] = proc["image_grid_thw"]
            grids = iter(proc["image_grid_thw"].tolist())
        audios = [it.value for it in items if it.kind == "audio"]
        counts = iter(())
        if audios:
            feats = self.feature_extractor(
                audios,
                sampling_rate=self.audio_rate,
                padding="longest",
                return_attention_mask=True,
                return_tensors="pt",
            )
            out["input_features"] = feats["input_features"]
            out["input_features_mask"] = feats["attention_mask"]
            counts = iter(self.audio_token_counts(feats["attention_mask"]).tolist())
        merge = int(self.processor_configs.get("image", {}).get("merge_size", 2))
        for it in items:
            if it.kind == "text":
                ids = list(next(text_ids))
                if not ids:
                    raise ValueError("a text item tokenizes to nothing")
                pos = torch.arange(len(ids)).expand(3, -1)
            elif it.kind == "image":
                t, h, w = next(grids)
                h, w = h // merge, w // merge
                n = t * h * w
                ids = self._framed(
                    "vision_start_token_id", "image_token_id", n, "vision_end_token_id"
                )
                start = 1 if self.token_id("vision_start_token_id") is not None else 0
                grid = torch.stack(
                    torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                ).reshape(3, -1)
                parts = [torch.zeros(3, start, dtype=torch.long), grid + start]
                if len(ids) > n + start:
                    parts.append(torch.full((3, 1), start + max(h, w, t), dtype=torch.long))
                pos = torch.cat(parts, dim=1)
            else:
                n = int(next(counts))
                ids = self._framed(
                    "audio_start_token_id", "audio_token_id", n, "audio_end_token_id"
                )
                pos = torch.arange(len(ids)).expand(3, -1)
            seqs.append((ids, pos))
        lengths = [len(ids) for ids, _ in seqs]
        out["input_ids"] = torch.tensor([t for ids, _ in seqs for t in ids], dtype=torch.long)
        out["position_ids"] = torch.cat([p for _, p in seqs], dim=1)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        out["cu_seqlens"] = cu
        out["max_seqlen"] = max(lengths)
        return out

    def _framed(self, start: str, pad: str, n: int, end: str) -> list[int]:
        ids = [self.token_id(pad)] * n
        if self.token_id(start) is not None:
            ids = [self.token_id(start)] + ids
        if self.token_id(end) is not None:
            ids = ids + [self.token_id(end)]
        return ids

    def audio_token_counts(self, mask: torch.Tensor) -> torch.Tensor:
        """Tokens the audio tower outputs per clip, from the mel-frame mask `[B, F]` (the
        tower's chunking: chunks of 2 * n_window frames, three stride-2 convolutions each)."""
        chunk = 2 * int(self.audio_tower.config.n_window)
        b, f = mask.shape
        lens = mask.view(b, f // chunk, chunk).sum(-1).long()
        for _ in range(3):
            lens = torch.where(lens > 0, (lens - 1) // 2 + 1, torch.zeros_like(lens))
        return lens.sum(-1)

    # --- forward ----------------------------------------------------------------------------

    def forward_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states `[T, d]` of packed multimodal sequences (see `prepare`)."""
        dev = self.device
        input_ids = input_ids.to(dev)
        cu_seqlens = cu_seqlens.to(dev)
        x = self.embed(input_ids)
        deepstack: list[torch.Tensor] = []
        vis_idx = None
        if pixel_values is not None:
            with self._tower_context(self.visual):
                vdtype = next(self.visual.parameters()).dtype
                out = self.visual(pixel_values.to(dev, vdtype), grid_thw=image_grid_thw.to(dev))
            vis_idx = (input_ids == self.token_id("image_token_id")).nonzero().squeeze(1)
            feats = out.pooler_output
            if feats.shape[0] != vis_idx.numel():
                raise ValueError(
                    f"image features ({feats.shape[0]}) != image placeholder tokens "
                    f"({vis_idx.numel()})"
                )
            x = x.index_put((vis_idx,), feats.to(x.dtype))
            deepstack = [f.to(x.dtype) for f in out.deepstack_features]
        if input_features is not None:
            with self._tower_context(self.audio_tower):
                adtype = next(self.audio_tower.parameters()).dtype
                hidden = self.audio_tower(
                    input_features=input_features.to(dev, adtype),
                    input_features_mask=input_features_mask.to(dev),
                ).last_hidden_state
            with self._tower_context(self.audio_projector):
                feats = self.audio_projector(hidden)
            aud_idx = (input_ids == self.token_id("audio_token_id")).nonzero().squeeze(1)
            if feats.shape[0] != aud_idx.numel():
                raise ValueError(
                    f"audio features ({feats.shape[0]}) != audio placeholder tokens "
                    f"({aud_idx.numel()})"
                )
            x = x.index_put((aud_idx,), feats.to(x.dtype))
        section = self.omni_config.get("mrope_section")
        positions = position_ids.to(dev)
        rope = {
            t: mrope_cos_sin(
                positions, getattr(self, f"inv_freq_{t}"), self._rope_scaling[t], section
            )
            for t in self._rope_scaling
        }
        layout = AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen))
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, (layer, layer_type) in enumerate(zip(self.layers, self.config.layer_types)):
            window = self.config.window_for(layer_type, bidirectional=self.bidirectional)
            cos, sin = rope[layer_type]
            if use_ckpt:
                x = checkpoint(layer, x, cos, sin, layout, window, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, window)
            if i < len(deepstack):  # DeepStack: visual features of tower layer k -> layer k
                x = x.index_add(0, vis_idx, deepstack[i])
        return self.norm(x)

    def embed_items(
        self,
        items: Sequence[Any],
        *,
        pooling: str = "mean",
        max_length: int = 512,
    ) -> torch.Tensor:
        """Pooled embeddings `[N, d]` of raw or parsed items, with gradients (training path)."""
        parsed = [x if isinstance(x, Item) else None for x in items]
        if any(p is None for p in parsed):
            parsed = self.parse(items)
        return self.embed_prepared(self.prepare(parsed, max_length=max_length), pooling=pooling)

    def embed_prepared(self, batch: dict[str, Any], *, pooling: str = "mean") -> torch.Tensor:
        """Pooled embeddings `[N, d]` of a `prepare` batch (with gradients)."""
        hidden = self.forward_multimodal(**batch)
        return pool(hidden, pooling=pooling, cu_seqlens=batch["cu_seqlens"].to(hidden.device))

    @torch.inference_mode()
    def encode(
        self,
        items: Sequence[Any],
        batch_size: int = 32,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 512,
    ) -> torch.Tensor:
        """Embed a mixed list of text, images and audio -> float32 `[N, d]` (input order).

        Items of one kind are batched together (`batch_size` per forward); `pooling` is mean,
        first or last over each sequence's tokens; `normalize` L2-normalizes.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if pooling not in ("mean", "last", "first"):
            raise ValueError(f"pooling={pooling!r} is not valid; choose one of mean, last, first")
        parsed = self.parse(items)
        out = torch.empty(len(parsed), self.config.hidden_size, dtype=torch.float32)
        order = sorted(
            range(len(parsed)), key=lambda i: ("text", "image", "audio").index(parsed[i].kind)
        )
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                vecs = self.embed_items(
                    [parsed[i] for i in chunk], pooling=pooling, max_length=max_length
                ).float()
                if normalize:
                    vecs = torch.nn.functional.normalize(vecs, dim=-1)
                out[torch.tensor(chunk)] = vecs.cpu()
        finally:
            self.train(was_training)
        if not torch.isfinite(out).all():
            raise ValueError("encode produced non-finite embeddings (check the checkpoint)")
        return out

    def text_encoder(self) -> Encoder:
        """The text path as a plain `Encoder` sharing this model's weights (for exports that
        only know text models, e.g. sentence-transformers)."""
        with torch.device("meta"):
            plain = Encoder(
                self.config,
                bidirectional=self.bidirectional,
                hf_config=self.hf_config,
                tokenizer=self.tokenizer,
                lm_head=self._has_head,
            )
        towers = tuple(TOWER_PREFIXES)
        state = {
            k: v
            for k, v in self.state_dict(keep_vars=True).items()
            if not k.startswith(towers) and not k.startswith("inv_freq_")
        }
        plain.load_state_dict(state, strict=True, assign=True)
        plain.reset_rope(self.device)
        return plain.train(self.training)

    # --- saving -----------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> None:
        """Write the composite checkpoint (the layout `compose_omni` writes; `load_model` reads
        it back): text under `model.language_model.*`, towers under their prefixes."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        reverse = {o: h for h, o in ckpt.name_map(self.spec, self.config).items() if o}
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict().items():
            if name.startswith("inv_freq_"):
                continue
            if name == "lm_head.weight":
                if self.head is not None:
                    continue  # a classifier drops the LM head, as `Encoder.save_pretrained` does
                out = "lm_head.weight"
            elif name.startswith("head."):  # a fine-tuned classification head: `score.*`
                out = name[len("head.") :]
            elif name in reverse:
                out = TEXT_PREFIX + reverse[name]
            else:
                tower = next((p for p in TOWER_PREFIXES if name.startswith(p)), None)
                if tower is None:
                    raise ValueError(f"state: no checkpoint name for parameter {name!r}")
                out = TOWER_PREFIXES[tower] + name[len(tower) :]
            tensors[out] = t.detach().to("cpu").contiguous()
        for stale in [folder / ckpt.INDEX_FILE, *folder.glob("model*.safetensors")]:
            stale.unlink(missing_ok=True)
        save_file(tensors, str(folder / ckpt.SINGLE_FILE), metadata={"format": "pt"})
        config = dict(self.omni_config)
        config["text_config"] = self.spec.to_hf_config(
            self.config, self.hf_config, self.bidirectional, self.dtype
        )
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        for key in ("bidirlm_head", "id2label", "label2id", "problem_type", "classifier_dropout"):
            config.pop(key, None)
        if self.head is not None:  # the head's record; the composite keeps its architecture
            fields = self.head.hf_fields(self.spec.name)
            fields.pop("architectures", None)
            config.update(fields)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for kind, fname in (("image", IMAGE_PROCESSOR_FILE), ("audio", AUDIO_PROCESSOR_FILE)):
            if kind in self.processor_configs:
                text = json.dumps(self.processor_configs[kind], indent=2) + "\n"
                (folder / fname).write_text(text)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))


def _processors(model: OmniEncoder, folder: Path) -> None:
    if model.visual is not None:
        (proc_cls,) = _require(["Qwen2VLImageProcessorPil"], "the image processor")
        path = folder / IMAGE_PROCESSOR_FILE
        cfg = (
            json.loads(path.read_text(encoding="utf-8"))
            if path.is_file()
            else rel.image_processor_config(model.omni_config["vision_config"])
        )
        model.processor_configs["image"] = cfg
        keys = (
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "image_mean",
            "image_std",
            "size",
            "min_pixels",
            "max_pixels",
            "do_resize",
            "do_normalize",
            "do_rescale",
            "rescale_factor",
            "do_convert_rgb",
        )
        model.image_processor = proc_cls(**{k: cfg[k] for k in keys if k in cfg})
    if model.audio_tower is not None:
        (fe_cls,) = _require(["Qwen3ASRFeatureExtractor"], "the audio feature extractor")
        path = folder / AUDIO_PROCESSOR_FILE
        cfg = (
            json.loads(path.read_text(encoding="utf-8"))
            if path.is_file()
            else rel.audio_processor_config(model.omni_config["audio_config"])
        )
        model.processor_configs["audio"] = cfg
        keys = (
            "feature_size",
            "sampling_rate",
            "hop_length",
            "n_fft",
            "n_window",
            "padding_value",
            "dither",
            "min_length",
            "chunk_length",
        )
        model.feature_extractor = fe_cls(**{k: cfg[k] for k in keys if k in cfg})
        model.audio_rate = int(cfg.get("sampling_rate", 16000))


def load_omni(
    folder: Path,
    hf: dict[str, Any],
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    bidirectional: bool | None,
    allow_non_finite: bool | None = None,
) -> OmniEncoder:
    """Read a composed checkpoint folder (`bidirlm.runtime.merging.compose`) as an `OmniEncoder`."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ckpt.CheckpointError(f"{folder}: {MODEL_TYPE} config.json has no text_config")
    released = rel.is_released(hf)  # the published BidirLM-Omni layout (models/released.py)
    if released:
        hf = rel.to_composite_config(hf)
        text = hf["text_config"]
    spec = ckpt.spec_for(text)
    config = spec.parse_config(text)
    if bidirectional is None:
        bidirectional = spec.is_bidirectional(text)
    dtype = dtype or ckpt.checkpoint_dtype(folder, hf)
    if allow_non_finite is None:
        allow_non_finite = ckpt.allow_non_finite_default()
    files = ckpt.weight_files(folder)
    has_head = config.tie_word_embeddings or "lm_head.weight" in files
    with torch.device("meta"):
        model = OmniEncoder(config, hf, bidirectional=bidirectional, lm_head=has_head)
    table = ckpt.name_map(spec, config)
    wanted: dict[str, str] = {}
    unknown = []
    for name in files:
        cname = rel.composite_name(name) if released else name
        if cname.startswith(TEXT_PREFIX):
            ours = table.get(cname[len(TEXT_PREFIX) :], "?")
            if ours == "?":
                unknown.append(name)
            elif ours is not None:
                wanted[ours] = name
        elif cname == "lm_head.weight":
            if model.lm_head is not None:
                wanted["lm_head.weight"] = name
        elif head_kind(hf) is not None and cname in HEAD_TENSORS:
            continue  # a classifier's head: `loading.load_model` reads it (`heads.load_head`)
        else:
            ours_prefix = next((o for o, p in TOWER_PREFIXES.items() if cname.startswith(p)), None)
            if ours_prefix is None:
                unknown.append(name)
            else:
                wanted[ours_prefix + cname[len(TOWER_PREFIXES[ours_prefix]) :]] = name
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("inv_freq_")}
    extra = [w for w in wanted if w not in expected]
    if unknown or extra:
        bad = unknown + [wanted[w] for w in extra]
        raise ckpt.CheckpointError(f"{folder}: unexpected tensor(s) {ckpt._short(sorted(bad))}")
    missing = [k for k in expected if k not in wanted]
    if missing:
        raise ckpt.CheckpointError(f"{folder}: missing tensor(s) {ckpt._short(missing)}")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for ours, name in wanted.items():
        by_file.setdefault(files[name], []).append(ours)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as fh:
            for ours in names:
                t = fh.get_tensor(wanted[ours])
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise ckpt.CheckpointError(
                        f"{folder}: tensor {wanted[ours]} has shape {tuple(t.shape)}, expected "
                        f"{tuple(expected[ours].shape)} from config.json"
                    )
                # the text backbone in `dtype`; frozen towers keep their stored dtype (bit-exact)
                if not allow_non_finite and t.is_floating_point() and not t.isfinite().all():
                    raise ckpt.CheckpointError(
                        f"{folder}: tensor {wanted[ours]} holds NaN/Inf values "
                        "(allow_non_finite=True or BIDIRLM_ALLOW_NON_FINITE=1 to load it anyway)"
                    )
                tower = any(ours.startswith(p) for p in TOWER_PREFIXES)
                state[ours] = t.to(dtype=dtype) if t.is_floating_point() and not tower else t
    model.load_state_dict(state, strict=True, assign=True)
    model.freeze_towers(True)  # assign=True replaced the parameters: freeze the new ones
    model.reset_rope("cpu")  # the meta-device RoPE buffers, before any move
    model.to(device)
    if ckpt.has_tokenizer(folder):
        # optional dependency: transformers reads the tokenizer files
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # no "model of type bidirlm_omni" warning
        try:
            model.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        finally:
            hf_logging.set_verbosity(level)
    _processors(model, folder)
    return model.eval()
