"""Training config: TOML -> typed dataclasses, --set overrides, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib

from bidirlm.runtime.training.config import (
    TrainConfig,
    apply_overrides,
    load_train_config,
    parse_dataclass,
    train_config_from_dict,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def minimal() -> dict:
    return {
        "model": "embedded:tiny",
        "phase": "mntp",
        "train": {"output": "out", "steps": 3},
        "data": {"sources": [{"path": "embedded:python-docs"}]},
    }


@pytest.mark.parametrize("name", ["tiny-causal", "tiny-mntp", "tiny-contrastive"])
def test_examples_parse_and_have_required_keys(name: str) -> None:
    raw = tomllib.loads((EXAMPLES / f"{name}.toml").read_text())
    for key in ("output", "steps", "checkpoint_every"):
        assert key in raw["train"], f"{name}: train.{key} missing"
    config = load_train_config(EXAMPLES / f"{name}.toml")
    assert config.model == "embedded:tiny"
    assert config.phase == name.split("-")[1]


def test_defaults_and_round_trip() -> None:
    config = train_config_from_dict(minimal())
    assert config.optim.schedule == "wsd" and config.contrastive.temperature == 0.05
    again = train_config_from_dict(tomllib.loads(config.to_toml()))
    assert again == config
    assert train_config_from_dict(config.to_dict()) == config


def test_overrides_are_typed_by_the_field() -> None:
    data = apply_overrides(
        minimal(),
        [
            "train.steps=7",
            "optim.lr=1e-3",
            "optim.betas=[0.9, 0.95]",
            "train.output=2024",  # a str field keeps the text, not the integer
            "optim.fused=true",
            "data.sources.0.weight=2",  # array-of-tables index
            "mntp.mask_token=_",
            "contrastive.symmetric=true",
        ],
    )
    config = train_config_from_dict(data)
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.optim.lr == 1e-3
    assert config.optim.betas == (0.9, 0.95)
    assert config.train.output == "2024"
    assert config.optim.fused is True
    assert config.data.sources[0].weight == 2.0
    assert config.mntp.mask_token == "_"
    assert config.contrastive.symmetric is True


def test_load_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text((EXAMPLES / "tiny-mntp.toml").read_text())
    config = load_train_config(path, ["train.steps=2", "train.output=elsewhere"])
    assert config.train.steps == 2 and config.train.output == "elsewhere"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.stepz=3"],
            "unknown key train.stepz in [train]; valid keys: allow_config_change, checkpoint_every",
        ),
        (["bogus=1"], "unknown key bogus in the top level; valid keys: contrastive, data"),
        (["train.steps=x"], "train.steps: expected an integer, got 'x'"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["phase=masked"], "phase: 'masked' is not one of 'causal', 'mntp', 'contrastive'"),
        (["optim.schedule=linear_warmup"], "optim.schedule: 'linear_warmup' is not one of"),
        (["optim.betas=[0.9]"], "optim.betas: expected 2 items, got 1"),
        (["data.sources.3.path=x"], "data.sources.3 is not an index of the list"),
        (["train.steps.deep=1"], "train.steps is a value"),
        (["train.steps"], "is not of the form section.key=value"),
        (["mntp.mask_ratio=1.5"], "mntp.mask_ratio must be in (0, 1)"),
        (["data.sources.0.weight=0"], "must be > 0"),
        (["data.sources.0.colour=red"], "unknown key data.sources[0].colour"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        train_config_from_dict(apply_overrides(minimal(), overrides))
    assert message in str(info.value)


def test_missing_required_keys() -> None:
    data = minimal()
    del data["train"]["output"]
    with pytest.raises(ValueError, match="missing required key train.output"):
        train_config_from_dict(data)
    data = minimal()
    data["data"]["sources"] = []
    with pytest.raises(ValueError, match=r"data.sources is empty"):
        train_config_from_dict(data)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist.toml does not exist"):
        load_train_config(tmp_path / "does-not-exist.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(ValueError, match="bad.toml: invalid TOML"):
        load_train_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('model = "m"\nphase = "mntp"\nlr = 1\n')
    with pytest.raises(ValueError, match=r"unknown.toml: unknown key lr"):
        load_train_config(unknown)


def test_base_dir_resolves_relative_paths(tmp_path: Path) -> None:
    data = minimal()
    data["data"]["sources"].append({"path": "corpus.jsonl"})
    config = train_config_from_dict(data, base_dir=tmp_path)
    assert config.train.output == str(tmp_path / "out")
    assert config.data.sources[0].path == "embedded:python-docs"
    assert config.data.sources[1].path == str(tmp_path / "corpus.jsonl")


@dataclass
class _Inner:
    size: int = 1
    names: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    title: str
    inner: _Inner = field(default_factory=_Inner)
    ratio: float | None = None


def test_parse_dataclass_is_generic() -> None:
    parsed = parse_dataclass(_Outer, {"title": "t", "inner": {"size": 3, "names": ["a"]}})
    assert parsed == _Outer("t", _Inner(3, ["a"]))
    assert parse_dataclass(_Outer, {"title": "t", "ratio": 2}).ratio == 2.0
    with pytest.raises(ValueError, match=r"inner.names\[1\]: expected a string"):
        parse_dataclass(_Outer, {"title": "t", "inner": {"names": ["a", 3]}})
    with pytest.raises(
        ValueError, match="unknown key inner.colour in .inner.; valid keys: names, size"
    ):
        parse_dataclass(_Outer, {"title": "t", "inner": {"colour": 1}})
    assert isinstance(train_config_from_dict(minimal()), TrainConfig)


def test_large_run_keys_round_trip_and_resolve(tmp_path: Path) -> None:
    """The keys of issue 28 parse, write back to TOML and read back equal; held-out source paths
    resolve against the config file's folder like data sources."""
    path = tmp_path / "cfg" / "run.toml"
    path.parent.mkdir()
    path.write_text(
        """
model = "embedded:tiny"
phase = "mntp"
[train]
output = "out"
tokens_per_step = 4096
token_budget = "ablation"
seed = 42
tensorboard = false
[optim]
warmup_fraction = 0.01
[data]
tokens_per_batch = 1024
log_shares_every = 10
[[data.sources]]
path = "shards/*.parquet"
weight = 4
[[data.sources]]
path = "more"
streaming = true
[heldout]
every = 100
tokens = 512
tasks = ["eval.jsonl"]
[[heldout.sources]]
path = "heldout.jsonl"
name = "english"
"""
    )
    config = load_train_config(path)
    assert config.train.steps == -(-10_000_000_000 // 4096) and config.train.seed == 42
    assert config.data.sources[0].path == str(tmp_path / "cfg" / "shards" / "*.parquet")
    assert config.data.sources[1].streaming and not config.data.sources[0].streaming
    assert config.heldout.sources[0].path == str(tmp_path / "cfg" / "heldout.jsonl")
    assert config.heldout.tasks == ["eval.jsonl"] and config.heldout.every == 100
    again = train_config_from_dict(tomllib.loads(config.to_toml()))
    assert again == config
    contrastive = load_train_config(
        EXAMPLES / "tiny-contrastive.toml",
        ["train.pairs_per_step=32", "data.sources.0.symmetric=true"],
    )
    assert contrastive.train.pairs_per_step == 32 and contrastive.data.sources[0].symmetric


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.tokens_per_step=-1"], "train.tokens_per_step must be >= 0"),
        (["train.token_budget=-5", "train.tokens_per_step=8"], "train.token_budget must be >= 0"),
        (["optim.warmup_fraction=1.5"], "optim.warmup_fraction must be in [0, 1)"),
        (["data.log_shares_every=-1"], "data.log_shares_every must be >= 0"),
        (["heldout.every=5"], "heldout.every is set but heldout.sources and heldout.tasks"),
        (["heldout.tokens=1"], "heldout.tokens must be >= 2"),
        (["data.sources.0.symmetric=maybe"], "expected true or false"),
    ],
)
def test_large_run_keys_bad_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_train_config(EXAMPLES / "tiny-mntp.toml", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
