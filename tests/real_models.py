"""Tiny random checkpoints built from real published configs (tests/data/real_configs).

`shrink(config)` divides only the size fields and keeps everything else as the real model has
it: `rope_theta`, rope scaling, special-token ids, `tie_word_embeddings`, norms and their eps,
activation, attention window and layer-type pattern, patch / merge sizes, mel bins, windows.

Size rules (one divisor per field, so two real models that differ in a size still differ after
shrinking, and two that agree still agree):

- text: `hidden_size` / 64, `intermediate_size` / 64, `num_key_value_heads` / 4 (at least 1),
  `num_attention_heads` = the new KV heads times the real GQA ratio (/ 4 for Qwen3's 2:1; a
  Gemma3 4:1 MQA keeps its 4 query heads on 1 KV head), `hidden_size` then rounded up to a
  multiple of the heads (transformers requires it: Gemma-3-270M's 640 / 64 = 10 becomes 12),
  `head_dim` / 4, `num_hidden_layers` // 14 (at least 1, and at least up to the first
  `full_attention` layer when `layer_types` mixes kinds, or at least one `sliding_window_pattern`
  period when a Gemma3 config states only the period, so a Gemma3 keeps its 5 sliding + 1 global
  pattern); `layer_types` and `max_window_layers` follow. The vocabulary is kept (the
  special-token ids, e.g. 151655 or 151676, must stay inside it); `sliding_window` (512 for
  Gemma3) is kept, so sequences longer than it exercise the window.
- `query_pre_attn_scalar` (Gemma3's score scale, `query_pre_attn_scalar ** -0.5`) is kept as the
  real value (256) although the real model ties it to `head_dim` (256): the tiny model's
  head_dim is 64, so its scores are scaled by 1/16 exactly as the real model's, not by
  1/sqrt(64); what is kept is the real scale, not the tie.
- MRoPE: `mrope_section` is scaled by (new head_dim / 2) / sum(section), rounded down, the
  remainder added to the temporal section, so it still sums to head_dim / 2 ([24, 20, 20] for
  head_dim 128 becomes [6, 5, 5] for head_dim 32).
- vision tower: `depth` // 12, `hidden_size` / 32, `intermediate_size` / 32, `num_heads` / 8,
  `out_hidden_size` / 64 (= the shrunk text width); `deepstack_visual_indexes` are mapped to the
  same relative depth (i * new_depth // old_depth, duplicates dropped).
- audio tower: `encoder_layers` // 12, `d_model` / 32, `encoder_attention_heads` / 8,
  `encoder_ffn_dim` / 64, `downsample_hidden_size` / 60, `output_dim` / 64 (= the text width).

Builders write checkpoints in the layout the real model ships: a Qwen3 / Gemma3 `*ForCausalLM`
(`model.*`), a Qwen3-VL (`model.language_model.*`, `model.visual.*`) and a released Qwen3-ASR
(`thinker.model.*`, `thinker.audio_tower.*` with the projector as `audio_tower.proj1/proj2`),
each with the shrunk real config as its config.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from bidirlm.runtime.merging.merge import merge_from_config
from tests.omni.helpers import bits_equal

REAL_CONFIGS = Path(__file__).parent / "data" / "real_configs"

TEXT_DIV = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 4,
}
VISION_DIV = {"hidden_size": 32, "intermediate_size": 32, "num_heads": 8, "out_hidden_size": 64}
AUDIO_DIV = {
    "d_model": 32,
    "encoder_attention_heads": 8,
    "encoder_ffn_dim": 64,
    "downsample_hidden_size": 60,
    "output_dim": 64,
}
TEXT_LAYERS_DIV = 14
VISION_DEPTH_DIV = 12
AUDIO_LAYERS_DIV = 12


def real_config(name: str) -> dict[str, Any]:
    """The stored config.json of `name` (a folder under tests/data/real_configs)."""
    return json.loads((REAL_CONFIGS / name / "config.json").read_text(encoding="utf-8"))


def _div(config: dict[str, Any], table: dict[str, int]) -> None:
    for key, div in table.items():
        if isinstance(config.get(key), int):
            config[key] = max(1, config[key] // div)


def scale_mrope(section: list[int], half: int) -> list[int]:
    """`section` (summing to the old head_dim / 2) scaled to sum to `half`."""
    total = sum(section)
    out = [s * half // total for s in section]
    out[0] += half - sum(out)
    return out


def _shrink_text(c: dict[str, Any]) -> None:
    heads = c.get("num_attention_heads")
    kv = c.get("num_key_value_heads")
    _div(c, TEXT_DIV)
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv == 0:
        # the query heads follow the KV heads, so the GQA ratio stays exact (Gemma3's 4:1 MQA
        # keeps its 4 query heads instead of collapsing to 1:1)
        c["num_attention_heads"] = c["num_key_value_heads"] * (heads // kv)
    if isinstance(c.get("hidden_size"), int) and isinstance(c.get("num_attention_heads"), int):
        h = c["num_attention_heads"]  # transformers wants the width a multiple of the heads
        c["hidden_size"] = -(-c["hidden_size"] // h) * h
    old = c.get("num_hidden_layers")
    if isinstance(old, int):
        n = max(1, old // TEXT_LAYERS_DIV)
        types = c.get("layer_types")
        pattern = c.get("sliding_window_pattern", c.get("_sliding_window_pattern"))
        if isinstance(types, list) and "full_attention" in types and len(set(types)) > 1:
            n = max(n, types.index("full_attention") + 1)
        elif types is None and isinstance(pattern, int) and 1 < pattern <= old:
            n = max(n, pattern)  # a Gemma3 config that states only its period (Gemma3-1B)
        c["num_hidden_layers"] = n
        if isinstance(types, list):
            c["layer_types"] = types[:n]
        if isinstance(c.get("max_window_layers"), int):
            c["max_window_layers"] = min(c["max_window_layers"], n)
    head_dim = c.get("head_dim")
    if head_dim is None and heads:
        head_dim = c["hidden_size"] // c["num_attention_heads"]
    for key in ("rope_scaling", "rope_parameters"):
        params = c.get(key)
        if isinstance(params, dict) and params.get("mrope_section") and head_dim:
            params["mrope_section"] = scale_mrope(list(params["mrope_section"]), head_dim // 2)


def _shrink_vision(c: dict[str, Any]) -> None:
    old = c.get("depth")
    _div(c, VISION_DIV)
    if isinstance(old, int):
        new = max(1, old // VISION_DEPTH_DIV)
        c["depth"] = new
        idx: list[int] = []
        for i in c.get("deepstack_visual_indexes") or []:
            j = min(new - 1, int(i) * new // old)
            if j not in idx:
                idx.append(j)
        if "deepstack_visual_indexes" in c:
            c["deepstack_visual_indexes"] = idx


def _shrink_audio(c: dict[str, Any]) -> None:
    _div(c, AUDIO_DIV)
    if isinstance(c.get("encoder_layers"), int):
        c["encoder_layers"] = max(1, c["encoder_layers"] // AUDIO_LAYERS_DIV)


def shrink(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a real config with only its size fields shrunk (see the module docstring)."""
    out = copy.deepcopy(config)

    def walk(c: dict[str, Any], role: str) -> None:
        if role == "text":
            _shrink_text(c)
        elif role == "vision":
            _shrink_vision(c)
        elif role == "audio":
            _shrink_audio(c)
        for key, sub_role in (
            ("thinker_config", "container"),
            ("text_config", "text"),
            ("vision_config", "vision"),
            ("audio_config", "audio"),
        ):
            if isinstance(c.get(key), dict):
                walk(c[key], sub_role)

    nested = any(k in out for k in ("text_config", "thinker_config"))
    walk(out, "container" if nested else "text")
    return out


def check_special_ids(config: dict[str, Any]) -> None:
    """Every `*_token_id` of the config (and its sub-configs) lies inside the text vocabulary."""
    text = config.get("text_config") or (config.get("thinker_config") or {}).get("text_config")
    vocab = int((text or config)["vocab_size"])

    def ids(c: dict[str, Any]):
        for k, v in c.items():
            if k.endswith("_token_id") and isinstance(v, int):
                yield k, v
            elif isinstance(v, dict):
                yield from ids(v)

    bad = {k: v for k, v in ids(config) if not 0 <= v < vocab}
    assert not bad, f"special ids outside the vocabulary ({vocab}): {bad}"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norm weights and biases moved off their init, so a swapped or missing one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _with_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    name = str(dtype).removeprefix("torch.")
    out = dict(config)
    for key in ("torch_dtype", "dtype"):
        if key in out:
            out[key] = name
    if "torch_dtype" not in out and "dtype" not in out:
        out["dtype"] = name
    return out


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _tokenizer(folder: Path) -> None:
    from tests.models.test_models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)


TEXT_ARCHS = {"Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3_text"}


def build_text(
    folder: Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> Path:
    """A random Qwen3 / Gemma3 `*ForCausalLM` of the (already shrunk) `config`.

    config.json is `config` itself (plus `model_type` when the source lacks it, and its dtype
    field set to `dtype`), not transformers' re-serialization of it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    if "model_type" not in cfg:
        cfg["model_type"] = TEXT_ARCHS[cfg["architectures"][0]]
    check_special_ids(cfg)
    hf = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf)
    _perturb(model, seed)
    model.to(dtype).save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    _write_config(folder, _with_dtype(cfg, dtype))
    if tokenizer:
        _tokenizer(folder)
    return Path(folder)


def build_vision(
    folder: Path, config: dict[str, Any], *, seed: int = 1, dtype: torch.dtype = torch.float32
) -> Path:
    """A random Qwen3-VL (`Qwen3VLForConditionalGeneration`) of the shrunk `config`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    check_special_ids(config)
    hf = Qwen3VLConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(hf)
    _perturb(model, seed)
    model.to(dtype).save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    _write_config(folder, _with_dtype(config, dtype))
    _tokenizer(folder)
    return Path(folder)


# transformers' Qwen3-ASR names -> the released checkpoints' names
ASR_RELEASED = (
    ("model.language_model.", "thinker.model."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
    ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
    ("lm_head.", "thinker.lm_head."),
)


def build_audio(
    folder: Path, config: dict[str, Any], *, seed: int = 2, dtype: torch.dtype = torch.float32
) -> Path:
    """A random Qwen3-ASR of the shrunk released `config` (`thinker_config` layout), with the
    released checkpoints' tensor names."""
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    check_special_ids(config)
    thinker = config["thinker_config"]
    hf = Qwen3ASRConfig(
        audio_config=thinker["audio_config"],
        text_config={**thinker["text_config"], "model_type": "qwen3"},
        audio_token_id=thinker["audio_token_id"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ASRForConditionalGeneration(hf)
    _perturb(model, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.to(dtype).state_dict().items():
        for old, new in ASR_RELEASED:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        tensors[name] = t.contiguous()
    if hf.tie_word_embeddings:
        tensors.pop("thinker.lm_head.weight", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_config(folder, _with_dtype(config, dtype))
    _tokenizer(folder)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- the paper's three specialists (text Qwen3-1.7B, vision Qwen3-VL-2B, audio Qwen3-ASR-1.7B) ---

# Qwen3-VL-2B-Instruct: tests/data/real_configs/qwen3-vl-2b-instruct/config.json is assembled from
# public fixtures and loaders that state its fields (not the verbatim published file; its README
# lists the sources). Its size fields are shrunk like every other real config.


def qwen3_1p7b_config() -> dict[str, Any]:
    """Qwen3-1.7B: its stored (abridged) config over Qwen3-0.6B's published one for the fields
    the abridged copy lacks (`rope_theta`, `max_position_embeddings`, token ids, norms)."""
    out = {**real_config("qwen3-0.6b"), **real_config("qwen3-1.7b")}
    out.pop("_name_or_path", None)
    return out


def qwen3_vl_2b_standin() -> dict[str, Any]:
    """Qwen3-VL-2B-Instruct's config, as assembled in tests/data/real_configs (see its README):
    text backbone of Qwen3-1.7B's sizes with theta 5e6, interleaved MRoPE [24, 20, 20] and 262144
    positions; a 24-block, 1024-wide vision tower with DeepStack at blocks 5, 11 and 17."""
    return real_config("qwen3-vl-2b-instruct")


def build_paper_three(root: Path, *, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Tiny text (Qwen3-1.7B), vision (Qwen3-VL-2B stand-in) and audio (Qwen3-ASR-1.7B)
    checkpoints, each its real config with the sizes shrunk."""
    root = Path(root)
    return {
        "text": build_text(root / "text", shrink(qwen3_1p7b_config()), dtype=dtype),
        "vision": build_vision(root / "vision", shrink(qwen3_vl_2b_standin()), dtype=dtype),
        "audio": build_audio(root / "audio", shrink(real_config("qwen3-asr-1.7b")), dtype=dtype),
    }


# --- the released BidirLM text checkpoints (BidirLM-1B / 1.7B-Embedding, `BidirLMModel`) ---

# Base model of each released text checkpoint (its model card; mteb's `adapted_from`).
BIDIRLM_BASES = {"bidirlm-1b-embedding": "gemma-3-1b-it", "bidirlm-1.7b-embedding": "qwen3-1.7b"}


def bidirlm_text_config(name: str) -> dict[str, Any]:
    """A released BidirLM text config.json: the stored head of the published file (the fields the
    mirror showed, verbatim: `BidirLMModel`, `auto_map`, `classifier_pooling`, token ids, sizes)
    over its base model's stored config for the rest, `model_type` "bidirlm" (see the README).
    BidirLM-1.7B's stored `auto_map` is cut after four entries; they equal BidirLM-1B's, whose
    six are used."""
    base = (
        qwen3_1p7b_config()
        if BIDIRLM_BASES[name] == "qwen3-1.7b"
        else real_config(BIDIRLM_BASES[name])
    )
    head = real_config(name)
    full_map = real_config("bidirlm-1b-embedding")["auto_map"]
    assert head["auto_map"].items() <= full_map.items()
    out = {**base, **head, "auto_map": dict(full_map), "model_type": "bidirlm"}
    out.pop("_name_or_path", None)
    return out


def real_file(name: str, relpath: str) -> dict[str, Any]:
    """Another stored file of a real model (`relpath` under tests/data/real_configs/`name`)."""
    return json.loads((REAL_CONFIGS / name / relpath).read_text(encoding="utf-8"))


def build_released_text(
    folder: Path, config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Path, Path]:
    """A tiny released BidirLM text checkpoint of the (shrunk) released `config`, written by hand
    (not by our exporter): the base family's random `*ForCausalLM` is built beside it
    (`folder`/base, `model.*` names), then its tensors are stored without the `model.` prefix
    (the `BidirLMModel` names) under `config` itself. Returns (released folder, base folder)."""
    folder = Path(folder)
    family = dict(config)
    gemma = "query_pre_attn_scalar" in family
    family["model_type"] = "gemma3_text" if gemma else "qwen3"
    family["architectures"] = ["Gemma3ForCausalLM" if gemma else "Qwen3ForCausalLM"]
    for key in ("auto_map", "classifier_pooling"):
        family.pop(key, None)
    base = build_text(folder / "base", family, seed=seed, dtype=dtype)
    rel = folder / "released"
    rel.mkdir(parents=True)
    out = {}
    for n, t in tensors(base).items():
        out[n[len("model.") :] if n.startswith("model.") else n] = t
    save_file(out, str(rel / "model.safetensors"), metadata={"format": "pt"})
    _write_config(rel, _with_dtype(config, dtype))
    _tokenizer(rel)
    return rel, base


HALF_HALF_YAML = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


def half_half_merge_vs_mergekit(
    tmp_path: Path, config: dict[str, Any]
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Two bf16 checkpoints of `config` (seeds 0, 1) merged 50/50 by us and by the installed
    mergekit; asserts the outputs are bitwise equal and bf16; returns (a, b, our tensors)."""
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    a = build_text(tmp_path / "a", config, seed=0, dtype=torch.bfloat16)
    b = build_text(tmp_path / "b", config, seed=1, dtype=torch.bfloat16)
    text = HALF_HALF_YAML.format(a=a, b=b)
    (tmp_path / "merge.yml").write_text(text)
    merge_from_config(tmp_path / "merge.yml", tmp_path / "ours", threads=1)
    mk = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    mk_merge.run_merge(mk, str(tmp_path / "theirs"), mk_options.MergeOptions(quiet=True))
    ours, theirs = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    assert all(bits_equal(ours[n], theirs[n]) for n in theirs)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    return a, b, ours
