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
    captured = capsys.readouterr()
    printed = captured.out
    assert (captured.out + captured.err).count("results.json") == 1  # the last lines once
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
    assert "goals/orderings hold" in printed
    # Held-out data never reaches training: no training pair mentions a held-out module.
    heldout = {q.split(":")[0] for q in ev.load_task(out / "data" / "heldout").queries}
    assert heldout and all(ev.split_of(m) == "heldout" for m in heldout)
    # BM25 and the untrained model: reference rows; the tasks beside retrieval, relative to Base.
    assert results["bm25"]["name"] == demo.BM25 and 0.0 < results["bm25"]["ndcg@10"] <= 1.0
    for name in demo.VARIANTS:
        scores = results["tasks"][name]
        assert set(scores) == set(demo.TASKS) and all(0.0 <= s <= 1.0 for s in scores.values())
        for task in demo.TASKS:
            delta = scores[task] - results["tasks"]["Base"][task]
            assert results["relative"][name][task] == pytest.approx(delta)
        assert set(results["forgetting"][name]) == {"docs", "code"}
    assert results["relative"]["Base"] == {task: 0.0 for task in demo.TASKS}
    # Bi+Base has Base's weights: the same causal-LM loss.
    assert results["forgetting"]["Bi+Base"] == results["forgetting"]["Base"]
    # The merge-ratio sweep: 0 is the base, 1 is Bi+MNTP, 0.5 the merged variant; a linear merge
    # of two points lies between them on the loss here too (the loss is smooth in the weights).
    sweep = results["merge_sweep"]
    assert [row["ratio"] for row in sweep] == list(demo.MERGE_RATIOS)
    assert sweep[0]["docs_loss"] == results["forgetting"]["Base"]["docs"]
    assert sweep[-1]["code_loss"] == results["forgetting"]["Bi+MNTP"]["code"]
    assert sweep[2]["retrieval"] == results["variants"]["Bi+MNTP (merged 50/50)"]
    assert sweep[-1]["token"] == results["tasks"]["Bi+MNTP"]["token"]
    # Every variant fine-tuned with one protocol (the training phases), scores = the runs' own.
    size = demo.SIZES["tiny"]
    seq_steps, tok_steps, seeds = size.finetune
    assert results["finetune_protocol"]["steps"] == {"sequence": seq_steps, "token": tok_steps}
    assert results["finetune_protocol"]["seed_values"] == list(range(seeds))
    configs = {}
    for name in demo.VARIANTS:
        for task in ("sequence", "token"):
            ft = results["finetuned"][name][task]
            assert len(ft["seeds"]) == seeds and ft["macro_f1"] == pytest.approx(
                sum(ft["seeds"]) / seeds
            )
            assert results["tasks"][name][task] == ft["macro_f1"]
            for seed in range(seeds):
                run = out / "finetune" / demo.eval_phase(name)[5:] / f"{task}-seed{seed}"
                rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
                steps = seq_steps if task == "sequence" else tok_steps
                assert rows[-1]["step"] == steps
                assert rows[-1]["dev"]["macro_f1"] == pytest.approx(ft["seeds"][seed])
                assert not (run / "final").exists() and not (run / "checkpoints").exists()
                configs[name, task] = (run / "config.toml").read_text()
    for (name, task), text in configs.items():
        causal = 'attention = "causal"' in text
        assert causal == (name == "Base")
        # the same protocol: only the model and the attention differ from Bi+Base's run
        other = configs["Bi+Base", task].replace('attention = "bidirectional"', "")
        strip = [
            line
            for line in text.replace('attention = "causal"', "")
            .replace('attention = "bidirectional"', "")
            .splitlines()
            if not line.startswith(("model =", "output ="))
        ]
        assert strip == [
            line for line in other.splitlines() if not line.startswith(("model =", "output ="))
        ]
    # The data-mix sweep: the main MNTP run (code share 0.5) and the extra shares.
    mix = results["mix_sweep"]
    assert [row["code_share"] for row in mix] == sorted([*size.mix_shares, 0.5])
    main_row = next(row for row in mix if row["code_share"] == 0.5)
    assert main_row["code_loss"] == results["forgetting"]["Bi+MNTP"]["code"]
    assert main_row["retrieval"] == results["variants"]["Bi+MNTP"]
    assert "Data-mix sweep" in (out / "report.md").read_text()
    # The goals and orderings are computed from the numbers, not written by hand.
    checks = {c["claim"]: c for c in results["checks"]}
    claim = "Bi+MNTP+Contrastive >= Bi+Contrastive on retrieval"
    margin = results["variants"]["Bi+MNTP+Contrastive"] - results["variants"]["Bi+Contrastive"]
    assert checks[claim]["margin"] == pytest.approx(margin) and checks[claim]["met"] == (
        margin >= 0
    )
    # Report, charts, export.
    report = (out / "report.md").read_text()
    assert "| Bi+MNTP+Contrastive |" in report and "results.png" in report
    assert f"reference, not a variant: {demo.REFERENCE}" in report
    assert f"reference, not a variant: {demo.BM25}" in report
    assert "## Forgetting" in report and "forgetting.png" in report and "seed 0" in report
    for c in results["checks"]:
        assert c["claim"] in report
    assert all(c["claim"] in report for c in results["checks"] if not c["met"])
    for chart in ("results.png", "forgetting.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export = results["export"]
    assert demo.VARIANTS[export["variant"]][1]  # the exported variant is bidirectional
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(export["path"], device="cpu", local_files_only=True)
    assert st.encode(["hello world"]).shape == (1, demo.SIZES["tiny"].hidden)
    assert export["shape"] == [3, demo.SIZES["tiny"].hidden]
    # The pipeline report records every phase; a second run skips them all.
    phases = json.loads((out / "runs" / "report.json").read_text())["phases"]
    assert {p["name"] for p in phases} >= {"causal", "mntp", "merge", "contrastive", "merge_25"}
    again = demo.run_demo(out, "tiny", prefer_gpu=False, log=lambda msg: None)
    assert again["variants"] == results["variants"] and again["tasks"] == results["tasks"]
    phases = json.loads((out / "runs" / "report.json").read_text())["phases"]
    assert {p["status"] for p in phases} == {"skipped"}


def test_bm25_matches_the_okapi_formula() -> None:
    import math

    from bidirlm.recipe.demo_eval import bm25_rank

    docs = ["the queue holds items", "a queue of queue items", "parse a date"]
    scores = bm25_rank(["queue items", "date"], docs, k1=1.2, b=0.75)
    lengths = [4, 5, 3]
    avg = sum(lengths) / 3

    def term(tf: int, df: int, length: int) -> float:
        idf = math.log(1 + (3 - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))

    assert scores[0, 1].item() == pytest.approx(term(2, 2, 5) + term(1, 2, 5))
    assert scores[0, 2].item() == 0.0 and scores[1, 2].item() == pytest.approx(term(1, 1, 3))
    assert scores.argmax(1).tolist() == [1, 2]


def test_probe_separates_linearly_separable_classes() -> None:
    import torch

    from bidirlm.recipe.demo_eval import _fit_predict

    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 2, generator=g)
    y = torch.arange(90) % 3
    x[:, 0] += 12 * y  # class i sits at 12 * i on the first feature
    pred = _fit_predict(x[:60], y[:60], x[60:], 3)
    assert (pred == y[60:]).float().mean().item() == 1.0


def test_shipped_base_matches_its_command_and_log() -> None:
    from bidirlm.recipe import demo_base
    from bidirlm.runtime import load_model

    folder = demo_base.SHIPPED_BASE
    log = json.loads((folder / "training_log.json").read_text())
    assert log["steps"] == demo_base.DEFAULT_STEPS and log["seed"] == demo_base.SEED
    assert log["shape"] == demo_base.BASE_SHAPE and log["lr"] == demo_base.LR
    assert f"--steps {log['steps']}" in log["command"] and "--pretrain-base" in log["command"]
    assert log["loss_curve"][-1]["loss"] < log["loss_curve"][0]["loss"] - 2.0  # it learned
    model = load_model(folder, bidirectional=False)
    assert model.config.hidden_size == demo_base.BASE_SHAPE["hidden_size"]
    assert model.config.num_layers == demo_base.BASE_SHAPE["num_hidden_layers"]
    assert sum(p.numel() for p in model.parameters()) == log["parameters"]
    assert (folder / "model.safetensors").stat().st_size < 4_000_000  # a few MB


def test_pretrain_base_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    out = tmp_path / "base"
    assert main(["demo", "--pretrain-base", "--output", str(out), "--steps", "1", "--cpu"]) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 1 and log["seed"] == 0 and len(log["loss_curve"]) == 1
    assert log["command"].startswith("bidirlm demo --pretrain-base") and log["seconds"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 4
    assert main(["demo", "--pretrain-base", "--output", str(out), "--steps", "0"]) == 1


def test_pretrain_base_never_replaces_a_user_folder(tmp_path: Path) -> None:
    from bidirlm.recipe.demo_base import pretrain_base

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a pre-trained base"):
        pretrain_base(mine, steps=1)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_omni_demo_never_deletes_a_work_folder_it_did_not_make(tmp_path: Path) -> None:
    from bidirlm.recipe.omni_demo import run_omni_demo

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not made by the omni demo"):
        run_omni_demo(tmp_path, "tiny")
    assert (work / "notes.txt").read_text() == "keep me"


def test_finetune_score_runs_the_training_phase_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    from bidirlm.recipe import demo_eval as de
    from bidirlm.runtime.embedded import embedded_tiny_model

    files = de.write_task_files(tmp_path / "tasks", (16, 16, 8, 8))
    assert [len(p.read_text().splitlines()) for p in files["token"].values()] == [8, 8]
    protocol = de.FinetuneProtocol({"sequence": 2, "token": 2}, seeds=1, max_seq_len=32)
    run = tmp_path / "run"
    model = embedded_tiny_model()
    kwargs = dict(causal=False, seed=0, protocol=protocol)
    score = de.finetune_score(model, "token", files["token"], run, **kwargs)
    assert set(score) == {"macro_f1", "accuracy"} and 0.0 <= score["macro_f1"] <= 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[-1]["dev"]["accuracy"] == pytest.approx(score["accuracy"])
    stamp = (run / "score.json").stat().st_mtime_ns
    assert de.finetune_score(model, "token", files["token"], run, **kwargs) == score
    assert (run / "score.json").stat().st_mtime_ns == stamp  # read back, not run again
    # another protocol runs again in the same folder
    other = de.FinetuneProtocol({"sequence": 2, "token": 3}, seeds=1, max_seq_len=32)
    de.finetune_score(model, "token", files["token"], run, causal=False, seed=0, protocol=other)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[-1]["step"] == 3 and len(rows) == 3
    # a folder the demo did not make is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not made by the demo"):
        de.finetune_score(model, "token", files["token"], mine, **kwargs)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="seeds"):
        de.FinetuneProtocol({"sequence": 2, "token": 2}, seeds=0)


def test_demo_rejects_a_bad_mix_share(tmp_path: Path) -> None:
    import dataclasses

    size = dataclasses.replace(demo.SIZES["tiny"], mix_shares=(0.5,))
    with pytest.raises(ValueError, match="mix_shares"):
        demo.run_demo(tmp_path, size, prefer_gpu=False)
    assert not any(tmp_path.iterdir())  # nothing made before the check


def test_demo_seed_moves_the_fine_tuning_seeds(tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from bidirlm.recipe import demo_eval as de

    calls: list[tuple[str, int, bool]] = []

    def fake_finetune(model, task, files, folder, *, causal, seed, protocol, device):
        calls.append((Path(folder).name, seed, causal))
        return {"macro_f1": 0.5 + seed / 100, "accuracy": 0.5}

    monkeypatch.setattr(de, "finetune_score", fake_finetune)
    monkeypatch.setattr(de, "probe_scores", lambda *a, **k: {
        t: {"macro_f1": 0.1, "accuracy": 0.1} for t in ("sequence", "token")
    })  # fmt: skip
    monkeypatch.setattr(de, "lm_loss", lambda *a, **k: 1.0)
    size = dataclasses.replace(demo.SIZES["tiny"], finetune=(2, 2, 2), mix_shares=())
    paths = {p: tmp_path for p in ("causal", "mntp", "merge", "contrastive", "mntp_contrastive")}
    paths |= {demo.sweep_phase(r): tmp_path for r in (0.25, 0.75)}
    measured = demo.measure(paths, size, lambda msg: None, tmp_path, "cpu", seed=1)
    assert sorted({seed for _, seed, _ in calls}) == [2, 3]  # demo seed 1: seeds 2 and 3
    assert {name for name, _, _ in calls} == {
        f"{t}-seed{s}" for t in ("sequence", "token") for s in (2, 3)
    }
    assert measured["finetune_protocol"]["seed_values"] == [2, 3]
    ft = measured["finetuned"]["Bi+MNTP"]["sequence"]
    assert ft["seeds"] == [0.52, 0.53] and ft["macro_f1"] == pytest.approx(0.525)
    assert ft["macro_f1_sd"] == pytest.approx(0.005)
    # only Base fine-tunes with causal attention: 2 tasks x 2 seeds
    assert sum(causal for _, _, causal in calls) == 4
