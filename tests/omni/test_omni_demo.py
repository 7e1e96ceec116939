"""`bidirlm demo --omni` at its CI size: the contrastive phase aligns the composed model
(cross-modal retrieval after it clearly above before it); the files of the report are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def test_omni_demo_aligned_beats_unaligned(tmp_path: Path, capsys) -> None:
    from bidirlm.cli import main

    assert main(["demo", "--omni", "--tiny", "--out", str(tmp_path / "demo")]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["aligned"]) == {"image->text", "text->image", "audio->text"}

    def mean(variant: str, metric: str) -> float:
        return sum(v[metric] for v in results[variant].values()) / 3

    assert mean("aligned", "ndcg@10") > mean("unaligned", "ndcg@10") + 0.08, results
    assert mean("aligned", "recall@1") > mean("unaligned", "recall@1"), results
    for direction in ("image->text", "text->image"):
        assert results["aligned"][direction]["ndcg@10"] > results["unaligned"][direction]["ndcg@10"]
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000
    assert "aligned nDCG@10" in (tmp_path / "demo" / "report.md").read_text()
    assert "audio->text" in capsys.readouterr().out
