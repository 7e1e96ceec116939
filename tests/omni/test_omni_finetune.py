"""Modality fine-tuning (issue 25): the `sequence-classification` phase, `bidirlm eval --task` and
`bidirlm predict` on records `{"image": path, "text", "label"}` / `{"audio": path, "text",
"label"}` with a tiny composed omni model: dev metrics reported (float32 and bf16), towers frozen
by default (trainable on request), the classifier folder reloads with its head, packing does not
change a prediction, and a missing media file is one line naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.cli import main
from bidirlm.runtime import compose_omni, load_model
from bidirlm.runtime.models.media import write_wav
from bidirlm.runtime.training import load_train_config, train
from bidirlm.runtime.training.task_data import (
    TaskRecords,
    check_task,
    collate,
    encode_records,
    read_records,
)
from bidirlm.runtime.training.task_eval import predict_logits
from tests.omni.helpers import bits_equal, image, specialists, tensors, tone

TOWERS = ("model.visual.", "model.audio_tower.", "model.multi_modal_projector.")


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("omni_ft")
    parts = specialists(root)
    omni = compose_omni(parts["text"], parts["vision"], parts["audio"], root / "omni").output
    data = root / "data"
    (data / "media").mkdir(parents=True)
    img, aud = [], []
    for i in range(8):
        # image label: bright vs dark picture; audio label: low vs high tone
        pic = image(i)
        if i % 2:
            pic = pic.point(lambda v: v // 4)
        pic.save(data / "media" / f"{i}.png")
        clip = tone(220 if i % 2 == 0 else 1800, seconds=0.4)
        write_wav(data / "media" / f"{i}.wav", clip["array"], 16000)
        q = ["is it bright?", "what is the picture?", "describe it", "any light?"][i % 4]
        img.append({"image": f"media/{i}.png", "text": q, "label": "dark" if i % 2 else "bright"})
        aud.append({"audio": f"media/{i}.wav", "text": "pitch?", "label": ["low", "high"][i % 2]})
    # a text-only record beside the media ones: both kinds mix in one batch
    img.append({"text": "no picture at all", "label": "bright"})
    paths = {
        "image": _write(data / "image.jsonl", img),
        "audio": _write(data / "audio.jsonl", aud),
    }
    return {"omni": omni, "data": data, **paths, "root": root}


def _config(setup, kind: str, output: Path, *extra: str, source: Path | None = None):
    toml = f"""
model = "{setup["omni"]}"
phase = "sequence-classification"
[train]
output = "{output}"
steps = 4
seed = 0
progress_bar = false
log_every = 0
checkpoint_every = 0
[optim]
lr = 2e-3
[data]
batch_size = 4
max_seq_len = 16
[task]
dev = "{setup[kind]}"
eval_every = 2
head_lr_multiplier = 10.0
[[data.sources]]
path = "{source or setup[kind]}"
"""
    path = output.parent / f"{output.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml)
    return load_train_config(path, list(extra))


def _rows(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("kind", "dtype"), [("image", "float32"), ("audio", "float32"), ("image", "bfloat16")]
)
def test_media_classification_reports_dev_metrics(
    setup, tmp_path: Path, kind: str, dtype: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    final = train(_config(setup, kind, out, f"train.dtype={dtype}"))
    rows = _rows(out)
    evals = [r for r in rows if "dev" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0.0 <= r["dev"]["accuracy"] <= 1.0 and r["dev"]["n"] == (9 if kind == "image" else 8)
        assert r["dev_score"] == r["dev"]["accuracy"]
    assert all(abs(r["loss"]) < 1e3 for r in rows)
    printed = capsys.readouterr().err
    assert "step 2/4 dev accuracy" in printed and "step 4/4 dev accuracy" in printed
    best = json.loads((out / "best.json").read_text())
    assert f"best accuracy {best['score']:.4f} at step {best['step']}" in printed
    # towers frozen (bit-identical), the text backbone and the head trained
    before, after = tensors(setup["omni"]), load_file(final / "model.safetensors")
    changed = 0
    for name, t in before.items():
        if name.startswith(TOWERS):
            assert bits_equal(after[name], t), name
        elif name in after:
            changed += not torch.equal(after[name].float(), t.float())
    assert changed > 5 and "score.weight" in after
    # the classifier folder reloads with its head; eval --task agrees with best.json
    model = load_model(out / "best", dtype=torch.float32)
    assert model.head is not None and model.head.labels == sorted(model.head.labels)
    metrics = out / "eval.json"
    assert (
        main(["eval", str(out / "best"), "--task", str(setup[kind]), "--output", str(metrics)]) == 0
    )
    got = json.loads(metrics.read_text())
    if dtype == "float32":
        assert got["accuracy"] == pytest.approx(best["score"])
    preds = out / "pred.jsonl"
    assert (
        main(["predict", str(out / "best"), "--input", str(setup[kind]), "--output", str(preds)])
        == 0
    )
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == len(read_records(str(setup[kind])))
    assert all(r["prediction"] in model.head.labels and 0 < r["score"] <= 1 for r in lines)


def test_train_towers_option(setup, tmp_path: Path) -> None:
    out = tmp_path / "run"
    final = train(_config(setup, "image", out, "train.steps=2", "task.train_towers=true"))
    before, after = tensors(setup["omni"]), load_file(final / "model.safetensors")
    moved = [
        n for n in before if n.startswith("model.visual.") and not bits_equal(after[n], before[n])
    ]
    assert moved  # the vision tower trained


def test_packing_does_not_change_predictions(setup) -> None:
    from bidirlm.runtime.training.phases.finetune import attach_head
    from bidirlm.runtime.training.task_config import TaskConfig

    model = load_model(setup["omni"], dtype=torch.float32)
    records = read_records(str(setup["image"]))
    spec = check_task("sequence", TaskConfig(), [str(setup["image"])])
    attach_head(model, _config(setup, "image", setup["root"] / "packing"), spec)
    model.eval()
    enc = dict(kind="sequence", labels=spec.labels, problem_type="single_label", max_len=16)
    examples = encode_records(records, model.tokenizer, **enc)
    logits = dict(kind="sequence", problem_type="single_label")
    together = predict_logits(model, examples, batch_size=9, **logits)
    alone = predict_logits(model, examples, batch_size=1, **logits)
    assert together.shape == (9, 2)
    torch.testing.assert_close(
        torch.from_numpy(together), torch.from_numpy(alone), atol=2e-5, rtol=1e-4
    )
    # the image's tokens come first, the text after: another image changes the prediction
    batch = collate(examples[:1], "sequence", "single_label")
    assert batch.media is not None and batch.media[0][0] == "image"
    other_image = {**records.rows[0][1], "image": str(setup["data"] / "media" / "1.png")}
    swapped = encode_records(TaskRecords("x", [(1, other_image)]), model.tokenizer, **enc)
    other = predict_logits(model, swapped, **logits)
    assert not torch.allclose(torch.from_numpy(other[0]), torch.from_numpy(together[0]))


def test_missing_media_file_is_one_line(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = [json.loads(x) for x in setup["image"].read_text().splitlines()]
    rows[2]["image"] = "media/nope.png"
    bad = _write(setup["data"] / "bad.jsonl", rows)
    _config(setup, "image", tmp_path / "run", source=bad)
    assert main(["train", str(tmp_path / "run.toml")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:3: image file" in err[0] and "nope.png" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_media_records_need_an_omni_model(setup, tmp_path: Path) -> None:
    config = _config(setup, "audio", tmp_path / "run", "model=embedded:tiny")
    with pytest.raises(
        ValueError, match=r"audio\.jsonl:1: an audio record, but the model .* is text-only"
    ):
        train(config)
