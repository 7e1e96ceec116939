"""tests/real_models.py: shrinking a real config changes only its size fields."""

from __future__ import annotations

import json

import pytest

from tests.real_models import (
    BIDIRLM_BASES,
    REAL_CONFIGS,
    bidirlm_text_config,
    check_special_ids,
    qwen3_1p7b_config,
    qwen3_vl_2b_standin,
    real_config,
    real_file,
    scale_mrope,
    shrink,
)

SIZE_KEYS = {
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "max_window_layers",
    "layer_types",
    "depth",
    "num_heads",
    "out_hidden_size",
    "deepstack_visual_indexes",
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "downsample_hidden_size",
    "output_dim",
    "mrope_section",
}


def _flat(c: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in c.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in REAL_CONFIGS.iterdir() if p.is_dir()))
def test_stored_configs_are_json_and_listed_in_the_readme(name: str) -> None:
    json.loads((REAL_CONFIGS / name / "config.json").read_text())
    assert f"`{name}/`" in (REAL_CONFIGS / "README.md").read_text()


@pytest.mark.parametrize(
    "config",
    [
        real_config("qwen3-0.6b"),
        qwen3_1p7b_config(),
        real_config("qwen3-asr-1.7b"),
        qwen3_vl_2b_standin(),
    ],
    ids=["qwen3-0.6b", "qwen3-1.7b", "qwen3-asr-1.7b", "qwen3-vl-2b-standin"],
)
def test_only_size_fields_change(config: dict) -> None:
    small = shrink(config)
    before, after = _flat(config), _flat(small)
    assert set(before) == set(after)  # nothing added, nothing dropped
    changed = {k for k in before if before[k] != after[k]}
    assert changed and all(k.split(".")[-1] in SIZE_KEYS for k in changed), changed
    for k in changed:  # every size shrinks, never grows
        if isinstance(before[k], int):
            assert 1 <= after[k] < before[k], k
    check_special_ids(small)


def test_mrope_sections_scale_with_head_dim() -> None:
    assert scale_mrope([24, 20, 20], 16) == [6, 5, 5]
    assert scale_mrope([16, 24, 24], 8) == [2, 3, 3]
    asr = shrink(real_config("qwen3-asr-1.7b"))["thinker_config"]["text_config"]
    assert sum(asr["rope_scaling"]["mrope_section"]) == asr["head_dim"] // 2


def test_sizes_that_differ_still_differ_and_equal_ones_stay_equal() -> None:
    small06, small17 = shrink(real_config("qwen3-0.6b")), shrink(qwen3_1p7b_config())
    asr = shrink(real_config("qwen3-asr-1.7b"))["thinker_config"]
    assert small06["hidden_size"] != small17["hidden_size"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim"):
        assert asr["text_config"][key] == small17[key], key
    assert asr["audio_config"]["output_dim"] == small17["hidden_size"]
    vl = shrink(qwen3_vl_2b_standin())
    assert vl["vision_config"]["out_hidden_size"] == vl["text_config"]["hidden_size"]
    assert vl["vision_config"]["deepstack_visual_indexes"] == [0, 1]


@pytest.mark.parametrize("name", ["bidirlm-1b-embedding", "bidirlm-1.7b-embedding"])
def test_released_bidirlm_heads_agree_with_their_base_and_pooling(name: str) -> None:
    """The stored head of each released BidirLM text config.json agrees with its base model's
    stored config on every field both state (sizes, head_dim, softcaps, activation, pattern),
    and its 1_Pooling/config.json is mean pooling at the base model's width."""
    head, base_name = real_config(name), BIDIRLM_BASES[name]
    base = qwen3_1p7b_config() if base_name == "qwen3-1.7b" else real_config(base_name)
    shared = set(head) & set(base) - {"architectures", "eos_token_id", "torch_dtype"}
    assert shared, name
    assert {k: head[k] for k in shared} == {k: base[k] for k in shared}
    if "_sliding_window_pattern" in head:  # Gemma3-1B: the period its base states
        assert head["_sliding_window_pattern"] == base["sliding_window_pattern"] == 6
    pooling = real_file(name, "1_Pooling/config.json")
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"]
    assert pooling["word_embedding_dimension"] == base["hidden_size"]
    assert [k for k, v in pooling.items() if v is True] == [
        "pooling_mode_mean_tokens",
        "include_prompt",
    ]
    full = bidirlm_text_config(name)
    assert full["model_type"] == "bidirlm" and full["architectures"] == ["BidirLMModel"]
    check_special_ids(shrink(full))
