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
