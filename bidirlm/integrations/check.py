"""`bidirlm check MODEL`: prove that a checkpoint runs bidirectionally, everywhere it loads.

The commonest complaint about LLM-derived encoders is a model that is silently causal at inference,
or that gives other results on another attention backend (llm2vec #79, #144). `check_model` runs
one small experiment per claim and returns one `Check` per line:

- `bidirectional`: the model as its config.json records it (`load_model(..., bidirectional=None)`)
  is fed a random sequence twice, differing only in its last token. A bidirectional encoder
  changes the output at every earlier position; a causal one at none of them.
- `backends`: transformers' own model for the folder with `attn_implementation` "eager", "sdpa"
  and "bidirlm" (our kernel, through `bidirlm.integrations.transformers.register`) gives our
  encoder's hidden states within float32 tolerance.
- `sentence-transformers`: the folder's sentence-transformers form (the folder itself when it
  has a `modules.json`, else a fresh `export_sentence_transformers` into a temporary folder) gives
  `Encoder.encode`'s embeddings.

Everything runs in float32 on the CPU (or `device`); nothing is written outside a temporary folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bidirlm.integrations.sentence_transformers import export_sentence_transformers
from bidirlm.integrations.transformers import register
from bidirlm.kernels.dispatch import decide
from bidirlm.runtime.models import load_model

# float32 agreement between two implementations of the same math: |a - b| <= ATOL + RTOL * |b|max
ATOL, RTOL = 1e-4, 1e-4
# an output counts as changed when it moves by more than this (float32 noise is ~1e-6)
CHANGED = 1e-5
PROBE_TEXTS = (
    "Bidirectional encoders see the whole sentence at once.",
    "A causal model only looks to the left.",
    "short",
)


@dataclass(frozen=True)
class Check:
    """One line of the report: `name`, pass/fail and the measured reason."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def _probe_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = min(8, max(vocab - 2, 0))  # keep clear of the usual special ids
    return torch.randint(low, vocab, (1, length), generator=g)


def _max_change(fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Per earlier position, how far its output moves when only the last token changes."""
    other = ids.clone()
    other[0, -1] = ids[0, -1] - 1 if ids[0, -1] > 8 else ids[0, -1] + 1
    with torch.no_grad():
        a, b = fn(ids), fn(other)
    return (a[0, :-1] - b[0, :-1]).abs().amax(dim=-1)


def _text_encoder(encoder):  # noqa: ANN001, ANN202
    return encoder.text_encoder() if hasattr(encoder, "text_encoder") else encoder


def check_bidirectional(encoder, length: int = 16) -> Check:  # noqa: ANN001
    """Does changing the last token change every earlier position's output?"""
    enc = _text_encoder(encoder)
    ids = _probe_ids(enc.config.vocab_size, length).to(next(enc.parameters()).device)
    moved = _max_change(lambda x: enc(x), ids)
    changed = int((moved > CHANGED).sum())
    earlier = length - 1
    if changed == earlier:
        return Check(
            "bidirectional",
            True,
            f"changing the last token changes all {earlier} earlier positions "
            f"(smallest change {float(moved.min()):.2e})",
        )
    if changed == 0:
        return Check(
            "bidirectional",
            False,
            f"the model is causal: changing the last token changes none of the {earlier} earlier "
            "positions (config.json records causal attention: Qwen3 `is_causal`, Gemma3 "
            "`use_bidirectional_attention`)",
        )
    return Check(
        "bidirectional",
        False,
        f"only {changed} of {earlier} earlier positions see the last token (a window or a mask "
        "hides the rest)",
    )


def _agree(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    err = float((a.float() - b.float()).abs().max())
    return err <= ATOL + RTOL * float(b.float().abs().max()), err


def check_backends(folder: Path, encoder, length: int = 16) -> Check:  # noqa: ANN001
    """transformers' eager / sdpa / bidirlm attention give our hidden states."""
    from transformers import AutoConfig, AutoModel  # optional dependency ([st] extra)

    enc = _text_encoder(encoder)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") == "bidirlm_omni":
        return Check("backends", True, "skipped: transformers has no class for bidirlm_omni")
    register()
    ids = _probe_ids(enc.config.vocab_size, length, seed=1)
    with torch.no_grad():
        ours = enc(ids)
    errors, failed = [], []
    for impl in ("eager", "sdpa", "bidirlm"):
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        hf = AutoModel.from_pretrained(
            folder,
            config=config,
            attn_implementation=impl,
            dtype=torch.float32,
            local_files_only=True,
        ).eval()
        with torch.no_grad():
            theirs = hf(input_ids=ids).last_hidden_state
        ok, err = _agree(theirs, ours)
        errors.append(f"{impl} {err:.1e}")
        if not ok:
            failed.append(impl)
    ran = decide(ids.device)
    detail = (
        f"max |transformers - bidirlm|: {', '.join(errors)} (bidirlm ran {ran.impl}: {ran.reason})"
    )
    if failed:
        return Check("backends", False, f"{', '.join(failed)} disagree(s) with bidirlm: {detail}")
    return Check("backends", True, detail)


def check_sentence_transformers(folder: Path, encoder) -> Check:  # noqa: ANN001
    """The sentence-transformers form gives `Encoder.encode`'s embeddings."""
    from sentence_transformers import SentenceTransformer  # optional dependency ([st] extra)

    enc = _text_encoder(encoder)
    if enc.tokenizer is None:
        return Check("sentence-transformers", True, "skipped: the folder has no tokenizer")
    with tempfile.TemporaryDirectory(prefix="bidirlm-check-") as tmp:
        if (folder / "modules.json").is_file():
            st_folder, what = folder, "the folder's own sentence-transformers form"
        else:
            st_folder, what = Path(tmp) / "st", "a fresh export"
            export_sentence_transformers(enc, st_folder, pooling="mean", max_length=64)
        st = SentenceTransformer(str(st_folder), device="cpu", local_files_only=True)
        pooling = _st_pooling(st_folder)
        normalize = (st_folder / "2_Normalize").is_dir() or any(
            "Normalize" in m.get("type", "") for m in _modules_json(st_folder)
        )
        theirs = st.encode(list(PROBE_TEXTS), convert_to_tensor=True).float().cpu()
    ours = enc.encode(list(PROBE_TEXTS), pooling=pooling, normalize=normalize, max_length=64)
    ok, err = _agree(theirs, ours)
    detail = f"{what} (pooling {pooling}): max |st - bidirlm| {err:.1e}"
    return Check("sentence-transformers", ok, detail if ok else f"embeddings differ: {detail}")


def _modules_json(folder: Path) -> list[dict]:
    path = folder / "modules.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _st_pooling(folder: Path) -> str:
    for module in _modules_json(folder):
        if "Pooling" in module.get("type", ""):
            cfg = json.loads((folder / module["path"] / "config.json").read_text(encoding="utf-8"))
            if cfg.get("pooling_mode_lasttoken"):
                return "last"
            if cfg.get("pooling_mode_cls_token"):
                return "first"
    return "mean"


def check_model(
    path: str | os.PathLike, *, device: str | torch.device | None = None
) -> list[Check]:
    """Run every check on the model folder `path`; one `Check` per line, in order."""
    from transformers.utils import logging as hf_logging  # optional dependency ([st] extra)

    hf_logging.disable_progress_bar()  # one line per check, no load/save bars
    folder = Path(path)
    encoder = load_model(folder, dtype=torch.float32, device=device, bidirectional=None).eval()
    checks = [check_bidirectional(encoder)]
    checks.append(check_backends(folder, encoder))
    if checks[0].ok:
        checks.append(check_sentence_transformers(folder, encoder))
    else:  # an export is always bidirectional: comparing it to a causal model proves nothing
        checks.append(
            Check("sentence-transformers", False, "not compared: the model is not bidirectional")
        )
    return checks
