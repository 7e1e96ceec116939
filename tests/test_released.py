"""The released BidirLM layouts: `load_model` reads a BidirLM-Omni checkpoint (`model_type`
"bidirlm_omni", `language_model.*`, `visual.*`, `audio_tower.*`) and a released BidirLM text
checkpoint (`model_type` "bidirlm", `BidirLMModel`, base-model names without `model.`) with our
own modules, and `bidirlm export --format bidirlm-omni | bidirlm` writes them bit for bit.

Checkpoints are tiny random ones built from the real configs (tests/real_models.py); the
released-layout omni is also written by hand here from the three specialists, independently of
our exporter, following the published remote code's names.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bidirlm.cli import main
from bidirlm.runtime import compose_omni, load_model
from bidirlm.runtime.models import released
from tests.omni.helpers import bits_equal, image, tone
from tests.real_models import (
    BIDIRLM_BASES,
    bidirlm_text_config,
    build_paper_three,
    build_released_text,
    build_text,
    qwen3_vl_2b_standin,
    real_config,
    real_file,
    shrink,
    tensors,
)

ITEMS_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world"]


def items():
    return [ITEMS_TEXT[0], image(0, (64, 64)), tone(440), ITEMS_TEXT[1], image(1, (96, 64))]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_paper_three(tmp_path_factory.mktemp("three"))


@pytest.fixture(scope="module")
def composed(three, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("composed") / "omni"
    # weights 1, 0, 0: the text backbone is the text model's, bit for bit
    return compose_omni(
        three["text"], three["vision"], three["audio"], out, weights=[1, 0, 0]
    ).output


def hand_built_released(three: dict[str, Path], folder: Path) -> Path:
    """A BidirLM-Omni folder in the published layout, written from the three specialists by
    hand: the names and config schema of `modeling_bidirlm_omni.py` /
    `configuration_bidirlm_omni.py` (text rope and MRoPE from the vision model)."""
    folder.mkdir(parents=True)
    t, v, a = tensors(three["text"]), tensors(three["vision"]), tensors(three["audio"])
    out = {"language_model." + n[len("model.") :]: x for n, x in t.items() if n != "lm_head.weight"}
    out.update({n[len("model.") :]: x for n, x in v.items() if n.startswith("model.visual.")})
    tower = "thinker.audio_tower."
    out.update({"audio_tower." + n[len(tower) :]: x for n, x in a.items() if n.startswith(tower)})
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text = shrink(real_config("qwen3-0.6b") | real_config("qwen3-1.7b"))
    vl = shrink(qwen3_vl_2b_standin())
    for key in ("architectures", "_name_or_path", "rope_scaling", "model_type"):
        text.pop(key, None)
    text.update(
        model_type="bidirlm_omni_text",
        rope_theta=vl["text_config"]["rope_theta"],
        rope_scaling=vl["text_config"]["rope_scaling"],
        torch_dtype="float32",
    )
    asr = shrink(real_config("qwen3-asr-1.7b"))["thinker_config"]
    config = {
        "architectures": ["BidirLMOmniModel"],
        "model_type": "bidirlm_omni",
        "text_config": text,
        "vision_config": {**vl["vision_config"], "model_type": "bidirlm_omni_vision"},
        "audio_config": {**asr["audio_config"], "model_type": "bidirlm_omni_audio"},
        "image_token_id": vl["image_token_id"],
        "video_token_id": vl["video_token_id"],
        "vision_start_token_id": vl["vision_start_token_id"],
        "vision_end_token_id": vl["vision_end_token_id"],
        "audio_token_id": asr["audio_token_id"],
        "audio_start_token_id": asr["audio_start_token_id"],
        "audio_end_token_id": asr["audio_end_token_id"],
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(three["text"] / f, folder / f)
    return folder


def test_hand_built_released_omni_loads_like_the_composed_one(three, composed, tmp_path) -> None:
    rel = hand_built_released(three, tmp_path / "released")
    ours, theirs = load_model(composed), load_model(rel)
    assert type(theirs).__name__ == "OmniEncoder" and theirs.bidirectional
    assert theirs.config.rope["full_attention"].theta == 5e6
    assert theirs.omni_config["mrope_section"] == [6, 5, 5]
    a, b = ours.encode(items()), theirs.encode(items())
    assert torch.isfinite(b).all() and b.shape == (5, 32)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_released_names_under_a_model_prefix_load_too(three, composed, tmp_path) -> None:
    """The remote code's `*ForMaskedLM` keeps the same names under `model.`."""
    rel = hand_built_released(three, tmp_path / "released")
    prefixed = {"model." + n: t for n, t in tensors(rel).items()}
    (rel / "model.safetensors").unlink()
    save_file(prefixed, str(rel / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_model(composed).encode(items()), load_model(rel).encode(items())
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_export_omni_round_trips_bitwise(composed, tmp_path: Path, capsys) -> None:
    rel, again = tmp_path / "rel", tmp_path / "again"
    assert main(["export", str(composed), str(rel), "--format", "bidirlm-omni"]) == 0
    assert "bidirlm-omni layout" in capsys.readouterr().out
    cfg = json.loads((rel / "config.json").read_text())
    assert cfg["model_type"] == "bidirlm_omni"
    assert cfg["text_config"]["model_type"] == "bidirlm_omni_text"
    assert cfg["text_config"]["rope_theta"] == 5e6
    assert cfg["text_config"]["rope_scaling"]["mrope_section"] == [6, 5, 5]
    assert cfg["vision_config"]["model_type"] == "bidirlm_omni_vision"
    assert cfg["audio_config"]["model_type"] == "bidirlm_omni_audio"
    src, out = tensors(composed), tensors(rel)
    assert {n.split(".")[0] for n in out} == {"language_model", "visual", "audio_tower"}
    assert len(src) == len(out)
    for name, t in src.items():
        assert bits_equal(out[released.released_name(name)], t), name
    assert "audio_tower.proj1.weight" in out and "audio_tower.proj2.bias" in out
    before = load_model(composed).encode(items())
    torch.testing.assert_close(load_model(rel).encode(items()), before, rtol=0, atol=0)
    # released -> released again: the same tensors and config
    assert main(["export", str(rel), str(again), "--format", "bidirlm-omni"]) == 0
    assert json.loads((again / "config.json").read_text()) == cfg
    twice = tensors(again)
    assert set(twice) == set(out) and all(bits_equal(twice[n], out[n]) for n in out)
    torch.testing.assert_close(load_model(again).encode(items()), before, rtol=0, atol=0)


def test_export_text_layout_of_omni_and_text_models(three, composed, tmp_path: Path) -> None:
    text_out = tmp_path / "text"
    assert main(["export", str(composed), str(text_out), "--format", "bidirlm"]) == 0
    cfg = json.loads((text_out / "config.json").read_text())
    assert cfg["model_type"] == "bidirlm" and cfg["architectures"] == ["BidirLMModel"]
    assert cfg["auto_map"] == real_config("bidirlm-1b-embedding")["auto_map"]
    assert cfg["is_causal"] is False and cfg["classifier_pooling"] == "late"
    assert cfg["rope_parameters"]["rope_theta"] == 5e6 and cfg["rope_theta"] == 5e6
    out = tensors(text_out)
    assert "embed_tokens.weight" in out and not any(n.startswith("model.") for n in out)
    omni = load_model(composed)
    torch.testing.assert_close(
        load_model(text_out).encode(ITEMS_TEXT), omni.encode(ITEMS_TEXT), rtol=0, atol=0
    )
    # a plain text checkpoint (Qwen3-1.7B-shaped): the same bytes under the BidirLMModel names
    plain = tmp_path / "plain"
    assert main(["export", str(three["text"]), str(plain), "--format", "bidirlm"]) == 0
    assert json.loads((plain / "config.json").read_text())["is_causal"] is False
    a, b = tensors(three["text"]), tensors(plain)
    assert {n.removeprefix("model.") for n in a} == set(b)
    assert all(bits_equal(a[n], b[n.removeprefix("model.")]) for n in a)
    torch.testing.assert_close(
        load_model(plain, bidirectional=None).encode(ITEMS_TEXT),
        load_model(three["text"]).encode(ITEMS_TEXT),
        rtol=0,
        atol=0,
    )
    with pytest.raises(ValueError, match="needs an omni checkpoint"):
        released.export_checkpoint(three["text"], tmp_path / "x", layout="bidirlm-omni")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", sorted(BIDIRLM_BASES))
def test_released_bidirlm_text_checkpoint_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    """A tiny BidirLM-1B / 1.7B-Embedding built from the published config head (over its base
    model's config), written by hand in the released layout (`model_type` "bidirlm",
    `BidirLMModel` names without `model.`): load_model reads it with our Gemma3 / Qwen3 modules,
    bidirectional, equal bit for bit to the same weights in the base layout; `bidirlm export
    --format bidirlm` gives it back bit for bit (released -> released, and base -> released),
    with the released 1_Pooling/config.json, and the same embeddings."""
    cfg = shrink(bidirlm_text_config(name))
    rel, base = build_released_text(tmp_path / "src", cfg)
    family = "gemma3" if BIDIRLM_BASES[name].startswith("gemma") else "qwen3"
    model = load_model(rel, bidirectional=None)
    assert model.bidirectional and model.spec.name == family
    before = model.encode(ITEMS_TEXT)
    ref = load_model(base, bidirectional=True).encode(ITEMS_TEXT)
    assert torch.isfinite(before).all()
    torch.testing.assert_close(before, ref, rtol=0, atol=0)
    pooling = real_file(name, "1_Pooling/config.json") | {"word_embedding_dimension": 0}
    for src in (rel, base):
        out = tmp_path / f"out-{src.name}"
        assert main(["export", str(src), str(out), "--format", "bidirlm"]) == 0
        got = json.loads((out / "config.json").read_text())
        flag = {"gemma3": "use_bidirectional_attention", "qwen3": "is_causal"}[family]
        assert got[flag] is (family == "gemma3")
        written = json.loads((rel / "config.json").read_text())
        assert {k: got.get(k) for k in written} == written
        extra = {flag, "rope_theta", "rope_local_base_freq", "classifier_pooling"}
        assert set(got) - set(written) <= extra
        a, b = tensors(rel), tensors(out)
        assert set(a) == set(b) and all(bits_equal(a[n], b[n]) for n in a)
        pooled = json.loads((out / "1_Pooling" / "config.json").read_text())
        assert pooled == pooling | {"word_embedding_dimension": cfg["hidden_size"]}
        torch.testing.assert_close(load_model(out).encode(ITEMS_TEXT), before, rtol=0, atol=0)
    again = tmp_path / "again"
    assert main(["export", str(tmp_path / "out-released"), str(again), "--format", "bidirlm"]) == 0
    assert json.loads((again / "config.json").read_text()) == json.loads(
        (tmp_path / "out-released" / "config.json").read_text()
    )


def test_bf16_stays_bf16_through_every_export_format(tmp_path: Path) -> None:
    """issue 24 item 18: a bf16 base is exported as bf16 unless --dtype asks otherwise."""
    src = build_text(tmp_path / "bf16", shrink(real_config("qwen3-0.6b")), dtype=torch.bfloat16)
    for fmt in ("sentence-transformers", "bidirlm"):
        out = tmp_path / fmt
        assert main(["export", str(src), str(out), "--format", fmt, "--max-length", "16"]) == 0
        dtypes = {t.dtype for t in tensors(out).values()}
        assert dtypes == {torch.bfloat16}, (fmt, dtypes)
    out = tmp_path / "f32"
    assert main(["export", str(src), str(out), "--format", "bidirlm", "--dtype", "float32"]) == 0
    assert {t.dtype for t in tensors(out).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    # bf16 specialists compose to a bf16 omni, exported as bf16 in the released layout
    three = build_paper_three(tmp_path / "three", dtype=torch.bfloat16)
    omni = compose_omni(three["text"], three["vision"], three["audio"], tmp_path / "omni").output
    rel = tmp_path / "rel"
    assert main(["export", str(omni), str(rel), "--format", "bidirlm-omni"]) == 0
    assert {t.dtype for t in tensors(omni).values()} == {torch.bfloat16}
    assert {t.dtype for t in tensors(rel).values()} == {torch.bfloat16}
    emb = load_model(rel).encode(items()[:3])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


@pytest.mark.parametrize("fmt", ["bidirlm", "sentence-transformers"])
def test_small_tmpdir_is_never_used(
    three, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """issue 24 item 10: temporaries go beside the output, not under $TMPDIR (here unusable)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    out = tmp_path / "out"
    assert main(["export", str(three["text"]), str(out), "--format", fmt]) == 0
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_is_one_line_and_leaves_nothing(
    three, composed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """issue 24 item 10: ENOSPC while writing the shards (simulated as tests/test_safety.py
    does): one line naming the output, no temporary left, nothing published."""

    def full(tensors_, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(released, "save_file", full)
    for src, fmt in ((composed, "bidirlm-omni"), (three["text"], "bidirlm")):
        out = tmp_path / "out"
        assert main(["export", str(src), str(out), "--format", fmt]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"bidirlm export: error: cannot write {out}: No space left on device"
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["bidirlm-omni", "sentence-transformers"])
def test_output_created_meanwhile_is_refused_and_kept(
    composed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, fmt: str
) -> None:
    """issue 24 item 2: OUT created by the user while the export runs: refused in one line, the
    user's file kept, nothing of ours left."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "out"

    def user_creates_out() -> None:
        out.mkdir()
        (out / "mine.txt").write_text("user data")

    if fmt == "bidirlm-omni":
        real = released.save_file

        def save(tensors_, path, *args, **kwargs):
            user_creates_out()
            return real(tensors_, path, *args, **kwargs)

        monkeypatch.setattr(released, "save_file", save)
    else:
        real_save = SentenceTransformer.save

        def save(self, path, *args, **kwargs):
            user_creates_out()
            return real_save(self, path, *args, **kwargs)

        monkeypatch.setattr(SentenceTransformer, "save", save)
    assert main(["export", str(composed), str(out), "--format", fmt]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "appeared while this run was writing it" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_other_remote_code_text_configs_are_not_guessed(tmp_path: Path) -> None:
    """Only a "bidirlm" config (or one whose names say qwen3 / gemma3) is read as a base family;
    another remote-code model_type stays an unsupported architecture (one line)."""
    src = build_text(tmp_path / "src", shrink(real_config("qwen3-0.6b")))
    raw = json.loads((src / "config.json").read_text())
    raw.update(model_type="llama_bidirec", architectures=["LlamaBidirectionalModel"])
    raw["auto_map"] = {"AutoModel": "llama_bidirectional_model.LlamaBidirectionalModel"}
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(src)
    raw.update(model_type="bidirlm", architectures=["BidirLMModel"])
    (src / "config.json").write_text(json.dumps(raw))
    assert load_model(src, bidirectional=None).bidirectional


def test_empty_output_filled_meanwhile_is_refused_and_kept(
    composed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An OUT that is an empty folder at the start may be replaced, but not once the user has put
    a file in it during the export."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "out"
    out.mkdir()
    real_save = SentenceTransformer.save

    def save(self, path, *args, **kwargs):
        (out / "mine.txt").write_text("user data")
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "save", save)
    assert main(["export", str(composed), str(out)]) == 1
    assert (out / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    capsys.readouterr()
    monkeypatch.setattr(SentenceTransformer, "save", real_save)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(composed), str(empty)]) == 0  # still empty at the end: replaced
    assert (empty / "modules.json").is_file()
