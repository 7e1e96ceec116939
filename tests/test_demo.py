"""The demo end to end at CI size (`bidirlm demo --tiny`), and its data helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bidirlm.cli import main
from bidirlm.recipe import demo
from bidirlm.runtime import evaluation as ev


def test_pairs_get_a_hard_negative_from_their_module() -> None:
    pairs = [
        {"query": "q1", "positive": "p1", "id": "a:x"},
        {"query": "q2", "positive": "p2", "id": "a:y"},
        {"query": "q3", "positive": "p3", "id": "b:z"},
    ]
    out = demo.pairs_with_hard_negatives(pairs)
    assert out[0]["negatives"] == ["p2"] and out[1]["negatives"] == ["p1"]
    assert "negatives" not in out[2]  # alone in its module: in-batch negatives only


def test_subsample_keeps_every_answer() -> None:
    task = ev.embedded_task(max_queries=5)
    small = demo.subsample(task, 20)
    assert len(small.corpus) == 20 and small.queries == task.queries
    assert all(d in small.corpus for docs in small.qrels.values() for d in docs)
    assert demo.subsample(task, None) is task


def test_demo_tiny_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")  # whole models: no Triton interpreter
    import torch

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--tiny", "--cpu", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the demo's single-thread default is undone
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "ndcg@10"
    assert list(results["variants"]) == list(demo.VARIANTS)
    for name in demo.VARIANTS:
        assert 0.0 <= results["variants"][name] <= 1.0
        assert 0.0 <= results["mrr@10"][name] <= 1.0
        assert name in printed
    assert results["num_queries"] == 40 and results["num_documents"] == 120
    assert results["best"] == max(results["variants"], key=results["variants"].get)
    # The untrained model is a reference row, never a variant (nor the best).
    reference = results["reference"]
    assert reference["name"] == demo.REFERENCE and demo.REFERENCE not in results["variants"]
    assert 0.0 <= reference["ndcg@10"] <= 1.0 and "reference, not a variant" in printed
    # Held-out data never reaches training: no training pair mentions a held-out module.
    heldout = {q.split(":")[0] for q in ev.load_task(out / "data" / "heldout").queries}
    assert heldout and all(ev.split_of(m) == "heldout" for m in heldout)
    # Report, chart, export.
    report = (out / "report.md").read_text()
    assert "| Bi+MNTP+Contrastive |" in report and "results.png" in report
    assert f"reference, not a variant: {demo.REFERENCE}" in report
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export = results["export"]
    assert demo.VARIANTS[export["variant"]][1]  # the exported variant is bidirectional
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(export["path"], device="cpu", local_files_only=True)
    assert st.encode(["hello world"]).shape == (1, demo.SIZES["tiny"].hidden)
    assert export["shape"] == [3, demo.SIZES["tiny"].hidden]
    # The pipeline report records every phase; a second run skips them all.
    phases = json.loads((out / "runs" / "report.json").read_text())["phases"]
    assert {p["name"] for p in phases} >= {"causal", "mntp", "merge", "contrastive"}
    again = demo.run_demo(out, "tiny", prefer_gpu=False, log=lambda msg: None)
    assert again["variants"] == results["variants"]
    phases = json.loads((out / "runs" / "report.json").read_text())["phases"]
    assert {p["status"] for p in phases} == {"skipped"}
