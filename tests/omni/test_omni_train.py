"""The multimodal contrastive phase on a composed tiny omni model: image/audio/text records, one
source per batch, frozen towers stay bit-identical, gradient cache, bf16, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.runtime import compose_omni
from bidirlm.runtime.models.media import write_wav
from bidirlm.runtime.training import load_train_config, train
from bidirlm.runtime.training.trainer import TrainingInterrupted
from tests.omni.helpers import bits_equal, image, specialists, tensors, tone

TOWERS = ("model.visual.", "model.audio_tower.", "model.multi_modal_projector.")


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("omni_train")
    parts = specialists(root)
    omni = compose_omni(parts["text"], parts["vision"], parts["audio"], root / "omni").output
    data = root / "data"
    (data / "media").mkdir(parents=True)
    words = ["red", "green", "blue", "apple", "river", "stone", "cloud", "piano"]
    rows: dict[str, list[dict]] = {"image": [], "audio": [], "text": []}
    for i, w in enumerate(words):
        image(i).save(data / "media" / f"{i}.png")
        clip = tone(200 + 90 * i, seconds=0.5)
        write_wav(data / "media" / f"{i}.wav", clip["array"], 16000)
        rows["image"].append({"query": {"image": f"media/{i}.png"}, "positive": f"a {w}"})
        rows["audio"].append(
            {
                "query": {"audio": f"media/{i}.wav"},
                "positive": f"the sound {w}",
                "negatives": [{"audio": f"media/{(i + 1) % 8}.wav"}],
            }
        )
        rows["text"].append({"query": f"what is {w}", "positive": f"{w} is a word"})
    for kind, records in rows.items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (data / f"{kind}.jsonl").write_text(lines)
    toml = f"""
model = "{omni}"
phase = "contrastive"
[train]
output = "unused"
steps = 4
seed = 0
progress_bar = false
[optim]
lr = 1e-3
[data]
batch_size = 4
query_max_len = 16
document_max_len = 16
negatives_per_query = 1
[contrastive]
temperature = 0.05
mini_batch_size = 0
[[data.sources]]
path = "{data / "text.jsonl"}"
weight = 0.65
[[data.sources]]
path = "{data / "image.jsonl"}"
weight = 0.175
[[data.sources]]
path = "{data / "audio.jsonl"}"
weight = 0.175
"""
    (root / "omni.toml").write_text(toml)
    return {"omni": omni, "config": root / "omni.toml", "data": data}


def _config(setup, output: Path, *extra: str):
    return load_train_config(setup["config"], [f"train.output={output}", *extra])


def _losses(output: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (output / "metrics.jsonl").read_text().splitlines()]


def test_contrastive_towers_frozen_and_model_reloads(setup, tmp_path: Path) -> None:
    from bidirlm.runtime import load_model

    final = train(_config(setup, tmp_path / "run", "train.steps=6"))
    before, after = tensors(setup["omni"]), load_file(final / "model.safetensors")
    assert set(before) == set(after)
    changed = 0
    for n in before:
        if n.startswith(TOWERS):
            assert bits_equal(after[n], before[n]), n
        else:
            changed += not torch.equal(after[n].float(), before[n].float())
    assert changed > 10  # the text backbone trained
    losses = _losses(tmp_path / "run")
    assert all(map(lambda x: x == x and abs(x) < 1e3, losses)) and len(losses) == 6
    model = load_model(final)
    emb = model.encode(
        ["red", str(setup["data"] / "media" / "0.png"), str(setup["data"] / "media" / "0.wav")]
    )
    assert emb.shape == (3, model.hidden_size) and torch.isfinite(emb).all()


def test_gradient_cache_matches_full_batch(setup, tmp_path: Path) -> None:
    a = train(_config(setup, tmp_path / "a", "train.steps=2"))
    b = train(_config(setup, tmp_path / "b", "train.steps=2", "contrastive.mini_batch_size=3"))
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for n in wa:
        torch.testing.assert_close(wa[n].float(), wb[n].float(), atol=2e-5, rtol=1e-3)


def test_resume_is_exact(setup, tmp_path: Path) -> None:
    args = ("train.steps=4", "train.checkpoint_every=1")
    straight = train(_config(setup, tmp_path / "a", *args))
    config = _config(setup, tmp_path / "b", *args)
    with pytest.raises(TrainingInterrupted):
        train(config, stop_after=2)
    resumed = train(config)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_autocast_runs(setup, tmp_path: Path) -> None:
    final = train(_config(setup, tmp_path / "bf", "train.steps=2", "train.dtype=bfloat16"))
    losses = _losses(tmp_path / "bf")
    assert len(losses) == 2 and all(abs(x) < 1e3 for x in losses)
    after = load_file(final / "model.safetensors")
    before = tensors(setup["omni"])
    for n in before:
        if n.startswith(TOWERS):
            assert bits_equal(after[n], before[n]), n


def test_media_record_needs_omni_model(setup, tmp_path: Path) -> None:
    # the image and audio sources are drawn within a few steps
    config = _config(setup, tmp_path / "t", "model=embedded:tiny", "train.steps=8")
    with pytest.raises(ValueError, match="model is text-only"):
        train(config)


def test_train_towers_option_unfreezes_them(setup, tmp_path: Path) -> None:
    final = train(_config(setup, tmp_path / "tt", "train.steps=8", "contrastive.train_towers=true"))
    before, after = tensors(setup["omni"]), load_file(final / "model.safetensors")
    moved = [n for n in before if n.startswith(TOWERS) and not torch.equal(after[n], before[n])]
    assert any(n.startswith("model.visual.") for n in moved)
    assert any(n.startswith("model.audio_tower.") for n in moved)
    text_only = _config(
        setup, tmp_path / "x", "model=embedded:tiny", "contrastive.train_towers=true"
    )
    with pytest.raises(ValueError, match="train_towers: the model has no vision/audio tower"):
        train(text_only)


def test_bad_media_record_is_named(setup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": {"video": "x.mp4"}, "positive": "a"}) + "\n")
    config = _config(setup, tmp_path / "o", f"data.sources.0.path={bad}")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 field 'query' is dict, not text or"):
        train(config)
