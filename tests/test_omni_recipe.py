"""The shipped Omni recipe (bidirlm/recipe/omni-2.5b.toml, issue 25): its phases (MNTP, 50/50
merge, compose, multimodal contrastive on the 65 / 17.5 / 17.5 mixture, towers frozen), its
`--check` (missing folders named in one line; present ones checked with compose's rules), and a
tiny version of it run end to end on checkpoints built from the real configs (sizes shrunk) of
Qwen3-1.7B, Qwen3-VL-2B-Instruct and Qwen3-ASR-1.7B, stored in bf16: every model the pipeline
writes stays bf16 (issue 24, item 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bidirlm.cli import main
from bidirlm.recipe.pipeline import (
    RECIPES_DIR,
    cast_checkpoint,
    load_recipe,
    run_pipeline,
)
from bidirlm.runtime import load_model
from bidirlm.runtime.models.media import write_wav
from bidirlm.runtime.training.config import dumps_toml, read_toml
from tests.omni.helpers import image, specialists, tone
from tests.real_models import build_paper_three

SHIPPED = RECIPES_DIR / "omni-2.5b.toml"
TOWERS = ("model.visual.", "model.audio_tower.", "model.multi_modal_projector.")


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def _lines(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 tiny real-shaped models and the recipe's data files, under one folder."""
    root = tmp_path_factory.mktemp("omni_recipe")
    models = build_paper_three(root / "models", dtype=torch.bfloat16)
    data = root / "data"
    words = ["red", "green", "blue", "apple", "river", "stone", "cloud", "piano"]
    prose = [
        f"the {w} is next to the {v} and the {u}" for w, v, u in zip(words, words[1:], words[2:])
    ]
    for name in ("english", "multilingual", "math", "code"):
        _lines(data / f"{name}.jsonl", [{"text": t} for t in prose])
    (data / "omni" / "media").mkdir(parents=True)
    rows: dict[str, list[dict]] = {"text": [], "audio": [], "image": []}
    for i, w in enumerate(words):
        image(i, (64, 64)).save(data / "omni" / "media" / f"{i}.png")
        write_wav(data / "omni" / "media" / f"{i}.wav", tone(200 + 90 * i, 0.4)["array"], 16000)
        rows["text"].append({"query": f"what is {w}", "positive": f"{w} is a word"})
        rows["audio"].append({"query": {"audio": f"media/{i}.wav"}, "positive": f"a sound {w}"})
        rows["image"].append({"query": {"image": f"media/{i}.png"}, "positive": f"a {w}"})
    for kind, records in rows.items():
        _lines(data / "omni" / f"{kind}.jsonl", records)
    return {"root": root, "data": data, **models}


def _paths(world: dict[str, Path], output: Path) -> list[str]:
    return [
        f"recipe.base={world['text']}",
        f"compose.vision={world['vision']}",
        f"compose.audio={world['audio']}",
        f"recipe.output={output}",
    ]


def test_shipped_recipe_has_the_papers_phases() -> None:
    raw = read_toml(SHIPPED)
    assert "omni" in SHIPPED.name
    assert raw["recipe"]["phases"] == ["mntp", "merge", "compose", "contrastive"]
    assert raw["merge"]["weights"] == [0.5, 0.5] and raw["merge"]["models"] == ["@mntp", "@base"]
    assert raw["compose"]["kind"] == "compose" and raw["compose"]["text"] == "@merge"
    assert "Qwen3-VL-2B" in raw["compose"]["vision"] and "Qwen3-ASR-1.7B" in raw["compose"]["audio"]
    assert "Qwen3-1.7B" in raw["recipe"]["base"]
    c = raw["contrastive"]
    assert c["phase"] == "multimodal-contrastive" and c["model"] == "@compose"
    assert c["contrastive"]["train_towers"] is False
    mix = {Path(s["path"]).stem: s["weight"] for s in c["data"]["sources"]}
    assert mix == {"text": 0.65, "audio": 0.175, "image": 0.175}


def test_check_names_missing_models_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "omni-2.5b", "--check"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for missing in ("recipe.base: models/Qwen3-1.7B", "compose.vision: models/Qwen3-VL-2B-Instruct",
                    "compose.audio: models/Qwen3-ASR-1.7B"):  # fmt: skip
        assert missing in err[0]
    assert not list(tmp_path.iterdir())  # --check writes nothing


def test_check_passes_with_local_folders_and_refuses_a_mismatch(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(world["root"])  # the recipe's data/ paths are relative to the cwd
    out = tmp_path / "run"
    args = [
        "pipeline",
        "omni-2.5b",
        "--check",
        *sum((["--set", s] for s in _paths(world, out)), []),
    ]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "compose" in printed and "<- merge" in printed
    assert not out.exists()
    # a vision model whose text backbone has another width than the text model: compose's line
    other = specialists(tmp_path / "other")["vision"]
    capsys.readouterr()  # the builder's progress bars
    assert main([*args, "--set", f"compose.vision={other}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compose:" in err[0] and "hidden_size" in err[0], err


def _tiny_recipe(world: dict[str, Path], root: Path) -> Path:
    """The shipped recipe, its structure kept, sizes and paths made tiny."""
    raw = read_toml(SHIPPED)
    data = world["data"]
    raw["recipe"].update(base=str(world["text"]), output=str(root / "run"))
    m = raw["mntp"]
    m["train"].update(tokens_per_step=64, token_budget=128, checkpoint_every=0)
    m["train"].pop("gradient_checkpointing", None)
    m["data"].update(tokens_per_batch=64, max_seq_len=32)
    for s in m["data"]["sources"]:
        s["path"] = str(data / Path(s["path"]).name)
    raw["compose"].update(vision=str(world["vision"]), audio=str(world["audio"]))
    c = raw["contrastive"]
    c["train"].update(steps=2, pairs_per_step=4, checkpoint_every=0, dtype="float32")
    c["optim"].update(warmup_steps=0, lr=1e-3)
    c["data"].update(batch_size=4, query_max_len=16, document_max_len=16, negatives_per_query=0)
    for s in c["data"]["sources"]:
        s["path"] = str(data / "omni" / Path(s["path"]).name)
    c["contrastive"]["mini_batch_size"] = 2
    for phase in (m, c):
        phase["train"]["progress_bar"] = False
    path = root / "omni-tiny.toml"
    path.write_text(dumps_toml(raw))
    return path


def _dtypes(folder: Path) -> set[torch.dtype]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out |= {
                fh.get_tensor(k).dtype for k in fh.keys() if fh.get_tensor(k).is_floating_point()
            }
    return out


def test_tiny_omni_recipe_runs_end_to_end_in_bf16(world, tmp_path: Path) -> None:
    recipe = load_recipe(_tiny_recipe(world, tmp_path))
    assert [p.kind for p in recipe.phases] == ["train", "merge", "compose", "train"]
    report = run_pipeline(recipe, log=lambda _m: None)
    assert [p["status"] for p in report["phases"]] == ["ran"] * 4
    run = tmp_path / "run"
    outputs = [run / "mntp" / "final", run / "merge" / "model", run / "compose" / "model",
               run / "contrastive" / "final"]  # fmt: skip
    for folder in outputs:  # a bf16 base gives bf16 models at every phase (not float32)
        assert _dtypes(folder) == {torch.bfloat16}, folder
    config = json.loads((outputs[2] / "config.json").read_text())
    assert config["model_type"] == "bidirlm_omni"
    assert config["text_config"]["rope_theta"] == 5000000  # rope_from = "vision"
    # towers frozen through the contrastive phase: bit-identical to the composed ones
    composed, final = outputs[2] / "model.safetensors", outputs[3] / "model.safetensors"
    with safe_open(str(composed), "pt") as a, safe_open(str(final), "pt") as b:
        towers = [k for k in a.keys() if k.startswith(TOWERS)]
        assert towers
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in towers)
        text = [k for k in a.keys() if k.startswith("model.language_model.layers.")]
        assert any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in text)
    model = load_model(outputs[3])
    media = world["data"] / "omni" / "media"
    emb = model.encode(["a red apple", str(media / "0.png"), str(media / "0.wav")])
    assert emb.shape == (3, model.hidden_size) and torch.isfinite(emb).all()
    # a second run skips every phase
    again = run_pipeline(load_recipe(_tiny_recipe(world, tmp_path)), log=lambda _m: None)
    assert [p["status"] for p in again["phases"]] == ["skipped"] * 4


def test_recipe_dtype_asks_for_another_dtype(world, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for f in world["text"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    assert _dtypes(folder) == {torch.bfloat16}
    assert cast_checkpoint(folder, torch.float32)
    assert _dtypes(folder) == {torch.float32}
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert load_model(folder).dtype == torch.float32
    assert not cast_checkpoint(folder, torch.float32)  # nothing to do the second time
