"""mergekit's own test configs (tests/test_basic_merges.py, tests/test_chat_template.py and the
tokenizer_source cases of tests/test_tokenizer.py of arcee-ai/mergekit) on tiny Qwen3
checkpoints: each merges with `bidirlm merge` unchanged and, for every deterministic method,
gives the same bits as the installed mergekit.

Like mergekit's `two_model_config`, every model carries `weight` 0.6 / 0.4 whatever the method;
methods that do not read `weight` (slerp, model_stock, sce, ram, karcher, ...) accept it with
one warning, as mergekit ignores it.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from bidirlm.runtime.merging.config import MergeError, config_from_dict
from bidirlm.runtime.merging.merge import MergeWarning, merge_from_config
from tests.merging.fixtures import bits_equal, load_folder, qwen3

RANDOM = ("dare_ties", "della")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk")
    return {k: qwen3(root / k, seed, shard=None) for seed, k in enumerate("abc")}


def two_model(
    a: str, b: str, method: str, base: str | None = None, params: dict | None = None
) -> dict:
    """mergekit's `two_model_config`: weights 0.6 / 0.4, dtype bfloat16."""
    config = {
        "merge_method": method,
        "models": [
            {"model": a, "parameters": {"weight": 0.6}},
            {"model": b, "parameters": {"weight": 0.4}},
        ],
        "dtype": "bfloat16",
    }
    if base is not None:
        config["base_model"] = base
    if params:
        config["parameters"] = params
    return config


def cases(m: dict[str, Path]) -> dict[str, dict]:
    a, b, c = (str(m[k]) for k in "abc")
    out = {
        "passthrough-copy": {"merge_method": "passthrough", "models": [{"model": a}],
                             "dtype": "bfloat16"},
        "passthrough-scale": {"merge_method": "passthrough", "models": [{"model": a, "parameters": {
            "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
        "stack": {"merge_method": "passthrough", "dtype": "bfloat16",
                  "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}] * 2},
        "linear": two_model(a, b, "linear"),
        "slerp": {**two_model(a, b, "slerp", a), "parameters": {"t": 0.35}},
        "task_arithmetic": two_model(a, b, "task_arithmetic", c),
        "breadcrumbs": two_model(a, b, "breadcrumbs", c),
        "ties": two_model(a, b, "ties", c, {"density": 0.3}),
        "sce": two_model(a, b, "sce", c, {"select_topk": 0.5}),
        "ram": two_model(a, b, "ram", c),
        "ramplus_tl": two_model(a, b, "ramplus_tl", c, {"r": 0.05, "alpha": 1.0}),
        "multislerp": two_model(a, b, "multislerp", c),
        "model_stock": two_model(b, c, "model_stock", a),
        "model_stock-filterwise": two_model(b, c, "model_stock", a, {"filter_wise": True}),
        "arcee_fusion": two_model(a, b, "arcee_fusion", a),
        "nearswap": two_model(a, b, "nearswap", a, {"t": 0.0001}),
        "karcher": two_model(a, b, "karcher", c, {"max_iter": 5, "tol": 1e-5}),
        "dare_ties": two_model(a, b, "dare_ties", c, {"density": 0.66}),
        "della": two_model(a, b, "della", c, {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    }  # fmt: skip
    for base in (None, c):
        for row_wise in (False, True):
            for flatten in (False, True):
                params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
                name = f"nuslerp-{'base' if base else 'nobase'}-{row_wise:d}{flatten:d}"
                out[name] = two_model(a, b, "nuslerp", base, params)
    # beyond mergekit's configs: float32, three inputs, no base, non-default parameters
    three = [{"model": x, "parameters": {"weight": w}} for x, w in ((a, 0.2), (b, 0.3), (c, 0.5))]
    out["multislerp-nobase-3"] = {
        "merge_method": "multislerp",
        "models": three,
        "parameters": {"normalize_weights": False},
    }
    out["karcher-3-fp32"] = {"merge_method": "karcher", "models": three, "dtype": "float32"}
    out["sce-int8-fp32"] = {
        **two_model(a, b, "sce", c, {"int8_mask": True, "select_topk": 0.3}),
        "dtype": "float32",
    }
    out["ram-3"] = {
        "merge_method": "ram",
        "base_model": a,
        "models": three[1:],
        "parameters": {"epsilon": 0.05},
    }
    out["ramplus_tl-fp32"] = {
        **two_model(a, b, "ramplus_tl", c, {"epsilon": 0.05}),
        "dtype": "float32",
    }
    out["nearswap-fp32"] = {**two_model(a, b, "nearswap", a, {"t": 0.01}), "dtype": "float32"}
    out["arcee_fusion-out-bf16"] = {**two_model(b, c, "arcee_fusion", c), "out_dtype": "bfloat16"}
    zero = two_model(a, b, "nuslerp", c, {"nuslerp_row_wise": False, "nuslerp_flatten": False})
    zero["models"][0]["parameters"]["weight"] = -0.5
    zero["models"][1]["parameters"]["weight"] = 0.5
    out["nuslerp-zero-sum"] = zero
    return out


CASE_NAMES = list(cases({k: Path(k) for k in "abc"}))
# methods that do not read `weight`: mergekit ignores it, we warn once
IGNORES_WEIGHT = ("slerp", "sce", "ram", "ramplus_tl", "model_stock", "arcee_fusion", "nearswap")
IGNORES_WEIGHT += ("karcher",)


def run_mergekit(config: dict, out: Path) -> Path:
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    cfg = mk_config.MergeConfiguration.model_validate(config)
    mk_merge.run_merge(cfg, str(out), mk_options.MergeOptions(quiet=True))
    return out


@pytest.mark.parametrize("case", CASE_NAMES)
def test_mergekit_config_merges_like_mergekit(case, models, tmp_path):
    config = cases(models)[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_from_config(config_from_dict(config), tmp_path / "ours", threads=2)
    ours = load_folder(tmp_path / "ours")
    assert all(bool(torch.isfinite(t.float()).all()) for t in ours.values())
    notes = [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]
    if case.split("-")[0] in IGNORES_WEIGHT:
        assert len(notes) == 1 and "ignores parameter(s) weight" in notes[0], notes
    else:
        assert notes == []
    if case == "stack":  # mergekit keeps Qwen3's 2 layer_types for 4 layers: its output does
        # not load in transformers; ours (layer_types stacked too) is layer k % 2 of model a
        src = load_folder(models["a"])
        for n, t in ours.items():
            m = re.search(r"layers\.(\d+)\.", n)
            name = n if m is None else n.replace(m.group(0), f"layers.{int(m.group(1)) % 2}.")
            assert bits_equal(t, src[name]), n
        cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
        assert cfg["num_hidden_layers"] == len(cfg["layer_types"]) == 4
        return
    if case in RANDOM:  # mergekit's masks come from torch's global stream: same names/dtypes
        theirs = load_folder(run_mergekit(config, tmp_path / "theirs"))
        assert {n: (t.dtype, t.shape) for n, t in ours.items()} == {
            n: (t.dtype, t.shape) for n, t in theirs.items()
        }
        return
    theirs = load_folder(run_mergekit(config, tmp_path / "theirs"))
    assert sorted(ours) == sorted(theirs)
    differing = [n for n in theirs if not bits_equal(ours[n], theirs[n])]
    assert not differing, (
        f"{case}: {len(differing)}/{len(theirs)} differ, e.g. {differing[0]} "
        f"{ours[differing[0]].dtype}/{theirs[differing[0]].dtype}"
    )
    if case == "passthrough-scale":
        assert all(bool((t == 0).all()) for n, t in ours.items() if "o_proj" in n)
    if case == "stack":
        assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 4


def test_della_invalid_epsilon_is_refused(models, tmp_path):
    """mergekit's test_della_invalid_epsilon: density 0.66 +/- epsilon 1.35 leaves (0, 1)."""
    a, b, c = (str(models[k]) for k in "abc")
    config = two_model(a, b, "della", c, {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    with pytest.raises(MergeError, match="epsilon") as err:
        merge_from_config(config_from_dict(config), tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def with_tokenizer(models, tmp_path_factory) -> Path:
    """Model a with a tokenizer and no chat template (mergekit's `model_base`)."""
    from tests.merging.test_merge_methods import train_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "a"
    import shutil

    shutil.copytree(models["a"], folder)
    train_tokenizer(128, json).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    "template, needle",
    [("chatml", "<|im_start|>"), ("{{messages[0]['content']}}", "{{messages[0]['content']}}")],
)
def test_chat_template(template, needle, with_tokenizer, models, tmp_path):
    """mergekit's test_chat_template: a named or literal template lands in the tokenizer."""
    from transformers import AutoTokenizer

    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(with_tokenizer), "parameters": {"weight": 0.5}},
            {"model": str(models["b"]), "parameters": {"weight": 0.5}},
        ],
        "base_model": str(with_tokenizer),
        "dtype": "bfloat16",
        "chat_template": template,
    }
    merge_from_config(config_from_dict(config), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.chat_template and needle in tok.chat_template
    if template == "chatml":
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_refusals(with_tokenizer, models, tmp_path):
    base = {
        "merge_method": "linear",
        "models": [
            {"model": str(with_tokenizer), "parameters": {"weight": 0.5}},
            {"model": str(models["b"]), "parameters": {"weight": 0.5}},
        ],
    }
    for value, needle in (("llama3", "shipped with mergekit"), ("short", "neither auto")):
        with pytest.raises(MergeError, match=needle):
            merge_from_config(config_from_dict({**base, "chat_template": value}), tmp_path / "o")
    no_tok = {**base, "models": base["models"][::-1], "chat_template": "chatml"}
    with pytest.raises(MergeError, match="chat_template needs a tokenizer"):
        merge_from_config(config_from_dict(no_tok), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_modules_and_hub_ids_are_refused_with_the_reason(models):
    a = str(models["a"])
    with pytest.raises(MergeError, match="modules.*not supported.*take"):
        config_from_dict({"merge_method": "linear", "modules": {"text_decoder": {}}})
    for ref in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B@main", "org/model+org/lora"):
        data = {"merge_method": "linear", "models": [{"model": a}, {"model": ref}]}
        with pytest.raises(MergeError, match="local model folders only and never downloads"):
            config_from_dict(data)


def test_ignored_parameters_warn_once_and_typos_are_refused(models, tmp_path):
    a, b, c = (str(models[k]) for k in "abc")
    config = two_model(a, b, "task_arithmetic", c, {"t": 0.5, "density": 0.5})
    config["models"][0]["parameters"]["gamma"] = 0.1  # a breadcrumbs parameter: ignored too
    parsed = config_from_dict(config)
    assert parsed.ignored == ("t", "gamma")
    linear = two_model(a, b, "linear", params={"density": 0.5})  # mergekit ignores it too
    assert config_from_dict(linear).ignored == ("density",)
    with pytest.raises(MergeError, match="unknown parameter 'wieght'"):
        config_from_dict({**linear, "parameters": {"wieght": 1}})


def test_same_yaml_text_through_the_cli(models, tmp_path, capsys):
    """The YAML of mergekit's slerp test (with its ignored weights) runs with `bidirlm merge`:
    exit 0, one warning line."""
    from bidirlm import cli

    text = yaml.safe_dump({**two_model(str(models["a"]), str(models["b"]), "slerp",
                                       str(models["a"])), "parameters": {"t": 0.35}})  # fmt: skip
    cfg = tmp_path / "m.yml"
    cfg.write_text(text)
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("ignores parameter(s) weight") == 1 and "Traceback" not in err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1


# --- mergekit's tests/test_tokenizer.py configs ------------------------------------------------


def mergekit_style_tokenizer(vocab_size: int, added: list[str]):  # noqa: ANN201
    """A BPE tokenizer of `_tok_N` tokens plus added tokens, like mergekit's `make_tokenizer`."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    data = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size))), "merges": []},
        "added_tokens": [],
    }
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(data)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.add_tokens(added)
    return tok


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mergekit's model_base (64 rows, 64 tokens), model_padded (64 rows, 4 unused tokens past
    them) and model_chatml (66 rows: 64 tokens + <|im_start|>, <|im_end|>)."""
    root = tmp_path_factory.mktemp("mktok")
    spec = {
        "base": (64, []),
        "padded": (64, [f"<UNUSED_{i}>" for i in range(4)]),
        "chatml": (66, ["<|im_start|>", "<|im_end|>"]),
    }
    out = {}
    for seed, (name, (rows, added)) in enumerate(spec.items()):
        out[name] = qwen3(root / name, 10 + seed, vocab=rows, shard=None, dtype=torch.float32)
        mergekit_style_tokenizer(64, added).save_pretrained(str(out[name]))
    return out


def tokenizer_config(m: dict[str, Path], keys: str, **extra: object) -> dict:
    return {
        "merge_method": "linear",
        "base_model": str(m["base"]),
        "models": [{"model": str(m[k]), "parameters": {"weight": 1.0}} for k in keys.split()],
        "dtype": "float32",
        **extra,
    }


TOKENIZER_CASES = {
    "source_base": ("base padded chatml", {"tokenizer_source": "base"}, 64),
    "source_union": ("base padded chatml", {"tokenizer_source": "union"}, 66),
    "source_model": ("base padded chatml", {"tokenizer_source": "chatml"}, 66),
    "slerp_union": (
        "base chatml",
        {"tokenizer_source": "union", "merge_method": "slerp", "parameters": {"t": 0.5}},
        66,
    ),
    "pad_to_multiple_of": (
        "chatml",
        {"tokenizer": {"source": "base", "pad_to_multiple_of": 16}},
        66,
    ),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_mergekit_tokenizer_configs(case, tok_models, tmp_path):
    from transformers import AutoTokenizer

    keys, extra, size = TOKENIZER_CASES[case]
    if extra.get("tokenizer_source") == "chatml":
        extra = {"tokenizer_source": str(tok_models["chatml"])}
    config = tokenizer_config(tok_models, keys, **extra)
    if case == "pad_to_multiple_of":
        config["base_model"] = str(tok_models["chatml"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)  # slerp ignores the weights
        merge_from_config(config_from_dict(config), tmp_path / "ours")
    theirs_dir = run_mergekit(config, tmp_path / "theirs")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert len(tok.get_vocab()) == size
    if size == 66:
        assert {"<|im_start|>", "<|im_end|>"} <= set(tok.get_vocab())
    assert not any(t.startswith("<UNUSED_") for t in tok.get_vocab())
    ours, theirs = load_folder(tmp_path / "ours"), load_folder(theirs_dir)
    embed = "model.embed_tokens.weight"
    rows = {"pad_to_multiple_of": 80}.get(case, size)
    assert ours[embed].shape[0] == theirs[embed].shape[0] == rows
    mk_vocab = AutoTokenizer.from_pretrained(str(theirs_dir)).get_vocab()
    for t, i in tok.get_vocab().items():  # token by token (union ids may be numbered apart)
        assert bits_equal(ours[embed][i], theirs[embed][mk_vocab[t]]), t
    if rows > size:  # padding rows: the mean embedding in both
        assert bits_equal(ours[embed][size:], theirs[embed][size:])
    others = [n for n in theirs if n != embed]
    assert all(bits_equal(ours[n], theirs[n]) for n in others)


def test_chat_template_auto_takes_the_inputs_template(with_tokenizer, models, tmp_path):
    """`auto`: the template most inputs share (here the only one that has one), as mergekit."""
    from transformers import AutoTokenizer

    templated = tmp_path / "templated"
    import shutil

    shutil.copytree(with_tokenizer, templated)
    tok = AutoTokenizer.from_pretrained(str(templated))
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    tok.save_pretrained(str(templated))
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(with_tokenizer), "parameters": {"weight": 0.5}},
            {"model": str(templated), "parameters": {"weight": 0.5}},
        ],
        "chat_template": "auto",
    }
    merge_from_config(config_from_dict(config), tmp_path / "out")
    out = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert out.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "[user] hi"
    )


def test_legacy_mode_is_refused_as_installed_mergekit_does(tok_models, tmp_path):
    """mergekit's test_legacy_mode (64/64/66 rows, no tokenizer_source): mergekit 0.1.5 refuses
    it ("Tensor size mismatch ... Align vocabulary axes with tokenizer configuration"); so do
    we, naming the fix. With `tokenizer_source: base` both merge it (test above)."""
    config = tokenizer_config(tok_models, "base padded chatml")
    with pytest.raises(MergeError, match="vocabulary size mismatch.*tokenizer_source: base"):
        merge_from_config(config_from_dict(config), tmp_path / "ours")
    with pytest.raises(ValueError, match="Tensor size mismatch"):
        run_mergekit(config, tmp_path / "theirs")


def test_mergekit_model_dump_runs_unchanged(models, tmp_path):
    """A config dumped by mergekit's own `MergeConfiguration.model_dump()` (every unset key as
    None, `modules: None` included), or the `MergeConfiguration` itself, merges as its YAML."""
    mk_config = pytest.importorskip("mergekit.config")
    config = two_model(str(models["a"]), str(models["b"]), "slerp", str(models["a"]))
    config["parameters"] = {"t": 0.35}
    dumped = mk_config.MergeConfiguration.model_validate(config).model_dump()
    assert "modules" in dumped and dumped["modules"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)
        merge_from_config(config_from_dict(dumped), tmp_path / "dumped")
        merge_from_config(config_from_dict(config), tmp_path / "yaml")
        merge_from_config(mk_config.MergeConfiguration.model_validate(config), tmp_path / "obj")
    a, b = load_folder(tmp_path / "dumped"), load_folder(tmp_path / "yaml")
    assert all(bits_equal(a[n], b[n]) for n in b)
    assert all(bits_equal(t, b[n]) for n, t in load_folder(tmp_path / "obj").items())


@pytest.mark.parametrize("case", ["linear", "slerp", "ties", "sce", "karcher", "nuslerp-base-11"])
def test_mergekit_run_and_check_merge_with_only_the_import_changed(case, models):
    """mergekit's `tests/common.py::run_and_check_merge` body, with `run_merge` imported from
    bidirlm instead of mergekit: it writes into mergekit's fresh temporary folder, and mergekit's
    own loader and architecture tables accept the result (no NaN, every weight present)."""
    import os
    import tempfile

    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.architecture import arch_info_for_config
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
    from mergekit.merge import MergeOptions
    from transformers import AutoConfig

    from bidirlm.runtime.merging.merge import run_merge  # the only changed import

    config = mk_config.MergeConfiguration.model_validate(cases(models)[case])
    with tempfile.TemporaryDirectory() as tmpdir, warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeWarning)
        run_merge(config, out_path=tmpdir, options=MergeOptions())
        index_path = os.path.join(tmpdir, "model.safetensors.index.json")
        assert os.path.exists(index_path) or os.path.exists(index_path.replace(".index.json", ""))
        assert os.path.exists(os.path.join(tmpdir, "config.json"))
        loader = LazyTensorLoader.from_disk(tmpdir, lazy_unpickle=False)
        for name in loader.index.tensor_paths:
            assert not loader.get_tensor(name).view(-1).isnan().any()
        model_config = AutoConfig.from_pretrained(tmpdir)
        index = ShardedTensorIndex.from_disk(tmpdir)
        for weight in arch_info_for_config(model_config).all_weights(model_config):
            if not weight.optional:
                assert weight.name in index.tensor_paths or any(
                    a in index.tensor_paths for a in weight.aliases
                ), weight.name
