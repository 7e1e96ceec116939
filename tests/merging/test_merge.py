"""Streaming merge: bitwise parity with mergekit on the same YAML, transformers loading, VLM/ASR
layouts with towers taken unmerged, sharding, threads and the similarity report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from bidirlm.runtime.merging.merge import MergeResult, format_report, merge, merge_from_config
from tests.merging.fixtures import bits_equal, load_folder, qwen3, qwen3_asr, qwen3_vl

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three sharded tiny Qwen3 checkpoints per dtype (a shared base plus per-model noise)."""
    root = tmp_path_factory.mktemp("qwen3")
    return {
        key: [qwen3(root / f"{key}{i}", i, dtype=dt) for i in range(3)]
        for key, dt in DTYPES.items()
    }


# Each case exercises different mergekit knobs; all must give bitwise-identical tensors.
CASES = {
    "linear-bf16": """
merge_method: linear
models:
  - model: {m0}
    parameters: {{weight: [{{filter: mlp, value: 0.1}}, {{value: [1.0, 0.3]}}]}}
  - model: {m1}
    parameters: {{weight: 0.45}}
  - model: {m2}
parameters: {{weight: 0.3}}
""",
    "linear-fp32": """
merge_method: linear
models:
  - model: {m0}
    parameters: {{weight: 1.0}}
  - model: {m1}
    parameters: {{weight: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.25}}
parameters: {{normalize: false}}
dtype: bfloat16
out_dtype: float32
""",
    "task_arithmetic-bf16": """
merge_method: task_arithmetic
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: [0.2, 0.9]}}
parameters: {{lambda: 0.8, normalize: true}}
""",
    "task_arithmetic-fp32": """
merge_method: task_arithmetic
base_model: {m0}
models:
  - model: {m0}
  - model: {m1}
    parameters: {{weight: 0.7}}
  - model: {m2}
    parameters: {{weight: 0.3}}
""",
}


@pytest.fixture(scope="module")
def mergekit_outputs(ckpts, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Run mergekit once per case (in-process: its import alone takes seconds)."""
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    root = tmp_path_factory.mktemp("mergekit")
    out = {}
    for case, template in CASES.items():
        models = ckpts[case.rsplit("-", 1)[1]]
        text = template.format(m0=models[0], m1=models[1], m2=models[2])
        config = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
        mk_merge.run_merge(config, str(root / case), mk_options.MergeOptions(quiet=True))
        out[case] = (text, root / case)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(case, mergekit_outputs, tmp_path):
    text, theirs_dir = mergekit_outputs[case]
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    result = merge_from_config(cfg, tmp_path / "ours", threads=2)
    ours, theirs = load_folder(tmp_path / "ours"), load_folder(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    differing = [n for n in theirs if not bits_equal(ours[n], theirs[n])]
    assert not differing, f"{case}: {len(differing)} tensors differ, e.g. {differing[0]}"
    assert result.tensors == len(theirs)
    # merged values really mix the inputs (not one model copied through)
    name = "model.layers.1.mlp.up_proj.weight"
    inputs = load_folder(Path(yaml.safe_load(text)["models"][1]["model"]))
    assert not torch.equal(ours[name].float(), inputs[name].float())
    assert (tmp_path / "ours" / "merge_config.yml").read_text() == text


def test_linear_matches_float32_formula_and_loads_in_transformers(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    models = ckpts["bf16"]
    out = tmp_path / "avg"
    result = merge(models, [1, 1, 1], out, shard_size="20KB", progress=True)
    assert isinstance(result, MergeResult) and result.shards > 1
    inputs = [load_folder(m) for m in models]
    merged = load_folder(out)
    for name, t in merged.items():
        ref = sum(x[name].float() for x in inputs) / 3
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t.float(), ref.bfloat16().float(), rtol=0, atol=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) == result.shards and set(index["weight_map"].values()) == {
        f.name for f in files
    }
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())
    # no shard exceeds the limit unless a single tensor is larger
    for f in files:
        tensors = load_folder_file(f)
        if len(tensors) > 1:
            assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), name
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


def load_folder_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_threads_and_shard_size_do_not_change_bytes(ckpts, tmp_path):
    models = ckpts["fp32"]
    merge(models, [0.2, 0.3, 0.5], tmp_path / "a", threads=1)
    merge(models, [0.2, 0.3, 0.5], tmp_path / "b", threads=3, shard_size="8KB")
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(bits_equal(a[n], b[n]) for n in a)


def test_task_arithmetic_formula_fp32(ckpts, tmp_path):
    base, m1, m2 = ckpts["fp32"]
    merge([m1, m2], [0.6, 0.3], tmp_path / "ta", method="task_arithmetic", base=base, lambda_=0.5)
    b, x1, x2 = load_folder(base), load_folder(m1), load_folder(m2)
    for name, t in load_folder(tmp_path / "ta").items():
        ref = b[name] + 0.5 * (0.6 * (x1[name] - b[name]) + 0.3 * (x2[name] - b[name]))
        torch.testing.assert_close(t, ref, rtol=1e-6, atol=1e-7)


def test_report_cosine_per_layer(ckpts, tmp_path):
    models = ckpts["fp32"]
    result = merge(models, [1, 1, 1], tmp_path / "r", report=True)
    saved = json.loads((tmp_path / "r" / "merge_report.json").read_text())
    assert saved == json.loads(json.dumps(result.report))
    assert saved["reference"] == str(models[0]) and len(saved["models"]) == 2
    ref, other = load_folder(models[0]), load_folder(models[2])

    def cos(names):
        a = torch.cat([ref[n].double().flatten() for n in names])
        b = torch.cat([other[n].double().flatten() for n in names])
        return float(a @ b / (a.norm() * b.norm()))

    entry = saved["models"][1]
    assert entry["model"] == str(models[2])
    assert math.isclose(entry["overall"], cos(list(ref)), rel_tol=1e-5)
    layer1 = [n for n in ref if n.startswith("model.layers.1.")]
    assert math.isclose(entry["groups"]["model.layers.1"], cos(layer1), rel_tol=1e-5)
    assert set(entry["groups"]) == {"other", "model.layers.0", "model.layers.1"}
    table = format_report(saved)
    assert "model.layers.1" in table and f"{entry['overall']:.4f}" in table


def test_vl_asr_text_merge_takes_towers_unmerged(ckpts, tmp_path):
    """The omnimodal recipe: text backbones of a VLM, an ASR model and an encoder merged 1/3
    each (names aligned on the Qwen3-VL layout by `rename`), vision and audio towers copied over
    unmerged; the output loads in transformers' Qwen3-VL with every text tensor present."""
    enc = ckpts["bf16"][0]
    vl = qwen3_vl(tmp_path / "vl", 1)
    asr = qwen3_asr(tmp_path / "asr", 2)
    config = tmp_path / "omni.yml"
    config.write_text(
        f"""
merge_method: linear
models:
  - model: {enc}
    parameters: {{weight: 1.0}}
    rename: {{"model.": "model.language_model."}}
  - model: {vl}
    parameters: {{weight: 1.0}}
    take: ["model.visual.*"]
  - model: {asr}
    parameters: {{weight: 1.0}}
    rename: {{"thinker.model.": "model.language_model."}}
    take: ["thinker.audio_tower.*", "thinker.multi_modal_projector.*"]
config_from: {vl}
"""
    )
    result = merge_from_config(config, tmp_path / "omni")
    out = load_folder(tmp_path / "omni")
    e, v, a = load_folder(enc), load_folder(vl), load_folder(asr)
    visual = {n for n in v if n.startswith("model.visual.")}
    audio = {n for n in a if not n.startswith("thinker.model.")}
    text = {n.replace("model.", "model.language_model.", 1) for n in e}
    assert visual and audio
    assert set(out) == text | visual | audio and result.tensors == len(out)
    for n in visual:
        assert bits_equal(out[n], v[n]), n
    for n in audio:
        assert bits_equal(out[n], a[n]), n
    for n in e:
        vn = n.replace("model.", "model.language_model.", 1)
        an = n.replace("model.", "thinker.model.", 1)
        ref = (e[n].float() + v[vn].float() + a[an].float()) / 3
        assert bits_equal(out[vn], ref.bfloat16()), n
    cfg = json.loads((tmp_path / "omni" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl"
    from transformers import Qwen3VLForConditionalGeneration

    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        tmp_path / "omni", output_loading_info=True
    )
    assert not [k for k in info["missing_keys"] if "language_model" in k], info["missing_keys"]
    state = model.state_dict()
    for n in e:
        vn = n.replace("model.", "model.language_model.", 1)
        assert torch.equal(state[vn], out[vn]), vn


def test_tokenizer_and_config_sources(tmp_path, ckpts):
    models = ckpts["bf16"]
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"toy": true}')
    (tok / "tokenizer_config.json").write_text("{}")
    merge(
        models[:2],
        [1, 1],
        tmp_path / "o",
        tokenizer_from=tok,
        config_from=models[1],
        out_dtype="float32",
    )
    out = tmp_path / "o"
    assert (out / "tokenizer.json").read_text() == '{"toy": true}'
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in load_folder(out).values())
