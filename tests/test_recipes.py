"""The shipped recipes carry the paper's hyperparameters (its Tables 2-3)."""

from __future__ import annotations

import pytest

from bidirlm.recipe import pipeline as pl

# name -> (MNTP lr, contrastive lr, gradient-cache mini-batch), BidirLM paper Tables 2-3.
PAPER = {
    "gemma3-270m": (5e-4, 6e-5, 64),
    "qwen3-0.6b": (1e-4, 3e-5, 32),
    "gemma3-1b": (7e-5, 1e-4, 32),
    "qwen3-1.7b": (5e-5, 1e-4, 16),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_recipe_hyperparameters_are_the_papers(name: str) -> None:
    mntp_lr, contrastive_lr, mini_batch = PAPER[name]
    phases = {p.name: p.config for p in pl.load_recipe(name).phases}
    mntp, con = phases["mntp"], phases["contrastive"]
    assert mntp.optim.lr == mntp_lr
    assert con.optim.lr == contrastive_lr
    assert con.optim.schedule == "linear" and con.optim.warmup_steps == 500
    assert con.contrastive.mini_batch_size == mini_batch
    assert con.data.batch_size % mini_batch == 0
    # 1-7 hard negatives per query: up to 7 are taken from each record.
    assert con.data.negatives_per_query == 7
    # 80% English; the 20% multilingual / math / code share split equally.
    weights = {s.path.rsplit("/", 1)[-1]: s.weight for s in mntp.data.sources}
    total = sum(weights.values())
    assert weights["english.jsonl"] / total == pytest.approx(0.8)
    for rest in ("multilingual.jsonl", "math.jsonl", "code.jsonl"):
        assert weights[rest] / total == pytest.approx(0.2 / 3)


@pytest.mark.parametrize("name", list(PAPER))
def test_recipe_run_sizes_are_the_papers(name: str) -> None:
    """Table 2: 2,359,296 tokens per MNTP step (96 GPUs x 3 x 8,192), the scaling budget of 30B
    tokens (the ablations' 10B a preset), warmup over 0.01 epoch; Table 3: 512 pairs per step;
    seed 42."""
    from bidirlm.runtime.training.batching import step_plan

    phases = {p.name: p.config for p in pl.load_recipe(name).phases}
    mntp, con = phases["mntp"], phases["contrastive"]
    assert mntp.train.tokens_per_step == 2359296 and mntp.train.seed == 42
    assert mntp.train.token_budget == "scaling" and mntp.train.steps == 12716
    assert step_plan(mntp, 96).grad_accum == 3 and step_plan(mntp, 8).grad_accum == 36
    assert mntp.optim.warmup_fraction == 0.01 and mntp.optim.warmup_for(mntp.train.steps) == 127
    assert con.train.pairs_per_step == 512 and con.train.seed == 42
    assert step_plan(con, 8).grad_accum == 1  # one micro-batch of 512 pairs over the ranks
    ablation = pl.load_recipe(name, ["mntp.train.token_budget=ablation"]).phases[0].config
    assert ablation.train.steps == 4239  # ceil(10e9 / 2,359,296)


def test_check_prints_the_run_size(tmp_path, monkeypatch, capsys) -> None:
    from bidirlm.cli import main

    data = tmp_path / "data"
    (data / "contrastive").mkdir(parents=True)
    for name in ("english", "multilingual", "math", "code"):
        (data / f"{name}.jsonl").write_text('{"text": "hello world"}\n')
    for name in ("retrieval", "similarity"):
        (data / "contrastive" / f"{name}.jsonl").write_text('{"query": "a", "positive": "b"}\n')
    monkeypatch.chdir(tmp_path)
    argv = ["pipeline", "qwen3-0.6b", "--check", "--set", "recipe.base=embedded:tiny"]
    assert main([*argv, "--set", "mntp.data.max_seq_len=1024"]) == 0
    out = capsys.readouterr().out
    assert "tokens per step 2359296 (2,359,296); steps 12,716" in out
    assert "tokens in all 30,000,807,936 (30.00B) (scaling budget)" in out
    assert "accumulation per rank: 8 ranks: 36; 96 ranks: 3" in out
    assert "pairs per step 512 (512); steps 2,000" in out
    for device in ("H100 SXM", "H100 PCIe", "H200", "A100", "MI250X GCD", "MI300X", "MI325X"):
        assert f"    {device} " in out
    assert "a prediction" in out
    # the estimate: 6 N FLOPs per token at 40% of one MI250X GCD's 191.5 TFLOP/s (bf16)
    n = pl.parameter_count("embedded:tiny")
    hours = 6 * n * 30_000_807_936 / (191.5e12 * 0.4) / 3600
    assert f"MI250X GCD  {hours:>12,.2f} device-hours" in out
    assert not (tmp_path / "runs").exists()  # --check runs nothing


def test_check_names_a_missing_heldout_source(tmp_path) -> None:
    recipe = pl.load_recipe(
        "qwen3-0.6b",
        [
            "mntp.heldout.every=4239",
            f'mntp.heldout.sources=[{{path = "{tmp_path}/nope.jsonl", name = "english"}}]',
        ],
    )
    assert recipe.phases[0].config.heldout.every == 4239
    with pytest.raises(pl.RecipeError, match=r"mntp.heldout.sources: .*nope.jsonl does not exist"):
        pl.check_inputs(recipe)
