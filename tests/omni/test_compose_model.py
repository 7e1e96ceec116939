"""compose_omni / bidirlm compose and the OmniEncoder that load_model returns for its output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bidirlm.runtime import compose_omni, load_model
from bidirlm.runtime.merging.compose import ComposeError
from bidirlm.runtime.models.encoder import Encoder
from bidirlm.runtime.models.media import write_wav
from tests.omni.helpers import bits_equal, image, specialists, tensors, tone


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("omni")
    out = specialists(root)
    out["omni"] = compose_omni(
        out["text"], out["vision"], out["audio"], root / "omni", weights=[2, 1, 1]
    ).output
    return out


@pytest.fixture(scope="module")
def model(parts):
    return load_model(parts["omni"])


def test_text_backbone_is_weighted_average_and_towers_are_copied(parts) -> None:
    t, v, a = tensors(parts["text"]), tensors(parts["vision"]), tensors(parts["audio"])
    out = tensors(parts["omni"])
    text_names = [n for n in t if n.startswith("model.")]
    assert text_names
    for n in text_names:
        rel = n[len("model.") :]
        name = "model.language_model." + rel
        ref = (2 * t[n].double() + v[name].double() + a[name].double()) / 4
        torch.testing.assert_close(out[name].double(), ref, atol=1e-6, rtol=1e-6)
    towers = [n for n in v if n.startswith("model.visual.")]
    towers_a = [
        n for n in a if n.startswith(("model.audio_tower.", "model.multi_modal_projector."))
    ]
    assert towers and towers_a
    for n in towers:
        assert bits_equal(out[n], v[n]), n
    for n in towers_a:
        assert bits_equal(out[n], a[n]), n
    expected = {"model.language_model." + n[len("model.") :] for n in text_names}
    assert set(out) == expected | set(towers) | set(towers_a)
    cfg = json.loads((parts["omni"] / "config.json").read_text())
    assert cfg["model_type"] == "bidirlm_omni" and cfg["text_config"]["is_causal"] is False
    assert {"vision_config", "audio_config", "image_token_id", "audio_token_id"} <= set(cfg)
    for f in ("tokenizer.json", "preprocessor_config.json", "audio_preprocessor_config.json"):
        assert (parts["omni"] / f).is_file(), f


def test_mixed_encode_shapes_and_text_path_equals_encoder(parts, model) -> None:
    items = ["def f(): pass", image(0), tone(440), "import os", image(1, (64, 40)), tone(880)]
    emb = model.encode(items, batch_size=4)
    assert emb.shape == (6, model.hidden_size) and torch.isfinite(emb).all()
    # each item alone gives the same vector as in a mixed batch
    alone = torch.cat([model.encode([x]) for x in items])
    torch.testing.assert_close(emb, alone, atol=1e-5, rtol=1e-5)
    # the text path (MRoPE with three equal axes) equals the plain Encoder's RoPE path
    texts = ["def f(): pass", "import os"]
    torch.testing.assert_close(model.encode(texts), Encoder.encode(model, texts), atol=1e-6, rtol=0)
    assert model.encode([]).shape == (0, model.hidden_size)


def test_image_hidden_states_match_transformers_qwen3vl(parts) -> None:
    """Our backbone + MRoPE + DeepStack vs transformers' Qwen3-VL, bidirectional, float32."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    omni = load_model(parts["omni"], dtype=torch.float32)
    omni.visual.float()
    cfg = json.loads((parts["omni"] / "config.json").read_text())
    text = dict(cfg["text_config"])
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": cfg["mrope_section"]}
    text.pop("model_type")
    hf_cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=cfg["vision_config"],
        image_token_id=cfg["image_token_id"],
        vision_start_token_id=cfg["vision_start_token_id"],
        vision_end_token_id=cfg["vision_end_token_id"],
    )
    hf_cfg.text_config.is_causal = False
    ref = Qwen3VLModel(hf_cfg).float().eval()
    state = {k.removeprefix("model."): v.float() for k, v in tensors(parts["omni"]).items()}
    state = {k: v for k, v in state.items() if k.startswith(("language_model.", "visual."))}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m] and not unexpected
    batch = omni.prepare(omni.parse([image(3, (40, 24))]))
    ours = omni.forward_multimodal(**batch)
    ids = batch["input_ids"][None]
    mm = (ids == cfg["image_token_id"]).int()
    with torch.no_grad():
        theirs = ref(
            input_ids=ids,
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=mm,
        ).last_hidden_state[0]
    torch.testing.assert_close(ours.detach(), theirs, atol=2e-4, rtol=2e-4)


def test_media_errors_and_paths(model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"items\[1\]: empty audio"):
        model.encode(["x", {"array": np.zeros(0, np.float32), "sampling_rate": 16000}])
    with pytest.raises(ValueError, match=r"items\[0\]: image of 4x4 pixels is below"):
        model.encode([image(0, (4, 4))])
    gif = tmp_path / "a.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"items\[0\]: unsupported file"):
        model.encode([str(gif)])
    with pytest.raises(ValueError, match="unsupported file"):
        model.encode([tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match="sampling_rate"):
        model.encode([{"array": np.ones(10, np.float32), "sampling_rate": 0}])
    # an image path, a 16 kHz wav and a 48 kHz wav (resampled) give the same as in memory
    img = image(5)
    img.save(tmp_path / "x.png")
    clip = tone(330, rate=48000)
    write_wav(tmp_path / "x.wav", clip["array"], 48000)
    from bidirlm.runtime.models.media import read_audio_file

    back, rate = read_audio_file(tmp_path / "x.wav", "test")
    assert rate == 48000
    by_path = model.encode([str(tmp_path / "x.png"), str(tmp_path / "x.wav")])
    in_memory = model.encode([img, {"array": back, "sampling_rate": 48000}])
    torch.testing.assert_close(by_path, in_memory, atol=0, rtol=0)


def test_save_pretrained_round_trip(model, parts, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    items = ["hello", image(2), tone(500)]
    torch.testing.assert_close(again.encode(items), model.encode(items), atol=0, rtol=0)
    src, out = tensors(parts["omni"]), tensors(tmp_path / "copy")
    for n in src:
        if n.startswith(("model.visual.", "model.audio_tower.", "model.multi_modal_projector.")):
            assert bits_equal(out[n], src[n]), n


def test_text_plus_one_modality(parts, tmp_path: Path) -> None:
    compose_omni(parts["text"], vision=parts["vision"], output=tmp_path / "tv")
    compose_omni(parts["text"], audio=parts["audio"], output=tmp_path / "ta")
    tv, ta = load_model(tmp_path / "tv"), load_model(tmp_path / "ta")
    assert tv.encode(["a", image(0)]).shape == (2, tv.hidden_size)
    assert ta.encode(["a", tone(300)]).shape == (2, ta.hidden_size)
    with pytest.raises(ValueError, match="no audio tower"):
        tv.encode([tone(300)])
    with pytest.raises(ValueError, match="no vision tower"):
        ta.encode([image(0)])
    # 1:1 weights by default
    t, v, out = tensors(parts["text"]), tensors(parts["vision"]), tensors(tmp_path / "tv")
    n = "model.layers.0.mlp.up_proj.weight"
    ref = (t[n].double() + v["model.language_model." + n[6:]].double()) / 2
    torch.testing.assert_close(out["model.language_model." + n[6:]].double(), ref)


def test_compose_errors(parts, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from bidirlm.cli import main
    from bidirlm.recipe.omni_specialists import build_vision_specialist

    cfg = AutoConfig.from_pretrained(parts["text"])
    cfg.num_hidden_layers = 1
    bad = build_vision_specialist(tmp_path / "bad", cfg)
    with pytest.raises(ComposeError, match="num_hidden_layers is 2 in the text model and 1"):
        compose_omni(parts["text"], bad, output=tmp_path / "x")
    cfg.num_hidden_layers, cfg.rope_theta = 2, 5e6
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 5e6}
    theta = build_vision_specialist(tmp_path / "theta", cfg)
    # a different rope_theta is a free field (rope_from policy), not an error
    with pytest.raises(ComposeError, match="rope_from: 'audio' names no given model"):
        compose_omni(parts["text"], theta, output=tmp_path / "x", rope_from="audio")
    done = compose_omni(parts["text"], theta, output=tmp_path / "theta-omni").output
    got = json.loads((done / "config.json").read_text())
    assert got["rope_from"] == "vision" and got["differing_fields"]["rope_theta"]["vision"] == 5e6
    with pytest.raises(ComposeError, match="weights: got 2 values for 3 models"):
        compose_omni(parts["text"], parts["vision"], parts["audio"], tmp_path / "x", weights=[1, 1])
    with pytest.raises(ComposeError, match="needs a vision model, an audio model"):
        compose_omni(parts["text"], output=tmp_path / "x")
    with pytest.raises(ComposeError, match="already exists"):
        compose_omni(parts["text"], parts["vision"], output=parts["omni"])
    assert not (tmp_path / "x").exists()
    argv = ["compose", "--text", str(parts["text"]), "--vision", str(bad), str(tmp_path / "y")]
    assert main(argv) == 1 and not (tmp_path / "y").exists()
    argv = ["compose", "--text", str(parts["text"]), "--audio", str(parts["audio"])]
    assert main([*argv, "--weights", "3,1", str(tmp_path / "z")]) == 0
    assert json.loads((tmp_path / "z" / "config.json").read_text())["merge_weights"] == {
        "text": 3.0,
        "audio": 1.0,
    }


def test_released_asr_layout_and_derived_processors(tmp_path: Path) -> None:
    """Released Qwen3-ASR names (`thinker.model.*`, `thinker.audio_tower.*`, config under
    `thinker_config`) and specialists without processor files: processors come from the towers'
    configs."""
    from tests.merging.fixtures import qwen3, qwen3_asr, qwen3_vl
    from tests.models.test_models import tiny_tokenizer

    text = qwen3(tmp_path / "t", 0, shard=None)
    vl, asr = qwen3_vl(tmp_path / "vl", 1), qwen3_asr(tmp_path / "asr", 2)
    # issue 24 item 7: a text model without tokenizer files is refused, nothing is written
    with pytest.raises(ComposeError, match="no tokenizer files"):
        compose_omni(text, vl, asr, tmp_path / "omni")
    assert not (tmp_path / "omni").exists()
    tiny_tokenizer().save_pretrained(text)
    out = compose_omni(text, vl, asr, tmp_path / "omni", weights=[1, 1, 1]).output
    t, a, o = tensors(text), tensors(asr), tensors(out)
    n = "model.layers.1.self_attn.q_proj.weight"
    ref = (t[n].float() + tensors(vl)["model.language_model." + n[6:]].float()) / 3
    ref += a["thinker.model." + n[6:]].float() / 3
    torch.testing.assert_close(o["model.language_model." + n[6:]].float(), ref, atol=1e-2, rtol=0)
    for name in a:
        if name.startswith("thinker.audio_tower."):
            assert bits_equal(o["model.audio_tower." + name[20:]], a[name]), name
    model = load_model(out)
    emb = model.encode([image(0, (16, 12)), tone(300)])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    assert (out / "tokenizer.json").is_file()
