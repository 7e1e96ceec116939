"""`bidirlm demo --omni [--quick]`: BidirLM-Omni end to end on embedded data, on a CPU.

1. Specialists: a tiny Qwen3-VL and a tiny Qwen3-ASR, built from configs with the embedded tiny
   text model's shape (`omni_specialists`), are briefly pre-trained so their towers mean
   something: each reads captions (names of Python's stdlib modules) rendered into images with
   PIL, or "spoken" as one tone per character (a synthetic voice: pitch, speed and loudness vary),
   and learns to match them to the caption text (InfoNCE, tower and text backbone trained).
2. Composition: `compose_omni` merges the text backbones of the embedded text encoder and the two
   specialists 1/3 each and attaches both towers unmerged.
3. The composed model is evaluated on new renderings and new voices of the captions
   (image->text, text->image, audio->text recall@1 and nDCG@10): "unaligned".
4. The contrastive phase (`bidirlm train`, `phase = "contrastive"`, towers frozen) on
   text-text, image-text and audio-text pairs, mixed by source weight; evaluated again:
   "aligned". Results in OUT/results.json, OUT/report.md and OUT/results.png.

Everything is generated here (no download). `--quick` takes a few minutes on one CPU core.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidirlm.kernels import infonce_loss
from bidirlm.recipe.omni_specialists import build_audio_specialist, build_vision_specialist
from bidirlm.runtime.embedded import embedded_tiny_model
from bidirlm.runtime.evaluation.crossmodal import evaluate_crossmodal
from bidirlm.runtime.merging.compose import compose_omni
from bidirlm.runtime.models import load_model
from bidirlm.runtime.models.media import write_wav
from bidirlm.runtime.training import load_train_config, train

CHAR_STEP = 0.08  # seconds per character of the synthetic voice (about one audio token)
RATE = 16000
CELL = 16  # pixels per rendered character: one vision-tower patch
MAX_CHARS = 10


@dataclass(frozen=True)
class OmniDemoSize:
    captions: int  # distinct captions (stdlib module names)
    train_variants: int  # renderings / voices per caption for training
    pretrain_steps: int  # specialist pre-training steps (each modality)
    align_steps: int  # contrastive phase steps of the composed model
    batch_size: int


SIZES = {
    "tiny": OmniDemoSize(
        captions=16, train_variants=2, pretrain_steps=60, align_steps=40, batch_size=8
    ),
    "quick": OmniDemoSize(
        captions=48, train_variants=4, pretrain_steps=200, align_steps=150, batch_size=16
    ),
    "full": OmniDemoSize(
        captions=128, train_variants=8, pretrain_steps=1000, align_steps=600, batch_size=32
    ),
}


def _log(msg: str) -> None:
    print(f"[omni-demo] {msg}", file=sys.stderr, flush=True)


def captions(n: int) -> list[str]:
    """`n` distinct stdlib module names of 3-10 lowercase letters (sorted, deterministic)."""
    names = sorted(
        m for m in sys.stdlib_module_names if m.isalpha() and m.islower() and 3 <= len(m) <= 10
    )
    if len(names) < n:
        raise ValueError(f"only {len(names)} captions available, {n} requested")
    rng = random.Random(0)
    return sorted(rng.sample(names, n))


def render(text: str, rng: random.Random) -> Any:
    """`text` drawn into a 16-pixel-high RGB image, one character per 16x16 cell (the tower's
    patch), with random jitter, colours and noise."""
    from PIL import Image, ImageDraw, ImageFont  # optional dependency ([omni] extra)

    bg = tuple(rng.randint(170, 255) for _ in range(3))
    img = Image.new("RGB", (CELL * len(text[:MAX_CHARS]), CELL), bg)  # no blank patches
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    for i, ch in enumerate(text[:MAX_CHARS]):
        fg = tuple(rng.randint(0, 90) for _ in range(3))
        draw.text((CELL * i + rng.randint(1, 5), rng.randint(-2, 1)), ch, fill=fg, font=font)
    arr = np.asarray(img).astype(np.int16)
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(-12, 13, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def speak(text: str, rng: random.Random) -> dict[str, Any]:
    """A synthetic voice: one tone per letter (its pitch codes the letter: 5 letters per octave
    from 150 Hz), with a small random pitch shift, speed and loudness per utterance; a 16 kHz
    audio item."""
    shift = rng.uniform(0.97, 1.03)
    step = CHAR_STEP * rng.uniform(0.9, 1.1)
    gain = rng.uniform(0.2, 0.5)
    n = int(step * RATE)
    t = np.arange(n) / RATE
    envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    pieces = []
    for ch in text:
        k = ord(ch) - ord("a") if ch.isalpha() else 26
        freq = 150.0 * 2 ** (k / 5.0) * shift
        pieces.append(gain * envelope * np.sin(2 * np.pi * freq * t))
    pad = np.zeros(int(0.05 * RATE))
    wave = np.concatenate([pad, *pieces, pad]).astype(np.float32)
    return {"array": wave, "sampling_rate": RATE}


def _pretrain(
    model: Any,
    pairs: list[tuple[Any, str]],
    steps: int,
    batch: int,
    seed: int,
    *,
    lr: float = 1e-3,
    temperature: float = 0.05,
    train_backbone: bool = True,
) -> list:
    """InfoNCE (symmetric) between media items and caption texts; the tower is trained, and the
    text backbone too when `train_backbone`."""
    for p in model.parameters():
        p.requires_grad_(train_backbone)
    model.freeze_towers(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        chosen: dict[str, tuple[Any, str]] = {}
        while len(chosen) < min(batch, len({c for _, c in pairs})):
            media, caption = pairs[rng.randrange(len(pairs))]
            chosen.setdefault(caption, (media, caption))  # one pair per caption: no false negatives
        items = list(chosen.values())
        q = model.embed_items([m for m, _ in items]).float()
        d = model.embed_items([c for _, c in items]).float()
        loss = infonce_loss(q, d, temperature=temperature, symmetric=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            _log(f"  step {step + 1}/{steps} loss {losses[-1]:.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.freeze_towers(True)
    return losses


def pretrain_specialist(
    text: Path, specialist: Path, kind: str, pairs: list, size: OmniDemoSize, work: Path
) -> Path:
    """Train `specialist` (its own text backbone, weight 0 for the text model) on `pairs`, and
    write it back in its own layout and config under work/<kind>-pretrained."""
    staged = work / f"{kind}-staged"
    compose_omni(text, output=staged, weights=[0.0, 1.0], **{kind: specialist})
    model = load_model(staged, dtype=torch.float32)
    losses = _pretrain(model, pairs, size.pretrain_steps, size.batch_size, seed=len(kind))
    out = work / f"{kind}-pretrained"
    model.save_pretrained(out)  # model.language_model.* + the tower: the specialist's names
    for name in ("config.json", "preprocessor_config.json", "audio_preprocessor_config.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(specialist / name, out / name)
    shutil.rmtree(staged)
    (out / "pretrain_losses.json").write_text(json.dumps(losses))
    return out


def _write_media(folder: Path, caps: list[str], variants: int, seed: int) -> dict[str, list]:
    """PNG and WAV files for each caption x variant; returns {"image": [(path, cap)], ...}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out: dict[str, list] = {"image": [], "audio": []}
    for i, cap in enumerate(caps):
        for v in range(variants):
            img = folder / f"{i}-{v}.png"
            render(cap, rng).save(img)
            wav = folder / f"{i}-{v}.wav"
            clip = speak(cap, rng)
            write_wav(wav, clip["array"], RATE)
            out["image"].append((img, cap))
            out["audio"].append((wav, cap))
    return out


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _align(omni: Path, work: Path, media: dict[str, list], caps: list[str], size: OmniDemoSize):
    """The contrastive phase with `bidirlm.runtime.training.train` (towers frozen)."""
    data = work / "align-data"
    data.mkdir(exist_ok=True)
    text_rows = [{"query": f"module {c}", "positive": c} for c in caps]
    text_rows += [{"query": f"import {c}", "positive": c} for c in caps]
    sources = {
        "text": (_jsonl(data / "text.jsonl", text_rows), 0.3),
        "image": (
            _jsonl(
                data / "image.jsonl",
                [{"query": {"image": str(p)}, "positive": c} for p, c in media["image"]],
            ),
            0.35,
        ),
        "audio": (
            _jsonl(
                data / "audio.jsonl",
                [{"query": {"audio": str(p)}, "positive": c} for p, c in media["audio"]],
            ),
            0.35,
        ),
    }
    toml = [
        f'model = "{omni}"',
        'phase = "contrastive"',
        "[train]",
        f'output = "{work / "align"}"',
        f"steps = {size.align_steps}",
        "seed = 0",
        "progress_bar = false",
        f"log_every = {max(1, size.align_steps // 5)}",
        "[optim]",
        "lr = 1e-3",
        'schedule = "wsd"',
        "warmup_steps = 5",
        "[data]",
        f"batch_size = {size.batch_size}",
        "query_max_len = 16",
        "document_max_len = 16",
        "negatives_per_query = 0",
        "[contrastive]",
        "temperature = 0.05",
        "symmetric = true",
    ]
    for path, weight in sources.values():
        toml += ["[[data.sources]]", f'path = "{path}"', f"weight = {weight}"]
    config_path = work / "align.toml"
    config_path.write_text("\n".join(toml) + "\n", encoding="utf-8")
    return train(load_train_config(config_path))


def evaluate_all(model: Any, task: Path) -> dict[str, dict[str, float]]:
    metrics = evaluate_crossmodal(model, task)
    return {k: v for k, v in metrics.items() if k != "task"}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional dependency ([train] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = list(results["unaligned"])
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    width = 0.2
    series = [
        ("unaligned", "recall@1", "#d9a0a0"),
        ("aligned", "recall@1", "#a8322d"),
        ("unaligned", "ndcg@10", "#9cc3e6"),
        ("aligned", "ndcg@10", "#3b6ea8"),
    ]
    for j, (variant, metric, color) in enumerate(series):
        xs = [i + (j - 1.5) * width for i in range(len(directions))]
        ys = [results[variant][d][metric] for d in directions]
        bars = ax.bar(xs, ys, width, color=color, label=f"{variant} {metric}")
        for bar in bars:
            ax.annotate(
                f"{bar.get_height():.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    chance = 1.0 / results["num_captions"]
    ax.axhline(chance, color="#808080", linestyle="--", linewidth=0.8, label="chance recall@1")
    ax.set_xticks(range(len(directions)), directions)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.set_title(
        f"BidirLM-Omni demo ({results['size']}): cross-modal retrieval over "
        f"{results['num_captions']} captions, before/after the contrastive phase",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(results: dict[str, Any]) -> str:
    lines = [
        f"# BidirLM-Omni demo ({results['size']})",
        "",
        f"{results['num_captions']} captions; test items are new renderings and new voices "
        "(never seen in training). Chance recall@1 = "
        f"{1 / results['num_captions']:.3f}. Time: {results['seconds']:.0f} s on "
        f"{results['device']}.",
        "",
        "| direction | unaligned R@1 | aligned R@1 | unaligned nDCG@10 | aligned nDCG@10 |",
        "|---|---|---|---|---|",
    ]
    for d in results["unaligned"]:
        u, a = results["unaligned"][d], results["aligned"][d]
        lines.append(
            f"| {d} | {u['recall@1']:.3f} | {a['recall@1']:.3f} | {u['ndcg@10']:.3f} | "
            f"{a['ndcg@10']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_omni_demo(out: str | Path, size_name: str = "quick") -> dict[str, Any]:
    """Run the demo into `out` (created; an existing results.json is replaced) and return the
    results dict (`unaligned`/`aligned` metrics per direction, timings, paths)."""
    from transformers import AutoConfig  # optional dependency ([omni] extra)

    if size_name not in SIZES:
        raise ValueError(f"size {size_name!r}: choose one of {', '.join(SIZES)}")
    size = SIZES[size_name]
    out = Path(out)
    work = out / "work"
    marker = work / ".bidirlm-omni-demo"
    if work.exists():
        if not marker.is_file():  # never delete a folder this demo did not create
            raise ValueError(f"{work} exists and was not made by the omni demo: choose another")
        shutil.rmtree(work)  # ours: created by a previous run of this demo (marker)
    work.mkdir(parents=True)
    marker.touch()
    start = time.perf_counter()
    torch.manual_seed(0)
    caps = captions(size.captions)
    text = embedded_tiny_model()
    cfg = AutoConfig.from_pretrained(text)
    _log(f"{len(caps)} captions; building tiny specialists")
    vision = build_vision_specialist(work / "vl", cfg)
    audio = build_audio_specialist(work / "asr", cfg)
    rng = random.Random(1)
    image_pairs = [(render(c, rng), c) for c in caps for _ in range(size.train_variants)]
    audio_pairs = [(speak(c, rng), c) for c in caps for _ in range(size.train_variants)]
    _log("pre-training the vision specialist")
    vision = pretrain_specialist(text, vision, "vision", image_pairs, size, work)
    _log("pre-training the audio specialist")
    audio = pretrain_specialist(text, audio, "audio", audio_pairs, size, work)
    omni = compose_omni(text, vision, audio, work / "omni").output
    _log(f"composed {omni}")
    train_media = _write_media(work / "train-media", caps, size.train_variants, seed=2)
    test_media = _write_media(work / "test-media", caps, 1, seed=3)
    task = _jsonl(
        work / "test.jsonl",
        [{"image": str(p), "text": c} for p, c in test_media["image"]]
        + [{"audio": str(p), "text": c} for p, c in test_media["audio"]],
    )
    unaligned = evaluate_all(load_model(omni), task)
    _log(f"unaligned: {json.dumps({k: round(v['recall@1'], 3) for k, v in unaligned.items()})}")
    final = _align(omni, work, train_media, caps, size)
    aligned = evaluate_all(load_model(final), task)
    _log(f"aligned: {json.dumps({k: round(v['recall@1'], 3) for k, v in aligned.items()})}")
    results = {
        "size": size_name,
        "num_captions": len(caps),
        "unaligned": unaligned,
        "aligned": aligned,
        "seconds": time.perf_counter() - start,
        "device": "cpu",
        "model": str(final),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(format_report(results))
    plot(results, out / "results.png")
    return results
