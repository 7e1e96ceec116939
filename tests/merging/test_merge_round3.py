"""Issue 24's merge cases (round three of new-user testing): two merges to one output, a
tokenizer_source without a tokenizer, a config_from of another architecture, shard paths leaving
the model folder, parameters outside their domain, and a Qwen3 + Gemma3 merge. Each failed before
(exit 0 or a misleading message) and is now a one-line error with nothing written, or a refusal
that leaves the other run's / the user's folder as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bidirlm import cli
from bidirlm.runtime.merging.config import MergeError, config_from_dict
from bidirlm.runtime.merging.merge import merge_from_config
from tests.merging.fixtures import bits_equal, load_folder, qwen3


def gemma3(folder: Path) -> Path:
    """A tiny Gemma3 text model (same hidden size and vocabulary as `fixtures.qwen3`)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        sliding_window=16,
    )
    Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("round3")
    out = {k: qwen3(root / k, seed, shard=None) for seed, k in enumerate("ab")}
    out["g"] = gemma3(root / "g")
    notok = qwen3(root / "notok", 3, shard=None)  # a processor file, no tokenizer
    (notok / "preprocessor_config.json").write_text('{"image_processor_type": "x"}')
    out["notok"] = notok
    return out


def linear(*models: Path, **extra: object) -> dict:
    data = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
    }
    return {**data, **extra}


def one_line_error(data: dict, out: Path, needle: str) -> str:
    with pytest.raises(MergeError) as err:
        merge_from_config(config_from_dict(data), out)
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".out")]
    return message


# --- item 1: two merges to the same output -------------------------------------------------


def test_second_merge_to_the_same_output_is_refused_while_the_first_runs(ckpts, tmp_path):
    out = tmp_path / "out"
    seen: list[str] = []

    def second_run(name: str, done: int, total: int) -> None:
        if done == 1:  # the first merge is writing: a second one to the same output
            with pytest.raises(MergeError) as err:
                merge_from_config(config_from_dict(linear(ckpts["b"], ckpts["a"])), out)
            seen.append(str(err.value))

    merge_from_config(config_from_dict(linear(ckpts["a"], ckpts["b"])), out, on_tensor=second_run)
    assert len(seen) == 1 and "\n" not in seen[0] and str(out) in seen[0], seen
    # the first run's result is published, whole
    a, b = load_folder(ckpts["a"]), load_folder(ckpts["b"])
    merged = load_folder(out)
    name = "model.layers.0.mlp.up_proj.weight"
    ref = (0.5 * a[name].float() + 0.5 * b[name].float()) / 1.0
    assert bits_equal(merged[name], ref.bfloat16())


def test_output_that_appears_while_merging_is_left_alone_unless_force(ckpts, tmp_path):
    out = tmp_path / "out"

    def user_creates_it(name: str, done: int, total: int) -> None:
        if done == 1:
            out.mkdir()
            (out / "notes.txt").write_text("mine")

    with pytest.raises(MergeError, match="appeared while this run was writing") as err:
        merge_from_config(
            config_from_dict(linear(ckpts["a"], ckpts["b"])), out, on_tensor=user_creates_it
        )
    assert "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries, no lock
    shutil.rmtree(out)
    merge_from_config(
        config_from_dict(linear(ckpts["a"], ckpts["b"])),
        out,
        on_tensor=user_creates_it,
        force=True,
    )
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


# --- item 5: tokenizer_source without a tokenizer -------------------------------------------


def test_tokenizer_source_without_tokenizer_is_an_error(ckpts, tmp_path):
    data = linear(ckpts["a"], ckpts["b"], tokenizer_source=str(ckpts["notok"]))
    with pytest.raises(MergeError, match="has no tokenizer") as err:
        config_from_dict(data)
    assert str(ckpts["notok"]) in str(err.value) and "\n" not in str(err.value)
    data = linear(ckpts["notok"], ckpts["b"], base_model=str(ckpts["notok"]))
    with pytest.raises(MergeError, match="has no tokenizer"):
        config_from_dict({**data, "tokenizer_source": "base"})


# --- item 6: config_from of another architecture ---------------------------------------------


def test_config_from_another_architecture_is_refused_before_writing(ckpts, tmp_path):
    data = linear(ckpts["a"], ckpts["b"], config_from=str(ckpts["g"]))
    message = one_line_error(data, tmp_path / "out", "does not fit the merged tensors")
    assert "gemma3" in message and "config_from" in message
    # the right config passes (the check does not refuse what loads)
    data = linear(ckpts["a"], ckpts["b"], config_from=str(ckpts["b"]))
    merge_from_config(config_from_dict(data), tmp_path / "ok")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "ok")


def test_config_from_with_other_sizes_names_the_tensor(ckpts, tmp_path):
    wide = tmp_path / "wide"
    wide.mkdir()
    cfg = json.loads((ckpts["a"] / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    data = linear(ckpts["a"], ckpts["b"], config_from=str(wide))
    message = one_line_error(data, tmp_path / "out", "does not fit the merged tensors")
    pairs = (("[64, 32]", "[96, 32]"), ("[32, 64]", "[32, 96]"))  # up/gate or down_proj
    assert "mlp" in message and any(x in message and y in message for x, y in pairs), message


# --- item 8: index.json shard paths leaving the folder -------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_with_shard_outside_the_folder_is_refused(ckpts, tmp_path, where):
    model = tmp_path / "m"
    shutil.copytree(ckpts["b"], model)
    outside = tmp_path / "elsewhere.safetensors"  # exists: it would have been read
    (model / "model.safetensors").rename(outside)
    fname = "../elsewhere.safetensors" if where == "parent" else str(outside)
    names = load_folder(ckpts["b"])
    index = {"metadata": {}, "weight_map": {n: fname for n in names}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    message = one_line_error(linear(ckpts["a"], model), tmp_path / "out", "outside the model")
    assert fname in message and "refusing" in message and "does not hold" not in message


# --- item 9: parameters outside their domain -------------------------------------------------

DOMAIN = {
    "ties-density-neg": ("ties", {"density": -0.5}, "density", "in [0, 1]"),
    "ties-density-big": ("ties", {"density": 1.7}, "density", "in [0, 1]"),
    "slerp-t": ("slerp", {"t": 2.5}, "t", "in [0, 1]"),
    "slerp-t-gradient": ("slerp", {"t": [0.2, 1.3]}, "t", "in [0, 1]"),
    "breadcrumbs-gamma": ("breadcrumbs", {"gamma": 1.5, "density": 0.5}, "gamma", "in [0, 1]"),
    "della-epsilon": ("della", {"epsilon": -0.1, "density": 0.5}, "epsilon", ">= 0"),
    "dare-density-filter": (
        "dare_linear", {"density": [{"filter": "mlp", "value": 3}, {"value": 0.5}]}, "density",
        "in [0, 1]",
    ),
    "sce-topk": ("sce", {"select_topk": 2}, "select_topk", "in [0, 1]"),
    "nearswap-t": ("nearswap", {"t": -1}, "t", ">= 0"),
    "karcher-iter": ("karcher", {"max_iter": 2.5}, "max_iter", "whole number"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DOMAIN))
def test_parameters_outside_their_domain_are_one_line_errors(case, ckpts, tmp_path):
    method, params, key, needle = DOMAIN[case]
    a, b = str(ckpts["a"]), str(ckpts["b"])
    data = {
        "merge_method": method,
        "base_model": a,
        "models": [{"model": a}, {"model": b, "parameters": {"weight": 1.0}}],
        "parameters": params,
    }
    if method == "karcher":
        del data["base_model"]
    with pytest.raises(MergeError) as err:
        config_from_dict(data)
    message = str(err.value)
    assert message.startswith(key) and needle in message and method in message, message
    assert "\n" not in message


def test_domain_errors_through_the_cli(ckpts, tmp_path, capsys):
    cfg = tmp_path / "m.yml"
    cfg.write_text(
        f"merge_method: slerp\nbase_model: {ckpts['a']}\nmodels:\n  - model: {ckpts['a']}\n"
        f"  - model: {ckpts['b']}\nparameters: {{t: 2.5}}\n"
    )
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t must be in [0, 1] for merge_method slerp, got 2.5" in err


# --- item 14: Qwen3 + Gemma3 ------------------------------------------------------------------


def test_qwen3_plus_gemma3_says_architectures_differ(ckpts, tmp_path):
    message = one_line_error(linear(ckpts["a"], ckpts["g"]), tmp_path / "out", "architectures")
    assert "architectures differ" in message and "qwen3" in message and "gemma3" in message
    assert "rename" not in message and "take" not in message and "exclude" not in message


# --- item 20: the fused non-finite check keeps catching every NaN/Inf -------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_min_max_finite_check_catches_every_non_finite_value(dtype):
    from bidirlm.runtime.merging.merge import is_finite

    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 31, 4097, 70001):
        x = torch.randn(n, generator=gen).to(dtype)
        assert is_finite(x)
        for bad in (float("nan"), float("inf"), float("-inf")):
            for pos in {0, n // 2, n - 1}:
                y = x.clone()
                y[pos] = bad
                assert not is_finite(y), (n, bad, pos)
    assert is_finite(torch.empty(0, dtype=dtype))
    big = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)  # largest finite: still finite
    assert is_finite(big) and is_finite(-big)
