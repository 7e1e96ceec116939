"""mergekit's merge methods, `slices:` and `tokenizer_source:` against the installed mergekit:
the same YAML gives the same tensors and config (bitwise for every deterministic method); the
random ones (dare_*, della*) are reproducible and match mergekit's statistics."""

from __future__ import annotations

import inspect
import json
import json.decoder
import json.encoder
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from bidirlm.runtime.merging.config import MergeError, config_from_dict
from bidirlm.runtime.merging.merge import merge_from_config
from bidirlm.runtime.merging.methods import bernoulli, della_magprune, tensor_generator
from tests.merging.fixtures import TEXT, bits_equal, load_folder, qwen3


def train_tokenizer(size: int, module) -> object:  # noqa: ANN001
    """A byte-level BPE of `size` tokens trained on a stdlib module's source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([inspect.getsource(module)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def llama(folder: Path, seed: int) -> Path:
    """A 2-layer Llama (transformers' Qwen3 config has `layer_types`, which mergekit's layer
    stacking leaves at the input's length: transformers then refuses mergekit's config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in TEXT.items()}
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, "vocab_size": 512}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen3 checkpoints, vocab_size 512 with a 504-token tokenizer (issue 13 item 19):
    a, b, c share a base plus noise (bf16); f0, f1 are float32; u has another tokenizer."""
    root = tmp_path_factory.mktemp("methods")
    tok = train_tokenizer(504, json.decoder)
    assert len(tok) == 504
    out = {}
    for key, seed in (("a", 0), ("b", 1), ("c", 2)):
        out[key] = qwen3(root / key, seed, vocab=512, shard="24KB")
        tok.save_pretrained(str(out[key]))
    for key, seed in (("f0", 3), ("f1", 4)):
        out[key] = qwen3(root / key, seed, vocab=512, dtype=torch.float32, shard=None)
        tok.save_pretrained(str(out[key]))
    for key, seed in (("la", 6), ("lb", 7)):  # Llama: mergekit's slices break Qwen3's config
        out[key] = llama(root / key, seed)
        tok.save_pretrained(str(out[key]))
    other = train_tokenizer(400, json.encoder)
    other.add_tokens(["<tool>", "</tool>"])
    out["u"] = qwen3(root / "u", 5, vocab=512, shard=None)
    other.save_pretrained(str(out["u"]))
    return out


CASES = {
    # issue 13 item 19: vocab_size 512 > 504 tokens: both cut the vocabulary tensors to 504
    "tokenizer-base": """
merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
tokenizer_source: base
""",
    "tokenizer-path": """
merge_method: task_arithmetic
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.6}}
  - model: {c}
    parameters: {{weight: 0.4}}
tokenizer_source: {c}
""",
    "tokenizer-union": """
merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {u}
    parameters: {{weight: 0.5}}
tokenizer_source: union
""",
    "tokenizer-section-pad": """
merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 0.5}}
tokenizer:
  source: base
  pad_to_multiple_of: 48
""",
    "ties": """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.7, density: 0.4}}
  - model: {c}
    parameters: {{weight: [0.2, 0.9], density: [{{filter: mlp, value: 0.7}}, {{value: 0.3}}]}}
parameters: {{lambda: 0.9}}
""",
    "ties-fp32-int8": """
merge_method: ties
base_model: {f0}
models:
  - model: {f1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {a}
    parameters: {{weight: 0.5, density: 0.8}}
parameters: {{int8_mask: true, normalize: false}}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
  - model: {c}
    parameters: {{weight: 0.5, density: 0.6}}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.6, density: 0.9, gamma: 0.02}}
  - model: {c}
    parameters: {{weight: 0.4, density: 0.7}}
parameters: {{rescale: true}}
dtype: float32
out_dtype: bfloat16
""",
    "dare_ties-dense": """
merge_method: dare_ties
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.6, density: 1.0}}
  - model: {c}
    parameters: {{weight: 0.5}}
""",
    "slerp": """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - {{filter: self_attn, value: [0.1, 0.5, 0.3, 0.7, 0.9]}}
    - {{filter: mlp, value: [0.9, 0.5, 0.7, 0.3, 0.0]}}
    - {{value: 0.5}}
""",
    "slerp-fp32": """
merge_method: slerp
base_model: {f1}
models:
  - model: {f0}
  - model: {f1}
parameters: {{t: [0.2, 0.8]}}
""",
    "nuslerp-base": """
merge_method: nuslerp
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.9}}
""",
    "nuslerp-rows": """
merge_method: nuslerp
models:
  - model: {f0}
    parameters: {{weight: 1.0}}
  - model: {f1}
    parameters: {{weight: 2.0}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
    "model_stock": """
merge_method: model_stock
base_model: {a}
models:
  - model: {b}
  - model: {c}
  - model: {u}
""",
    "model_stock-filter": """
merge_method: model_stock
base_model: {f0}
models:
  - model: {f1}
  - model: {a}
  - model: {b}
parameters: {{filter_wise: true}}
dtype: float32
""",
    "slices-stack": """
merge_method: passthrough
slices:
  - sources:
      - model: {la}
        layer_range: [0, 2]
  - sources:
      - model: {lb}
        layer_range: [1, 2]
        parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}
  - sources:
      - model: {la}
        layer_range: [0, 1]
dtype: bfloat16
""",
    "slices-slerp": """
merge_method: slerp
base_model: {la}
slices:
  - sources:
      - model: {la}
        layer_range: [0, 2]
      - model: {lb}
        layer_range: [0, 2]
    parameters: {{t: [0.1, 0.9]}}
  - sources:
      - model: {la}
        layer_range: [1, 2]
      - model: {lb}
        layer_range: [0, 1]
parameters: {{t: 0.4}}
""",
}


@pytest.fixture(scope="module")
def mergekit_run(tmp_path_factory):
    """Run mergekit in-process (its import alone takes seconds), once per YAML."""
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    root = tmp_path_factory.mktemp("mergekit")

    def run(name: str, text: str) -> Path:
        config = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
        mk_merge.run_merge(config, str(root / name), mk_options.MergeOptions(quiet=True))
        return root / name

    return run


def _by_token(tensors: dict, folder: Path) -> dict:
    """Vocabulary tensors re-ordered by token string (other tensors unchanged)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    order = torch.tensor([vocab[t] for t in sorted(vocab)])
    return {n: (x[order] if "embed_tokens" in n else x) for n, x in tensors.items()}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_and_config_as_mergekit(case, ckpts, mergekit_run, tmp_path):
    text = CASES[case].format(**{k: str(v) for k, v in ckpts.items()})
    theirs_dir = mergekit_run(case, text)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    merge_from_config(cfg, tmp_path / "ours", threads=2)
    ours, theirs = load_folder(tmp_path / "ours"), load_folder(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    if "union" in case:  # mergekit's added-token ids vary run to run: compare token by token
        ours, theirs = _by_token(ours, tmp_path / "ours"), _by_token(theirs, theirs_dir)
    differing = [n for n in theirs if not bits_equal(ours[n], theirs[n])]
    assert not differing, (
        f"{case}: {len(differing)}/{len(theirs)} tensors differ, e.g. {differing[0]}: max "
        f"{(ours[differing[0]].double() - theirs[differing[0]].double()).abs().max()}"
    )
    ours_cfg, theirs_cfg = _config(tmp_path / "ours"), _config(theirs_dir)
    for key in ("vocab_size", "num_hidden_layers"):
        assert ours_cfg[key] == theirs_cfg[key], key
    # the merge really mixes its inputs (not one model copied through)
    name = "model.layers.0.mlp.up_proj.weight"
    inputs = [load_folder(p) for p in ckpts.values()]
    if case != "slices-stack":
        inputs = [x for x in inputs if name in x and x[name].shape == ours[name].shape]
        assert all(not torch.equal(ours[name].float(), x[name].float()) for x in inputs)
    if case.startswith("tokenizer"):
        rows = ours["model.embed_tokens.weight"].shape[0]
        expected = len(_union_vocab(ckpts)) if "union" in case else 504
        if "pad" in case:
            expected = 528  # 504 rounded up to a multiple of 48; the extra rows hold the mean
            mean = ours["model.embed_tokens.weight"][:504].float().mean(0)
            torch.testing.assert_close(ours["model.embed_tokens.weight"][-1].float(), mean,
                                       rtol=0.01, atol=0.002)  # fmt: skip
        assert ours_cfg["vocab_size"] == rows == expected
    if case.startswith("slices"):
        n_layers = 4 if case == "slices-stack" else 3
        assert ours_cfg["num_hidden_layers"] == n_layers
        assert f"model.layers.{n_layers - 1}.mlp.up_proj.weight" in ours


def _union_vocab(ckpts: dict[str, Path]) -> set[str]:
    from transformers import AutoTokenizer

    a, u = (AutoTokenizer.from_pretrained(str(ckpts[k])).get_vocab() for k in "au")
    return set(a) | set(u)


def test_union_tokenizer_rows(ckpts, tmp_path):
    """Union: the base's 504 tokens, then u's tokens the base lacks (as added tokens); a row
    only u has is u's row in every model, so the 0.5/0.5 average reproduces it exactly."""
    from transformers import AutoTokenizer

    text = CASES["tokenizer-union"].format(**{k: str(v) for k, v in ckpts.items()})
    merge_from_config(config_from_dict(yaml.safe_load(text)), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    u_tok = AutoTokenizer.from_pretrained(str(ckpts["u"]))
    a_tok = AutoTokenizer.from_pretrained(str(ckpts["a"]))
    merged = load_folder(tmp_path / "out")["model.embed_tokens.weight"]
    a_rows = load_folder(ckpts["a"])["model.embed_tokens.weight"]
    u_rows = load_folder(ckpts["u"])["model.embed_tokens.weight"]
    assert len(tok) == merged.shape[0] == len(_union_vocab(ckpts))
    only_u = tok.convert_tokens_to_ids("<tool>")
    assert only_u >= 504 and torch.equal(
        merged[only_u], u_rows[u_tok.convert_tokens_to_ids("<tool>")]
    )
    shared = next(t for t in a_tok.get_vocab() if t in u_tok.get_vocab() and len(t) > 2)
    i, j, k = (x.convert_tokens_to_ids(shared) for x in (tok, a_tok, u_tok))
    expected = (0.5 * a_rows[j].float() + 0.5 * u_rows[k].float()).bfloat16()
    assert torch.equal(merged[i], expected)


RANDOM = """
merge_method: {method}
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 1.0, density: 0.3}}
parameters: {{rescale: false}}
dtype: float32
"""


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_reproducible_and_distributed_like_mergekit(
    method, ckpts, mergekit_run, tmp_path
):
    """mergekit draws its masks from torch's global stream in its scheduler's order, which
    cannot be reproduced: we match its keep rate per tensor instead, and are reproducible."""
    text = RANDOM.format(method=method, **{k: str(v) for k, v in ckpts.items()})
    cfg = tmp_path / "m.yml"
    cfg.write_text(text)
    merge_from_config(cfg, tmp_path / "x", threads=1)
    merge_from_config(cfg, tmp_path / "y", threads=3, shard_size="10KB")
    cfg.write_text(text + "random_seed: 7\n")
    merge_from_config(cfg, tmp_path / "z")
    x, y, z = (load_folder(tmp_path / k) for k in "xyz")
    assert all(bits_equal(x[n], y[n]) for n in x)
    assert any(not bits_equal(x[n], z[n]) for n in x)
    theirs = load_folder(mergekit_run(method, text))
    base, other = load_folder(ckpts["a"]), load_folder(ckpts["b"])
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        d = other[name].float() - base[name].float()
        for merged in (x[name], theirs[name]):
            kept = merged.float() - base[name].float()
            # without rescaling, every element is either the full delta or nothing
            keep = (kept - d).abs() <= 1e-6 * d.abs().max()
            drop = kept.abs() <= 1e-6 * d.abs().max()
            assert bool((keep | drop).all())
            rate = float(keep[d != 0].float().mean())
            n = int((d != 0).sum())
            assert abs(rate - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5, (name, rate)


def test_sparsifiers_statistics():
    """Bernoulli keeps `density` of the elements and, rescaled, the L1 norm; MagPrune keeps
    large magnitudes more often (probability density +/- epsilon by rank)."""
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    kept = bernoulli(x, 0.25, True, tensor_generator(0, "x", 0))
    frac = float((kept != 0).float().mean())
    assert abs(frac - 0.25) < 5 * (0.25 * 0.75 / x.numel()) ** 0.5
    torch.testing.assert_close(kept.abs().sum(), x.abs().sum(), rtol=1e-5, atol=0)
    pruned = della_magprune(x, 0.5, 0.4, False, tensor_generator(0, "x", 1))
    ranks = x.abs().argsort(dim=1).argsort(dim=1)
    low = (pruned != 0)[ranks < 64].float().mean()
    high = (pruned != 0)[ranks >= 448].float().mean()
    assert 0.1 < float(low) < 0.2 and 0.8 < float(high) < 0.9
    again = della_magprune(x, 0.5, 0.4, False, tensor_generator(0, "x", 1))
    assert torch.equal(pruned, again)


BAD = {
    "slerp-3": ("merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {b}}}, {{model: {c}}}]\n"
                "parameters: {{t: 0.5}}\n", "takes exactly 2 inputs"),
    "slerp-no-t": ("merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {b}}}]\n",
                   "needs parameter `t`"),
    "ties-no-base": ("merge_method: ties\nmodels: [{{model: {b}, parameters: {{weight: 1}}}}]\n",
                     "needs `base_model:`"),
    "stock-2": ("merge_method: model_stock\nbase_model: {a}\nmodels: [{{model: {b}}}]\n",
                "at least 3 inputs"),
    "nuslerp-1": ("merge_method: nuslerp\nmodels: [{{model: {b}, parameters: {{weight: 1}}}}]\n",
                  "exactly 2 non-base inputs"),
    "passthrough-2": ("merge_method: passthrough\nmodels: [{{model: {a}}}, {{model: {b}}}]\n",
                      "takes exactly 1 inputs"),
    "slices-uneven": (
        "merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
        "      - {{model: {b}, layer_range: [0, 1]}}\n", "same number of layers"),
    "slices-range": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: "
        "[1, 5]}}\n", "has no layer 2"),
    "tokens": ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n"
               "tokenizer: {{source: base, tokens: {{x: {{source: zero}}}}}}\n",
               "tokenizer.tokens"),
    "epsilon": ("merge_method: della\nbase_model: {a}\nmodels: [{{model: {b}, parameters: "
                "{{weight: 1, density: 0.9, epsilon: 0.2}}}}]\n", "must stay in"),
    "seed": ("merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n"
             "random_seed: -1\n", "random_seed"),
    "typo": ("merge_method: ties\nbase_model: {a}\nmodels: [{{model: {b}, parameters: "
             "{{weight: 1, gama: 0.1}}}}]\n", "unknown parameter 'gama'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_are_one_line_errors(case, ckpts, tmp_path):
    text, needle = BAD[case]
    text = text.format(**{k: str(v) for k, v in ckpts.items()})
    with pytest.raises(MergeError, match=needle.replace("(", r"\(").replace("`", "`")) as err:
        merge_from_config(config_from_dict(yaml.safe_load(text)), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_accepts_mergekit_yaml(ckpts, tmp_path):
    from bidirlm import cli

    text = CASES["ties"].format(**{k: str(v) for k, v in ckpts.items()})
    cfg = tmp_path / "ties.yml"
    cfg.write_text(textwrap.dedent(text))
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_python_api_takes_method_parameters(ckpts, mergekit_run, tmp_path):
    """`merge(..., method=, parameters=)` is the YAML's merge (a None weight sets none)."""
    from bidirlm.runtime.merging.merge import merge

    text = CASES["ties"].format(**{k: str(v) for k, v in ckpts.items()})
    cfg = tmp_path / "m.yml"
    cfg.write_text(text.replace("[0.2, 0.9]", "0.5").replace(
        "[{filter: mlp, value: 0.7}, {value: 0.3}]", "0.4"))  # fmt: skip
    merge_from_config(cfg, tmp_path / "yaml")
    merge([ckpts["b"], ckpts["c"]], [0.7, 0.5], tmp_path / "api", method="ties",
          base=ckpts["a"], parameters={"lambda": 0.9, "density": 0.4})  # fmt: skip
    a, b = load_folder(tmp_path / "yaml"), load_folder(tmp_path / "api")
    assert all(bits_equal(a[n], b[n]) for n in a)
    merge([ckpts["f0"], ckpts["f1"]], [None, None], tmp_path / "slerp", method="slerp",
          base=ckpts["f1"], parameters={"t": [0.2, 0.8]})  # fmt: skip
    theirs = load_folder(mergekit_run("slerp-api", CASES["slerp-fp32"].format(
        **{k: str(v) for k, v in ckpts.items()})))  # fmt: skip
    ours = load_folder(tmp_path / "slerp")
    assert all(bits_equal(ours[n], theirs[n]) for n in theirs)
