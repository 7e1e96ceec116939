"""Vocabulary alignment for `tokenizer_source:` (mergekit's `BuildTokenizer` and
`PermutedVocabulary`, same rules and same arithmetic).

With `tokenizer_source: base`, a folder, or `union`, every vocabulary tensor (embeddings and LM
head, rows = tokens) gets one row per token of the output tokenizer, taken from each model by
token string, and `vocab_size` in config.json becomes the output tokenizer's length. So a model
whose `vocab_size` (512) exceeds its tokenizer (504 tokens) is cut to 504 rows, as mergekit
does. A token missing from some models gets, in those models, the row of the only model that
has it, else the base's, else the average of the models that have it (zeros when none has it).
When every output token sits at the same row in every model (the common case: one tokenizer,
padded embeddings), the rows are a prefix and the tensor still streams slice by slice.
`tokenizer: {source, pad_to_multiple_of: N}` rounds the rows up to a multiple of N, the extra
rows holding each model's mean embedding (before the merge), as mergekit.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TOKENIZER_MARKERS, MergeConfig, MergeError, has_tokenizer

LOG = logging.getLogger(__name__)


@dataclass
class Alignment:
    """The output vocabulary and, per model, the source row of each output row (-1: none)."""

    rows: int
    maps: list[list[int]]  # maps[model][out_row]
    prefix: bool  # every map is the identity on [0, rows): a plain truncation
    tokenizer: Any = None  # a tokenizer to save (union or stripped), None: copy the files
    vocab: dict[str, int] = field(default_factory=dict)


def config_vocab_size(folder: Path) -> int | None:
    """`vocab_size` from a model folder's config.json (top level, else `text_config`)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = cfg.get("vocab_size")
    if size is None and isinstance(cfg.get("text_config"), dict):
        size = cfg["text_config"].get("vocab_size")
    return int(size) if isinstance(size, int) else None


def _load(folder: Path) -> Any:
    # transformers builds an empty tokenizer from config.json alone: refuse such a folder
    if not has_tokenizer(folder):
        raise MergeError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_MARKERS)})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def _stripped(folder: Path, label: str) -> tuple[Any, bool]:
    """The model's tokenizer without tokens at ids >= its `vocab_size` (mergekit's
    `get_stripped_tokenizer`); True when something was stripped."""
    import tokenizers

    try:
        tok = _load(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise MergeError(f"cannot load the tokenizer of model {label}: {exc}") from None
    size = config_vocab_size(folder) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok, False
    data = json.loads(tok._tokenizer.to_str())
    if not tok.is_fast or data["model"]["type"] != "BPE":
        raise MergeError(
            f"model {label} has tokens past its vocab_size and a non-BPE tokenizer: "
            "tokenizer alignment needs a BPE tokenizer"
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m: Any) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok, True


def _union(base_tok: Any, toks: list[tuple[Path, Any]]) -> Any:
    """mergekit's `build_union_tokenizer`: the base tokenizer plus every other model's tokens
    (below its vocab_size) as added tokens, then every added token, first settings winning."""
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for folder, tok in toks:
        size = config_vocab_size(folder) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_contents = {info.content for info in added.values()}
        # mergekit walks `get_vocab()` in its (Rust hash map) order, which changes from one
        # load to the next, so its added-token ids vary between runs; we walk by token id:
        # deterministic, and the same token -> embedding row mapping as mergekit.
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= size or t in added_contents:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in sorted(added.items()):
            if i < size:
                out_added.setdefault(info.content, info)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # a copy: never mutate the base tokenizer
        base_tok.save_pretrained(tmp, legacy_format=False)
        res = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def build_alignment(config: MergeConfig) -> Alignment | None:
    """The vocabulary alignment `config.tokenizer_source` asks for (None when not set)."""
    source = config.tokenizer_source
    if source is None:
        return None
    models = config.models
    base = config.base_index if config.base_index is not None else 0
    base_tok, stripped = _stripped(models[base].path, models[base].label)
    toks: dict[int, Any] = {base: base_tok}
    for i, spec in enumerate(models):
        if i == base:
            continue
        try:
            toks[i] = _load(spec.path)
        except Exception:  # noqa: BLE001 - mergekit: assume the base's tokenizer
            LOG.warning("no tokenizer in model %s: assuming the base's", spec.label)
    save = None
    if source == "base":
        out_tok = base_tok
        save = base_tok if stripped else None
    elif source == "union":
        out_tok = _union(base_tok, [(models[i].path, t) for i, t in toks.items()])
        save = out_tok
    else:
        try:
            out_tok = _load(Path(source))
        except Exception as exc:  # noqa: BLE001
            msg = f"cannot load the tokenizer of tokenizer_source {source}: {exc}"
            raise MergeError(msg) from None
    vocab = out_tok.get_vocab()
    rows = len(vocab)
    pad = config.pad_to_multiple_of
    if pad and rows % pad:  # extra rows: the mean of the real ones (mergekit)
        rows += pad - rows % pad
    maps = []
    for i, spec in enumerate(models):
        model_vocab = toks.get(i, base_tok).get_vocab()
        size = config_vocab_size(spec.path) or len(model_vocab)
        row_map = [-1] * rows
        for t, new in vocab.items():
            old = model_vocab.get(t)
            if old is not None and old < size:
                row_map[new] = old
        maps.append(row_map)
    prefix = rows == len(vocab) and all(m == list(range(rows)) for m in maps)
    return Alignment(rows=rows, maps=maps, prefix=prefix, tokenizer=save, vocab=vocab)


def align_rows(
    xs: list[torch.Tensor], model_ids: list[int], base: int | None, alignment: Alignment
) -> list[torch.Tensor]:
    """mergekit's `PermutedVocabulary.execute` for one vocabulary tensor: `xs[k]` is model
    `model_ids[k]`'s tensor (rows = tokens), already in the merge dtype; returns one
    `[rows, ...]` tensor per input, in the promoted dtype."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    shape = xs[0].shape[1:]
    maps = [alignment.maps[m] for m in model_ids]
    defaults: dict[int, torch.Tensor] = {}
    for t, row in alignment.vocab.items():
        present = [k for k, mp in enumerate(maps) if mp[row] >= 0]
        if len(present) == len(maps):
            continue
        if len(present) == 1:  # the only model that has it
            embed = xs[present[0]][maps[present[0]][row]]
        elif not present:
            LOG.warning("token %r is in no model: zero embedding", t)
            embed = torch.zeros(shape, dtype=xs[0].dtype)
        elif base is not None and base in model_ids and maps[model_ids.index(base)][row] >= 0:
            k = model_ids.index(base)
            embed = xs[k][maps[k][row]]
        else:  # the mean over the models that have it, in mergekit's order and dtype
            embed = torch.zeros(shape, dtype=dtype)
            for k in present:
                embed = embed + xs[k][maps[k][row]]
            embed /= len(present)
        defaults[row] = embed
    out = []
    for k, x in enumerate(xs):
        new = torch.zeros((alignment.rows, *shape), dtype=dtype)
        src = torch.tensor(maps[k])
        have = src >= 0
        new[have] = x[src[have]].to(dtype)
        for row, embed in defaults.items():
            if maps[k][row] < 0:
                new[row] = embed
        n = len(alignment.vocab)
        if alignment.rows > n:  # pad_to_multiple_of: padding rows are the mean embedding
            new[n:] = torch.mean(new[:n], dim=0)
        out.append(new)
    return out


# --- chat templates (mergekit's `chat_template:` key) ---------------------------------------------

# ChatML, written for bidirlm: each message as <|im_start|>ROLE\nCONTENT<|im_end|>\n.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}
MERGEKIT_ONLY_TEMPLATES = ("alpaca", "exaone", "llama3", "mistral")


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (its "default" entry when it is a list of named templates)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip() or None
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str, models: list[Path]) -> str | None:
    """mergekit's `chat_template:`: "auto" (the template most input models share, None when
    none has one), a template name (chatml) or Jinja text (at least 20 characters with a `{`)."""
    if value == "auto":
        found = [t for t in (model_chat_template(m) for m in models) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if value in MERGEKIT_ONLY_TEMPLATES:
        raise MergeError(
            f"chat_template {value!r} is a template file shipped with mergekit, not with bidirlm: "
            "give its Jinja text instead (or auto / chatml)"
        )
    if len(value) < 20 or "{" not in value:
        raise MergeError(
            f"chat_template {value!r} is neither auto, a template name (chatml) nor Jinja text"
        )
    return value


def write_chat_template(folder: Path, template: str) -> None:
    """Make `template` the chat template of the tokenizer files in `folder`
    (chat_template.jinja, which transformers reads first; stale copies elsewhere removed)."""
    with open(folder / "chat_template.jinja", "w", encoding="utf-8") as fh:
        fh.write(template)
        fh.flush()
        os.fsync(fh.fileno())
    (folder / "chat_template.json").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and "chat_template" in cfg:
            del cfg["chat_template"]
            with open(cfg_path, "w", encoding="utf-8") as fh:
                json.dump(cfg, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
