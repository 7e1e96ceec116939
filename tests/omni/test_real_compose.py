"""`bidirlm compose` of the paper's three specialists, built from their real configs (sizes shrunk):
text Qwen3-1.7B, vision Qwen3-VL-2B (stand-in, see tests/real_models.py), audio Qwen3-ASR-1.7B.

Their text backbones differ in `rope_theta` (1e6 / 5e6 / 1e6), MRoPE and
`max_position_embeddings` (40960 / 262144 / 65536): the free fields follow `--rope-from`; fields
that must agree still refuse in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bidirlm.cli import main
from bidirlm.runtime import compose_omni, load_model
from bidirlm.runtime.merging.compose import ComposeError, policy_line
from bidirlm.runtime.models.encoder import Encoder
from tests.omni.helpers import image, tone
from tests.real_models import build_paper_three, build_text, real_config, shrink

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world"]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_paper_three(tmp_path_factory.mktemp("paper3"))


@pytest.fixture(scope="module")
def omni(three, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omni") / "omni"
    return compose_omni(three["text"], three["vision"], three["audio"], out).output


def test_specialists_keep_their_real_differences(three) -> None:
    text = json.loads((three["text"] / "config.json").read_text())
    vision = json.loads((three["vision"] / "config.json").read_text())["text_config"]
    audio = json.loads((three["audio"] / "config.json").read_text())["thinker_config"]
    assert (text["rope_theta"], vision["rope_theta"], audio["text_config"]["rope_theta"]) == (
        1000000,
        5000000,
        1000000,
    )
    # MRoPE sections scaled with head_dim (128 -> 32): [24, 20, 20] -> [6, 5, 5]
    assert vision["rope_scaling"]["mrope_section"] == [6, 5, 5]
    assert audio["text_config"]["rope_scaling"]["mrope_section"] == [6, 5, 5]
    assert audio["audio_token_id"] == 151676 and text["vocab_size"] == 151936


def test_default_rope_from_vision_composes_and_encodes(three, omni: Path) -> None:
    cfg = json.loads((omni / "config.json").read_text())
    assert cfg["rope_from"] == "vision"
    assert cfg["text_config"]["rope_parameters"] == {"rope_theta": 5e6, "rope_type": "default"}
    assert cfg["text_config"]["max_position_embeddings"] == 262144  # Qwen3-VL-2B's
    assert cfg["mrope_section"] == [6, 5, 5]
    diffs = cfg["differing_fields"]
    assert diffs["rope_theta"] == {"text": 1e6, "vision": 5e6, "audio": 1e6}
    assert diffs["max_position_embeddings"]["audio"] == 65536
    line = policy_line(cfg)
    assert "\n" not in line and line.startswith("rope-from vision: ") and "5e+06" in line
    model = load_model(omni)
    items = [TEXTS[0], image(0, (64, 64)), tone(440), TEXTS[1], image(1, (96, 64)), tone(660)]
    emb = model.encode(items, batch_size=4)
    assert emb.shape == (6, model.hidden_size) and torch.isfinite(emb).all()
    alone = torch.cat([model.encode([x]) for x in items])
    torch.testing.assert_close(emb, alone, atol=1e-5, rtol=1e-5)
    # the text path is the plain text encoder with the chosen RoPE (theta 5e6)
    torch.testing.assert_close(model.encode(TEXTS), Encoder.encode(model, TEXTS), atol=1e-6, rtol=0)
    assert model.config.rope["full_attention"].theta == 5e6


def test_cli_rope_from_text_and_audio(three, tmp_path: Path, capsys) -> None:
    outs = {}
    for role in ("text", "audio"):
        out = tmp_path / role
        argv = ["compose", "--text", str(three["text"]), "--vision", str(three["vision"])]
        argv += ["--audio", str(three["audio"]), str(out), "--rope-from", role]
        assert main(argv) == 0
        printed = capsys.readouterr().out.splitlines()
        assert printed[0].startswith(f"rope-from {role}: ") and "rope_theta 1e+06" in printed[0]
        outs[role] = json.loads((out / "config.json").read_text())
        assert outs[role]["rope_from"] == role
        assert outs[role]["text_config"]["rope_parameters"]["rope_theta"] == 1e6
    assert outs["text"]["text_config"]["max_position_embeddings"] == 40960
    assert outs["audio"]["text_config"]["max_position_embeddings"] == 65536
    # the choice changes the text path: theta 1e6 vs 5e6 on the same averaged weights
    a = load_model(tmp_path / "text").encode(TEXTS)
    b = load_model(tmp_path / "audio").encode(TEXTS)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # same theta, same weights
    base = json.loads((tmp_path / "text" / "config.json").read_text())
    assert base["differing_fields"]["rope_theta"]["vision"] == 5e6


def test_rope_from_vision_differs_from_text_on_long_inputs(three, omni: Path, tmp_path) -> None:
    out = compose_omni(
        three["text"], three["vision"], three["audio"], tmp_path / "t", rope_from="text"
    ).output
    long = [" ".join(TEXTS * 6)]
    a, b = load_model(omni).encode(long), load_model(out).encode(long)
    assert not torch.allclose(a, b, atol=1e-4)


def test_rope_from_errors_are_one_line(three, tmp_path: Path, capsys) -> None:
    with pytest.raises(ComposeError, match=r"rope_from: 'audio' names no given model"):
        compose_omni(three["text"], three["vision"], None, tmp_path / "x", rope_from="audio")
    with pytest.raises(ComposeError, match="rope_from: expected one of text, vision, audio"):
        compose_omni(three["text"], three["vision"], None, tmp_path / "x", rope_from="bad")
    argv = ["compose", "--text", str(three["text"]), "--vision", str(three["vision"])]
    assert main([*argv, str(tmp_path / "y"), "--rope-from", "audio"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rope_from" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_fields_that_must_agree_still_refuse(three, tmp_path: Path) -> None:
    # Qwen3-0.6B (hidden 1024) against the 2048-wide specialists: still different after shrinking
    small = build_text(tmp_path / "q06", shrink(real_config("qwen3-0.6b")))
    with pytest.raises(ComposeError, match=r"text backbones differ: hidden_size is 16 .* 32"):
        compose_omni(small, three["vision"], three["audio"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_model_without_tokenizer_is_refused(three, tmp_path: Path, capsys) -> None:
    # issue 24 item 7: a Qwen3-VL folder given as --text (here without tokenizer files)
    vl = tmp_path / "vl"
    shutil.copytree(three["vision"], vl)
    for f in vl.glob("tokenizer*"):
        f.unlink()
    argv = ["compose", "--text", str(vl), "--audio", str(three["audio"]), str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no tokenizer files" in err and str(vl) in err
    assert not (tmp_path / "o").exists()
