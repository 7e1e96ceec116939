"""Recipes and the pipeline: shipped recipe values, checks before work, chaining, skip, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.recipe import pipeline as pl
from bidirlm.runtime import evaluation as ev
from bidirlm.runtime.training.config import dumps_toml

RECIPES = ["qwen3-0.6b", "qwen3-1.7b", "gemma3-270m", "gemma3-1b"]


# ---------------------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_follow_the_paper(name: str) -> None:
    recipe = pl.load_recipe(name)
    phases = {p.name: p for p in recipe.phases}
    assert [p.name for p in recipe.phases] == ["mntp", "merge", "contrastive"]
    mntp, merge, con = phases["mntp"].config, phases["merge"].config, phases["contrastive"].config
    assert mntp.phase == "mntp"
    assert mntp.mntp.mask_ratio == (0.3 if name.startswith("qwen3") else 0.4)
    assert mntp.optim.schedule == "wsd"  # learning rates per model: tests/test_recipes.py
    assert mntp.data.tokens_per_batch == 8192 and mntp.data.max_seq_len == 8192
    weights = [s.weight for s in mntp.data.sources]
    assert weights[0] / sum(weights) == pytest.approx(0.8)  # 80% English, 20% the rest
    assert merge.models == ["@mntp", "@base"] and merge.weights == [0.5, 0.5]
    assert phases["contrastive"].inputs == ["merge"]
    assert con.contrastive.temperature == 0.05 and con.contrastive.mini_batch_size >= 16
    assert con.data.batch_size == 512 and con.data.negatives_per_query >= 1
    assert con.data.query_max_len == 512 and con.data.document_max_len == 512
    # The user's data is not here: the check fails before any work, naming every path.
    with pytest.raises(pl.RecipeError) as info:
        pl.check_inputs(recipe)
    for source in [*mntp.data.sources, *con.data.sources]:
        assert source.path in str(info.value)
    assert "recipe.base" in str(info.value)


def test_overrides_and_unknown_keys() -> None:
    recipe = pl.load_recipe("qwen3-0.6b", ["mntp.train.steps=7", "recipe.output=/tmp/x"])
    assert recipe.phases[0].config.train.steps == 7
    assert recipe.phases[0].config.train.output == "/tmp/x/mntp"
    with pytest.raises(pl.RecipeError, match="valid keys"):
        pl.load_recipe("qwen3-0.6b", ["mntp.optim.lrate=1"])
    with pytest.raises(FileNotFoundError, match="shipped recipes"):
        pl.recipe_path("qwen9-7b")


def _recipe(tmp_path: Path, **tables) -> dict:
    return {
        "recipe": {
            "name": "t",
            "base": "embedded:tiny",
            "output": str(tmp_path / "run"),
            "phases": list(tables),
        },
        **tables,
    }


def test_reference_errors(tmp_path: Path) -> None:
    train = {"phase": "mntp", "train": {"steps": 1}, "data": {"sources": [{"path": "x"}]}}
    with pytest.raises(pl.RecipeError, match=r"@later is not an earlier model phase.*@base"):
        pl.parse_recipe(_recipe(tmp_path, a={**train, "model": "@later"}, later=dict(train)))
    with pytest.raises(pl.RecipeError, match="must reference"):
        pl.parse_recipe(_recipe(tmp_path, a={**train, "model": "models/x"}))
    with pytest.raises(pl.RecipeError, match="not listed in recipe.phases"):
        data = _recipe(tmp_path, a={**train, "model": "@base"})
        data["stray"] = {}
        pl.parse_recipe(data)
    with pytest.raises(pl.RecipeError, match="kind"):
        pl.parse_recipe(_recipe(tmp_path, a={"kind": "distill", "model": "@base"}))
    evaluation = {"kind": "eval", "model": "@base"}
    with pytest.raises(pl.RecipeError, match="not an earlier model phase"):
        pl.parse_recipe(
            _recipe(tmp_path, e=evaluation, m={"kind": "merge", "models": ["@e", "@base"],
                                                "weights": [1, 1]})
        )  # fmt: skip


def test_missing_data_fails_before_any_work(tmp_path: Path) -> None:
    table = {
        "model": "@base",
        "phase": "mntp",
        "train": {"steps": 1},
        "data": {"sources": [{"path": str(tmp_path / "nope.jsonl")}]},
    }
    with pytest.raises(pl.RecipeError, match="nope.jsonl does not exist"):
        pl.run_pipeline(pl.parse_recipe(_recipe(tmp_path, mntp=table)))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- a real run


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def small_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")  # whole models: no Triton interpreter
    docs = _write_jsonl(
        tmp_path / "docs.jsonl", [{"text": t} for t in ev.stdlib_texts("train", "docs")[:64]]
    )
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", ev.stdlib_pairs("train")[:32])
    task = ev.save_task(ev.embedded_task(max_queries=8), tmp_path / "heldout")
    small = {"progress_bar": False, "checkpoint_every": 1, "keep_checkpoints": 2}
    return _recipe(
        tmp_path,
        mntp={
            "model": "@base",
            "phase": "mntp",
            "train": {"steps": 2, **small},
            "optim": {"lr": 1e-3},
            "data": {"tokens_per_batch": 256, "max_seq_len": 64, "sources": [{"path": str(docs)}]},
            "mntp": {"mask_ratio": 0.3},
        },
        merge={"kind": "merge", "models": ["@mntp", "@base"], "weights": [0.5, 0.5]},
        contrastive={
            "model": "@merge",
            "phase": "contrastive",
            "train": {"steps": 3, **small},
            "optim": {"lr": 1e-3},
            "data": {
                "batch_size": 4,
                "query_max_len": 16,
                "document_max_len": 32,
                "sources": [{"path": str(pairs)}],
            },
        },
        evaluate={"kind": "eval", "model": "@contrastive", "task": str(task), "max_length": 32},
    )


def test_pipeline_chains_skips_and_resumes(
    small_recipe: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bidirlm.runtime.embedded import embedded_tiny_model
    from bidirlm.runtime.training import trainer

    real_train = trainer.train
    calls: list[str] = []

    def interrupting_train(config, **kwargs):
        calls.append(config.phase)
        if config.phase == "contrastive" and calls.count("contrastive") == 1:
            return real_train(config, stop_after=1)  # raises TrainingInterrupted after step 1
        return real_train(config, **kwargs)

    monkeypatch.setattr(trainer, "train", interrupting_train)
    logs: list[str] = []
    with pytest.raises(trainer.TrainingInterrupted):
        pl.run_pipeline(pl.parse_recipe(small_recipe), log=logs.append)
    run = tmp_path / "run"
    assert (run / "mntp" / "phase.json").is_file() and (run / "merge" / "phase.json").is_file()
    assert not (run / "contrastive" / "phase.json").exists()

    # Second run: mntp and merge are skipped, contrastive resumes from its step-1 checkpoint.
    logs.clear()
    report = pl.run_pipeline(pl.parse_recipe(small_recipe), log=logs.append)
    status = {p["name"]: p["status"] for p in report["phases"]}
    assert status == {
        "mntp": "skipped",
        "merge": "skipped",
        "contrastive": "ran",
        "evaluate": "ran",
    }
    assert calls == ["mntp", "contrastive", "contrastive"]
    steps = [json.loads(x)["step"] for x in (run / "contrastive" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]  # step 1 is not redone: the run continued from the checkpoint

    # Each output fed the next: the merge is the 50/50 average of the MNTP model and the base.
    name = "model.layers.0.mlp.down_proj.weight"
    base = load_file(embedded_tiny_model() / "model.safetensors")[name]
    mntp = load_file(next((run / "mntp" / "final").glob("*.safetensors")))[name]
    merged = load_file(next((run / "merge" / "model").glob("*.safetensors")))[name]
    torch.testing.assert_close(merged.float(), (base.float() + mntp.float()) / 2)
    assert not torch.equal(mntp, base)
    result = report["phases"][-1]["result"]
    assert 0.0 <= result["ndcg@10"] <= 1.0 and result["num_queries"] == 8
    assert json.loads((run / "report.json").read_text())["phases"][-1]["result"] == result
    assert "| evaluate | eval | ran |" in (run / "report.md").read_text()

    # Third run: everything is complete; nothing trains.
    report = pl.run_pipeline(pl.parse_recipe(small_recipe), log=logs.append)
    assert {p["status"] for p in report["phases"]} == {"skipped"}
    assert len(calls) == 3

    # A changed phase config must not silently reuse the old output.
    small_recipe["merge"]["weights"] = [0.7, 0.3]
    with pytest.raises(pl.RecipeError, match="different configuration"):
        pl.run_pipeline(pl.parse_recipe(small_recipe), log=logs.append)


# ---------------------------------------------------------------------------- the command


def test_pipeline_command_checks_shipped_recipe_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bidirlm.cli import main

    # The shipped recipe names paths of the user's: a missing one is a one-line error.
    missing = str(tmp_path / "no-such-model")
    assert main(["pipeline", "qwen3-0.6b", "--check", "--set", f"recipe.base={missing}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("bidirlm pipeline: error:")
        and "no-such-model" in err[0]
    )


def test_pipeline_command_check_lists_phases(
    small_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bidirlm.cli import main

    path = tmp_path / "recipe.toml"
    path.write_text(dumps_toml(small_recipe), encoding="utf-8")
    assert main(["pipeline", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "mntp" in out and "contrastive" in out and out.rstrip().splitlines()[-1].startswith("ok")
    assert not (tmp_path / "run").exists()  # --check runs nothing


# ---------------------------------------------------------------------------- issue 13


def _mntp_table(docs: Path, **extra) -> dict:
    return {
        "model": "@base",
        "phase": "mntp",
        "train": {"steps": 1, "progress_bar": False, "device": "cpu"},
        "data": {"tokens_per_batch": 128, "max_seq_len": 32, "sources": [{"path": str(docs)}]},
        **extra,
    }


def test_pipeline_command_with_set_runs_and_writes_plain_toml(
    small_recipe: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bidirlm pipeline RECIPE --set ...` crashed writing recipe.resolved.toml (issue 13.2)."""
    import tomllib

    from bidirlm.cli import main

    recipe = _recipe(tmp_path, mntp=small_recipe["mntp"])
    path = tmp_path / "recipe.toml"
    path.write_text(dumps_toml(recipe), encoding="utf-8")
    out = tmp_path / "elsewhere"
    argv = ["pipeline", str(path), "--set", "mntp.train.steps=1", "--set", f"recipe.output={out}"]
    argv += ["--set", "mntp.optim.lr=2e-3", "--set", "recipe.name=2024"]  # "2024" stays text
    assert main(argv) == 0, capsys.readouterr().err
    resolved = tomllib.loads((out / "recipe.resolved.toml").read_text())
    assert resolved["mntp"]["train"]["steps"] == 1 and resolved["mntp"]["optim"]["lr"] == 2e-3
    assert resolved["recipe"]["name"] == "2024" and resolved["recipe"]["output"] == str(out)
    assert resolved["mntp"]["model"] == "@base" and resolved["mntp"]["kind"] == "train"
    assert (out / "mntp" / "final" / "config.json").is_file()
    assert not (tmp_path / "run").exists()


def test_readme_pipeline_form_fails_before_creating_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bidirlm.cli import main

    out = tmp_path / "run"
    argv = ["pipeline", "qwen3-0.6b", "--set", "recipe.base=embedded:tiny"]
    assert main([*argv, "--set", f"recipe.output={out}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data/english.jsonl does not exist" in err[0], err
    assert "TypeError" not in err[0] and not out.exists()


@pytest.mark.parametrize("name", ["../victim", "a/b", "/abs", "", ".", "..", ".hidden", "a\\b"])
def test_phase_names_are_plain_names(name: str, tmp_path: Path) -> None:
    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "x y z"}])
    data = _recipe(tmp_path, placeholder=_mntp_table(docs))
    data[name] = data.pop("placeholder")
    data["recipe"]["phases"] = [name]
    with pytest.raises(pl.RecipeError, match="is not a plain name"):
        pl.run_pipeline(pl.parse_recipe(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # nothing written


def test_train_output_must_stay_under_recipe_output(tmp_path: Path) -> None:
    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "x y z"}])
    table = _mntp_table(docs)
    table["train"]["output"] = str(tmp_path / "victim")
    with pytest.raises(pl.RecipeError, match=r"train.output .*victim is outside recipe.output"):
        pl.parse_recipe(_recipe(tmp_path, mntp=table))
    table["train"]["output"] = str(tmp_path / "run" / "mntp-here")  # inside: fine
    assert (
        pl.parse_recipe(_recipe(tmp_path, mntp=table)).phases[0].output.parent.name == "mntp-here"
    )


@pytest.fixture(scope="module")
def no_mask_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer without a mask token, like Qwen3's."""
    from transformers import AutoTokenizer

    from bidirlm.runtime.embedded import embedded_tiny_model, save_random_qwen3

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
    tokenizer.mask_token = None
    folder = tmp_path_factory.mktemp("no-mask") / "base"
    save_random_qwen3(folder, tokenizer)
    return folder


def test_check_catches_a_missing_mask_token(
    no_mask_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bidirlm.cli import main

    docs = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "x y z"}])
    data = _recipe(tmp_path, mntp=_mntp_table(docs))
    data["recipe"]["base"] = str(no_mask_base)
    path = tmp_path / "recipe.toml"
    path.write_text(dumps_toml(data), encoding="utf-8")
    assert main(["pipeline", str(path), "--check"]) == 0  # the default "_" is one token
    capsys.readouterr()
    argv = ["pipeline", str(path), "--check", "--set", "mntp.mntp.mask_token=not one token"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mntp.mntp.mask_token" in err[0] and "single token" in err[0], err
    # the shipped recipes set the mask token for tokenizers without one
    for name in RECIPES:
        assert pl.load_recipe(name).phases[0].config.mntp.mask_token == "_"


def test_report_total_is_the_sum_of_phase_times(small_recipe: dict, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, mntp=small_recipe["mntp"])
    recipe["mntp"]["train"]["steps"] = 1
    pl.run_pipeline(pl.parse_recipe(recipe), log=lambda _: None)
    report = pl.run_pipeline(pl.parse_recipe(recipe), log=lambda _: None)  # all skipped
    assert [p["status"] for p in report["phases"]] == ["skipped"]
    total = sum(p["seconds"] for p in report["phases"])
    assert report["phase_seconds_total"] == pytest.approx(total) and total > 0
    assert report["run_seconds"] < total + 60
    text = (tmp_path / "run" / "report.md").read_text()
    assert f"Phase time: {total:.1f} s in all" in text and "This run:" in text


def test_demo_report_total_is_the_sum_of_phase_times() -> None:
    """A re-run that skips every phase took 6 s, but its phases took 146 s when they ran."""
    from bidirlm.recipe import demo

    results = {
        "size": "quick",
        "task": "t",
        "num_queries": 1,
        "num_documents": 2,
        "variants": {"Base": 0.1},
        "mrr@10": {"Base": 0.1},
        "recall@10": {"Base": 0.1},
        "best": "Base",
        "export": {"variant": "Base", "path": "/x/st", "shape": [5, 64], "cosines": [0.5]},
        "phase_seconds": {"causal": 100.0, "mntp": 46.0},
        "seconds": 6.0,
        "device": "cpu",
        "python": "3",
        "torch": "2",
        "kernels": "torch",
    }
    text = demo.format_report(results)
    assert "Total 146 s of phase time" in text and "this run took 6 s" in text
