"""Compose one omnimodal checkpoint from specialists (`bidirlm compose`, `compose_omni(...)`).

BidirLM-Omni: the text backbones of a text encoder (Qwen3, `model.*`), a vision-language model
(Qwen3-VL, `model.language_model.*`) and a speech model (Qwen3-ASR: `thinker.model.*` in the
released checkpoints, `model.language_model.*` as transformers names it) are averaged with the
streaming merger (`bidirlm.runtime.merging`, linear, normalized weights), while the vision tower
(with its merger and DeepStack mergers) and the audio tower (with its projector) are copied over
bit for bit. Either specialist may be left out.

The output folder:

- tensors `model.language_model.*` (Qwen3 names after the prefix), `lm_head.weight` when every
  source has an untied head, `model.visual.*` (transformers' Qwen3-VL names), `model.audio_tower.*`
  and `model.multi_modal_projector.{linear_1,linear_2}` (transformers' Qwen3-ASR names; the
  released checkpoints' `audio_tower.proj1/proj2` are renamed to them);
- `config.json`: `model_type: "bidirlm_omni"` with `text_config` (the text source's Qwen3
  config, `is_causal: false`, its RoPE fields from the `rope_from` source), `vision_config` /
  `audio_config` (the towers' configs, as transformers' `Qwen3VLVisionConfig` /
  `Qwen3ASREncoderConfig` read them), the placeholder token ids (`image_token_id`,
  `vision_start_token_id`, `vision_end_token_id`, `audio_token_id`, `audio_start_token_id`,
  `audio_end_token_id`), `mrope_section`, `merge_weights`, `rope_from` and `differing_fields`
  (every free field on which the specialists differ, with each one's value);
- the text source's tokenizer files, `preprocessor_config.json` (the image processor, from the
  vision source or derived from its tower config) and `audio_preprocessor_config.json` (the log-mel
  feature extractor, from the audio source or derived from its tower config), `merge_config.yml`.

The folder appears only once complete (a temporary folder renamed into place, as `merge`).

Fields the specialists' text backbones may differ on, and the policy (`rope_from`):

- must agree, else a one-line `ComposeError` naming the field and both values: the widths
  (`hidden_size`, `intermediate_size`, `head_dim`), heads and key/value heads, layer count,
  vocabulary size, `rms_norm_eps` / `hidden_act` (when both configs give them) and the special
  ids (`bos_token_id`, `eos_token_id`, `pad_token_id`, when both give them);
- free (FREE_FIELDS): the RoPE parameters (`rope_theta`, rope type and scaling: Qwen3-1.7B has
  theta 1e6, Qwen3-VL-2B 5e6 with interleaved MRoPE) and `max_position_embeddings` are taken from
  the one source `rope_from` names (default: the vision model when there is one, since image
  positions are 3-D MRoPE positions the vision model was trained with, else the text model);
  `tie_word_embeddings` follows the heads (one averaged untied head when every source has one,
  else tied); generation settings (`generation_config.json`) are not carried over. The MRoPE
  axis split (`mrope_section`) always comes from the vision model. The choice and every
  differing value are recorded in config.json (`rope_from`, `differing_fields`) and
  `policy_line(config)` renders them in one line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bidirlm.runtime.models.released import audio_processor_config, image_processor_config
from bidirlm.runtime.outputs import AtomicFolder

from .config import MergeError, config_from_dict
from .io import read_checkpoint
from .merge import TOKENIZER_FILES, MergeResult, merge_from_config

TEXT_OUT = "model.language_model."
VISION_OUT = "model.visual."
AUDIO_OUT = "model.audio_tower."
PROJECTOR_OUT = "model.multi_modal_projector."
HEAD_OUT = "lm_head.weight"
UNUSED_OUT = "unused."
MODEL_TYPE = "bidirlm_omni"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
AUDIO_PROCESSOR_FILE = "audio_preprocessor_config.json"
# Text-backbone prefixes, most specific first (Qwen3-VL / ASR-hf, released ASR, Qwen3, bare).
TEXT_PREFIXES = ("model.language_model.", "thinker.model.", "language_model.model.", "model.", "")
HEAD_NAMES = ("lm_head.weight", "thinker.lm_head.weight", "language_model.lm_head.weight")
VISION_PREFIXES = ("model.visual.", "visual.", "thinker.visual.")
AUDIO_PREFIXES = ("model.audio_tower.", "thinker.audio_tower.", "audio_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "thinker.multi_modal_projector.")
# Architecture fields that must agree between the text backbones for an average to make sense.
ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
SPECIAL_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Compared only when both configs give them (defaults differ between config classes).
OPTIONAL_ARCH_FIELDS = ("rms_norm_eps", "hidden_act")
ROLES = ("text", "vision", "audio")
# Fields that may differ between the text backbones: taken from the `rope_from` source.
FREE_FIELDS = ("rope_theta", "rope_type", "rope_scaling", "max_position_embeddings")
MROPE_KEYS = ("mrope_section", "mrope_interleaved", "interleaved", "type")


class ComposeError(MergeError):
    """Specialists that cannot be composed; the message names the source and the mismatch."""


@dataclass
class Source:
    """One input checkpoint: its role, config, tensor names and where its text backbone lives."""

    role: str  # "text" | "vision" | "audio"
    path: Path
    config: dict[str, Any]
    names: set[str]
    text_prefix: str
    head: str | None
    text_config: dict[str, Any]
    rename: dict[str, str] = field(default_factory=dict)
    take: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ComposeError(f"{what} {path.parent}: missing config.json") from None
    except (OSError, ValueError) as exc:
        raise ComposeError(f"{what} {path}: unreadable ({exc})") from None


def _sub(config: dict[str, Any], key: str) -> dict[str, Any] | None:
    """`config[key]`, or `config["thinker_config"][key]` (released Qwen3-ASR / Omni layout)."""
    value = config.get(key)
    if value is None and isinstance(config.get("thinker_config"), dict):
        value = config["thinker_config"].get(key)
    return dict(value) if isinstance(value, dict) else None


def _top(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    if value is None and isinstance(config.get("thinker_config"), dict):
        value = config["thinker_config"].get(key)
    return value


def _load_source(role: str, path: str | os.PathLike) -> Source:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ComposeError(f"{role} model {str(path)!r} is not a local checkpoint folder")
    config = _read_json(folder / "config.json", f"{role} model")
    names = set(read_checkpoint(folder, f"{role} model {path}"))
    prefix = next((p for p in TEXT_PREFIXES if p + "embed_tokens.weight" in names), None)
    if prefix is None:
        raise ComposeError(
            f"{role} model {path}: no text backbone (embed_tokens.weight under any of "
            f"{[p or '(none)' for p in TEXT_PREFIXES]})"
        )
    text_config = _sub(config, "text_config") or (config if role == "text" else None)
    if text_config is None:
        raise ComposeError(f"{role} model {path}: config.json has no text_config")
    kind = str(text_config.get("model_type") or "")
    if kind and not kind.startswith("qwen3"):  # a config without model_type is trusted
        raise ComposeError(
            f"{role} model {path}: text backbone is {kind}, not Qwen3 (compose "
            "supports Qwen3 / Qwen3-VL / Qwen3-ASR text backbones)"
        )
    head = next((h for h in HEAD_NAMES if h in names), None)
    return Source(role, folder, config, names, prefix, head, text_config)


def rope_parameters(text: dict[str, Any]) -> dict[str, Any]:
    """The text backbone's RoPE as one transformers-5 `rope_parameters` dict (theta, type and
    scaling; the MRoPE axis keys left out), from `rope_parameters` or legacy `rope_theta` +
    `rope_scaling`."""
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    params = {k: v for k, v in params.items() if k not in MROPE_KEYS}
    theta = params.get("rope_theta", text.get("rope_theta"))
    params["rope_theta"] = float(theta) if theta is not None else 10000.0
    params["rope_type"] = params.get("rope_type") or "default"
    return params


def _free_values(src: Source) -> dict[str, Any]:
    rope = rope_parameters(src.text_config)
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
    return {
        "rope_theta": rope["rope_theta"],
        "rope_type": rope["rope_type"],
        "rope_scaling": scaling or None,
        "max_position_embeddings": src.text_config.get("max_position_embeddings"),
    }


def resolve_rope_from(sources: Sequence[Source], rope_from: str | None) -> Source:
    """The source whose RoPE / position fields the composite takes (see the module docstring)."""
    roles = [s.role for s in sources]
    if rope_from is None:
        rope_from = "vision" if "vision" in roles else "text"
    if rope_from not in ROLES:
        raise ComposeError(f"rope_from: expected one of {', '.join(ROLES)}, got {rope_from!r}")
    if rope_from not in roles:
        raise ComposeError(
            f"rope_from: {rope_from!r} names no given model (given: {', '.join(roles)})"
        )
    return sources[roles.index(rope_from)]


def differing_fields(sources: Sequence[Source]) -> dict[str, dict[str, Any]]:
    """{field: {role: value}} for every free field on which the sources differ."""
    values = {s.role: _free_values(s) for s in sources}
    out: dict[str, dict[str, Any]] = {}
    for key in FREE_FIELDS:
        per_role = {role: v[key] for role, v in values.items()}
        if len({json.dumps(v, sort_keys=True) for v in per_role.values()}) > 1:
            out[key] = per_role
    return out


def policy_line(config: dict[str, Any]) -> str:
    """One line: where the composite's RoPE came from and what differed between the models."""
    chosen = config.get("rope_from", "text")
    diffs = config.get("differing_fields") or {}
    if not diffs:
        return f"rope-from {chosen}: the models agree on rope and positions"
    parts = []
    for key, per_role in diffs.items():
        others = ", ".join(f"{r} {_fmt(v)}" for r, v in per_role.items() if r != chosen)
        parts.append(f"{key} {_fmt(per_role.get(chosen))} ({others})")
    return f"rope-from {chosen}: " + "; ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def _mrope_section(text: dict[str, Any]) -> list[int] | None:
    for key in ("rope_parameters", "rope_scaling"):
        params = text.get(key) or {}
        if params.get("mrope_section"):
            return [int(x) for x in params["mrope_section"]]
    return None


def check_compatible(sources: Sequence[Source]) -> None:
    """A one-line `ComposeError` naming the first field on which the text backbones differ."""
    ref = sources[0]

    def value(src: Source, key: str) -> Any:
        c = src.text_config
        if key == "head_dim":
            return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        if key == "num_key_value_heads":
            return c.get(key) or c.get("num_attention_heads")
        return c.get(key)

    for src in sources[1:]:
        for key in ARCH_FIELDS:
            a, b = value(ref, key), value(src, key)
            if a != b:
                raise ComposeError(
                    f"text backbones differ: {key} is {a} in the text model and {b} in the "
                    f"{src.role} model ({src.path})"
                )
        for key in OPTIONAL_ARCH_FIELDS:
            a, b = ref.text_config.get(key), src.text_config.get(key)
            if a is not None and b is not None and a != b:
                raise ComposeError(
                    f"text backbones differ: {key} is {a} in the text model and {b} in the "
                    f"{src.role} model ({src.path})"
                )
        for key in SPECIAL_FIELDS:
            a, b = ref.text_config.get(key), src.text_config.get(key)
            if a is not None and b is not None and a != b:
                raise ComposeError(
                    f"special-token ids differ: {key} is {a} in the text model and {b} in the "
                    f"{src.role} model ({src.path})"
                )


def _placeholders(
    text: Source, vision: Source | None, audio: Source | None, overrides: dict[str, int]
) -> dict[str, int]:
    ids: dict[str, int] = {}
    if vision is not None:
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if vision.config.get(key) is not None:
                ids[key] = int(vision.config[key])
    if audio is not None:
        for key in ("audio_token_id", "audio_start_token_id", "audio_end_token_id"):
            if _top(audio.config, key) is not None:
                ids[key] = int(_top(audio.config, key))
        tok = text.path / "tokenizer.json"
        if tok.is_file():  # released Qwen3-ASR frames audio with <|audio_start|> / <|audio_end|>
            added = {
                t["content"]: t["id"]
                for t in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens", [])
            }
            for key, token in (
                ("audio_start_token_id", "<|audio_start|>"),
                ("audio_end_token_id", "<|audio_end|>"),
            ):
                if key not in ids and token in added:
                    ids[key] = int(added[token])
    for key, v in overrides.items():
        if not key.endswith("_token_id"):
            raise ComposeError(f"placeholder_ids: unknown key {key!r} (keys end in _token_id)")
        ids[key] = int(v)
    vocab = int(text.text_config["vocab_size"])
    for key, v in ids.items():
        if not 0 <= v < vocab:
            raise ComposeError(
                f"{key} {v} is outside the text vocabulary (vocab_size {vocab}); set it with "
                "placeholder_ids"
            )
    if vision is not None and "image_token_id" not in ids:
        raise ComposeError(f"vision model {vision.path}: config.json has no image_token_id")
    if audio is not None and "audio_token_id" not in ids:
        raise ComposeError(f"audio model {audio.path}: config.json has no audio_token_id")
    return ids


def _tower_prefix(src: Source, prefixes: Sequence[str]) -> str:
    """The first of `prefixes` some tensor of `src` starts with (its vision / audio tower)."""
    prefix = next((p for p in prefixes if any(n.startswith(p) for n in src.names)), None)
    if prefix is None:
        raise ComposeError(
            f"{src.role} model {src.path}: no {src.role} tower (tensors under {prefixes})"
        )
    return prefix


def _plan_names(src: Source) -> None:
    """Fill `src.rename` / `src.take`: text -> TEXT_OUT, towers -> their output prefixes, the
    head -> lm_head.weight, anything else -> unused.<role>.* (excluded)."""
    src.rename[src.text_prefix or "embed_tokens."] = (
        TEXT_OUT if src.text_prefix else TEXT_OUT + "embed_tokens."
    )
    if src.text_prefix == "":  # a bare *Model checkpoint: map each top-level text name
        for name in src.names:
            if name.startswith(("layers.", "norm.")):
                src.rename[name.split(".")[0] + "."] = TEXT_OUT + name.split(".")[0] + "."
    if src.head is not None:
        src.rename[src.head] = HEAD_OUT
    if src.role == "vision":
        src.rename[_tower_prefix(src, VISION_PREFIXES)] = VISION_OUT
        src.take.append(VISION_OUT + "*")
    if src.role == "audio":
        prefix = _tower_prefix(src, AUDIO_PREFIXES)
        src.rename[prefix] = AUDIO_OUT
        for old, new in (("proj1.", "linear_1."), ("proj2.", "linear_2.")):
            if any(n.startswith(prefix + old) for n in src.names):
                src.rename[prefix + old] = PROJECTOR_OUT + new
        proj = next(
            (p for p in PROJECTOR_PREFIXES if any(n.startswith(p) for n in src.names)), None
        )
        if proj is not None:
            src.rename[proj] = PROJECTOR_OUT
        src.take += [AUDIO_OUT + "*"]
        if proj is not None or any(v.startswith(PROJECTOR_OUT) for v in src.rename.values()):
            src.take.append(PROJECTOR_OUT + "*")
        else:
            raise ComposeError(
                f"audio model {src.path}: no audio projector (multi_modal_projector.* or "
                "audio_tower.proj1/proj2)"
            )
    covered = list(src.rename)
    for name in sorted(src.names):
        if not any(name.startswith(old) for old in covered):
            src.rename[name] = f"{UNUSED_OUT}{src.role}.{name}"


def _vision_processor(src: Source, vision_config: dict[str, Any]) -> dict[str, Any]:
    path = src.path / IMAGE_PROCESSOR_FILE
    if path.is_file():
        return _read_json(path, "vision model")
    return image_processor_config(vision_config)


def _audio_processor(src: Source, audio_config: dict[str, Any]) -> dict[str, Any]:
    path = src.path / IMAGE_PROCESSOR_FILE  # Qwen3-ASR ships its feature extractor there
    if path.is_file():
        cfg = _read_json(path, "audio model")
        if "feature_size" in cfg:
            return cfg
    return audio_processor_config(audio_config)


def composite_config(
    text: Source,
    vision: Source | None,
    audio: Source | None,
    ids: dict[str, int],
    weights: list[float],
    dtype: str | None,
    rope_from: Source | None = None,
) -> dict[str, Any]:
    """The config.json of the composed checkpoint (see the module docstring)."""
    given = [s for s in (text, vision, audio) if s is not None]
    chosen = rope_from or text
    text_config = {
        k: v
        for k, v in text.text_config.items()
        if k not in ("architectures", "rope_theta", "rope_scaling", "rope_parameters")
    }
    text_config["model_type"] = "qwen3"
    text_config["is_causal"] = False
    text_config["rope_parameters"] = rope_parameters(chosen.text_config)
    text_config["rope_theta"] = text_config["rope_parameters"]["rope_theta"]  # legacy readers
    if chosen.text_config.get("max_position_embeddings") is not None:
        text_config["max_position_embeddings"] = chosen.text_config["max_position_embeddings"]
    out: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": ["BidirLMOmniModel"],
        "text_config": text_config,
        "merge_weights": {"text": weights[0]},
        "rope_from": chosen.role,
        "differing_fields": differing_fields(given),
        **ids,
    }
    i = 1
    if vision is not None:
        vc = _sub(vision.config, "vision_config")
        if vc is None:
            raise ComposeError(f"vision model {vision.path}: config.json has no vision_config")
        out["vision_config"] = vc
        section = _mrope_section(vision.text_config)
        head_dim = text_config.get("head_dim") or (
            text_config["hidden_size"] // text_config["num_attention_heads"]
        )
        if section is None:
            section = [24, 20, 20]  # Qwen3-VL's default
        if sum(section) != head_dim // 2:
            raise ComposeError(
                f"vision model {vision.path}: mrope_section {section} does not sum to head_dim/2 "
                f"= {head_dim // 2}"
            )
        out["mrope_section"] = section
        out["merge_weights"]["vision"] = weights[i]
        i += 1
    if audio is not None:
        ac = _sub(audio.config, "audio_config")
        if ac is None:
            raise ComposeError(f"audio model {audio.path}: config.json has no audio_config")
        ac["model_type"] = "qwen3_asr_encoder"
        out["audio_config"] = ac
        out["merge_weights"]["audio"] = weights[i]
    if dtype:
        out["dtype"] = dtype
        out["text_config"]["dtype"] = dtype
    return out


def compose_omni(
    text: str | os.PathLike,
    vision: str | os.PathLike | None = None,
    audio: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    placeholder_ids: dict[str, int] | None = None,
    rope_from: str | None = None,
    shard_size: str | int = "5GB",
    threads: int | None = None,
    force: bool = False,
) -> MergeResult:
    """Compose the omnimodal checkpoint `output` from a text encoder and specialists.

    `weights` (one per given source, in the order text, vision, audio; default equal) weigh the
    linear average of the text backbones (normalized by their sum); `dtype` / `out_dtype` are the
    merger's (arithmetic in float32 by default, output in the inputs' promoted dtype).
    `placeholder_ids` overrides token ids read from the specialists' configs (keys such as
    `image_token_id`). `rope_from` ("text", "vision" or "audio"; default "vision" when a vision
    model is given, else "text") names the source whose RoPE parameters and
    `max_position_embeddings` the composite takes (see the module docstring; `policy_line` of
    the written config says what differed). Raises `ComposeError` (a `ValueError`) naming the
    mismatch before anything is written. Returns the merger's `MergeResult` (its `output` is
    `output`).
    """
    if output is None:
        raise ComposeError("output: the folder to write is required")
    if vision is None and audio is None:
        raise ComposeError("compose needs a vision model, an audio model or both besides text")
    sources = [_load_source("text", text)]
    if vision is not None:
        sources.append(_load_source("vision", vision))
    if audio is not None:
        sources.append(_load_source("audio", audio))
    resolved = [s.path.resolve() for s in sources]
    if len(set(resolved)) != len(resolved):
        raise ComposeError("the text, vision and audio models must be different folders")
    if weights is None:
        weights = [1.0] * len(sources)
    weights = [float(w) for w in weights]
    if len(weights) != len(sources):
        raise ComposeError(
            f"weights: got {len(weights)} values for {len(sources)} models "
            f"({', '.join(s.role for s in sources)})"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ComposeError(f"weights must be >= 0 with a positive sum, got {weights}")
    check_compatible(sources)
    chosen = resolve_rope_from(sources, rope_from)
    if not any((sources[0].path / f).is_file() for f in TOKENIZER_FILES):
        raise ComposeError(
            f"text model {sources[0].path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}"
            ", ...); the composite takes its tokenizer from the text model"
        )
    by_role = {s.role: s for s in sources}
    ids = _placeholders(
        by_role["text"], by_role.get("vision"), by_role.get("audio"), dict(placeholder_ids or {})
    )
    for src in sources:
        _plan_names(src)
    excludes = []
    if any(s.head is None for s in sources) and any(s.head is not None for s in sources):
        excludes.append(HEAD_OUT)  # a head only some sources have cannot be averaged
    if any(v.startswith(UNUSED_OUT) for s in sources for v in s.rename.values()):
        excludes.append(UNUSED_OUT + "*")
    data: dict[str, Any] = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(s.path),
                "parameters": {"weight": w},
                "rename": s.rename,
                **({"take": s.take} if s.take else {}),
            }
            for s, w in zip(sources, weights)
        ],
        "parameters": {"normalize": True},
        "tokenizer_from": str(sources[0].path),
    }
    if excludes:
        data["exclude"] = excludes
    if dtype:
        data["dtype"] = dtype
    if out_dtype:
        data["out_dtype"] = out_dtype
    config = config_from_dict(data)
    final = composite_config(
        by_role["text"],
        by_role.get("vision"),
        by_role.get("audio"),
        ids,
        weights,
        out_dtype or dtype,
        chosen,
    )
    if HEAD_OUT in excludes:
        final["text_config"]["tie_word_embeddings"] = True
    output = Path(output)
    folder = AtomicFolder(output, force=force, inputs=[s.path for s in sources])
    folder.error = ComposeError
    with folder as tmp:
        staged = tmp / "weights"
        result = merge_from_config(config, staged, shard_size=shard_size, threads=threads)
        for entry in staged.iterdir():
            if entry.name == "config.json":  # replaced by the composite config below
                entry.unlink()
            else:
                os.replace(entry, tmp / entry.name)
        staged.rmdir()
        if not any((tmp / f).is_file() for f in TOKENIZER_FILES):
            for fname in TOKENIZER_FILES:
                if (sources[0].path / fname).is_file():
                    shutil.copyfile(sources[0].path / fname, tmp / fname)
        for stale in (
            "preprocessor_config.json",
            "processor_config.json",
            "generation_config.json",
        ):
            (tmp / stale).unlink(missing_ok=True)
        if "vision" in by_role:
            image = _vision_processor(by_role["vision"], final["vision_config"])
            (tmp / IMAGE_PROCESSOR_FILE).write_text(json.dumps(image, indent=2) + "\n")
        if "audio" in by_role:
            feats = _audio_processor(by_role["audio"], final["audio_config"])
            (tmp / AUDIO_PROCESSOR_FILE).write_text(json.dumps(feats, indent=2) + "\n")
        text = json.dumps(final, indent=2, sort_keys=True) + "\n"
        (tmp / "config.json").write_text(text, encoding="utf-8")
        folder.commit()
    return MergeResult(
        output=output,
        tensors=result.tensors,
        shards=result.shards,
        bytes=result.bytes,
        seconds=result.seconds,
    )


__all__ = [
    "ComposeError",
    "check_compatible",
    "compose_omni",
    "composite_config",
    "differing_fields",
    "policy_line",
    "rope_parameters",
]
