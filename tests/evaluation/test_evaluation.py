"""Retrieval metrics on hand-made rankings, the embedded held-out task, the JSON Lines loader."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch

from bidirlm.runtime import evaluation as ev

L2 = math.log2


# ---------------------------------------------------------------------------- metrics


def test_ndcg_single_relevant_at_rank_two() -> None:
    assert ev.ndcg_at_k(["a", "b", "c"], {"b"}) == pytest.approx(1 / L2(3))
    assert ev.mrr_at_k(["a", "b", "c"], {"b"}) == pytest.approx(0.5)


def test_ndcg_two_relevant_uses_ideal_from_relevant_count() -> None:
    # DCG = 1/log2(2) + 1/log2(4); IDCG = 1/log2(2) + 1/log2(3)
    expected = (1 + 1 / L2(4)) / (1 + 1 / L2(3))
    assert ev.ndcg_at_k(["a", "b", "c"], {"a", "c"}) == pytest.approx(expected)


def test_ndcg_ideal_is_capped_at_k() -> None:
    # 3 relevant docs, k=2: the ideal has only 2 gains.
    expected = (1 / L2(3)) / (1 + 1 / L2(3))
    assert ev.ndcg_at_k(["x", "a", "b", "c"], {"a", "b", "c"}, k=2) == pytest.approx(expected)


def test_perfect_and_missing_rankings() -> None:
    assert ev.ndcg_at_k(["a", "b"], {"a", "b"}) == pytest.approx(1.0)
    ranking = [f"d{i}" for i in range(20)] + ["hit"]
    assert ev.ndcg_at_k(ranking, {"hit"}) == 0.0
    assert ev.mrr_at_k(ranking, {"hit"}) == 0.0
    assert ev.mrr_at_k(ranking, {"hit"}, k=21) == pytest.approx(1 / 21)
    assert ev.recall_at_k(ranking, {"hit", "d0"}, 10) == pytest.approx(0.5)
    assert ev.recall_at_k(ranking, {"hit", "d0"}, 100) == pytest.approx(1.0)


def test_metric_argument_errors() -> None:
    with pytest.raises(ValueError, match="relevant"):
        ev.ndcg_at_k(["a"], set())
    with pytest.raises(ValueError, match="k must be"):
        ev.mrr_at_k(["a"], {"a"}, k=0)
    with pytest.raises(ValueError, match="no ranking"):
        ev.retrieval_metrics({"q1": ["a"]}, {"q1": {"a"}, "q2": {"b"}})
    with pytest.raises(ValueError, match="no query"):
        ev.retrieval_metrics({"q1": ["a"]}, {"q1": set()})


def test_retrieval_metrics_average_over_judged_queries() -> None:
    rankings = {"q1": ["a", "b"], "q2": ["b", "a"], "q3": ["a"]}
    qrels = {"q1": {"a"}, "q2": {"a"}, "q3": set()}  # q3 has no judgment: ignored
    out = ev.retrieval_metrics(rankings, qrels, recall_ks=(1, 2))
    assert out["ndcg@10"] == pytest.approx((1 + 1 / L2(3)) / 2)
    assert out["mrr@10"] == pytest.approx(0.75)
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(1.0)


def test_rank_by_similarity_orders_and_breaks_ties_by_corpus_order() -> None:
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    queries = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ranked = ev.rank_by_similarity(queries, docs, ["a", "b", "c", "d"], top_k=3)
    # b and c have the same cosine with query 0: corpus order keeps b first.
    assert ranked == [["b", "c", "d"], ["a", "d", "b"]]
    with pytest.raises(ValueError, match="ids"):
        ev.rank_by_similarity(queries, docs, ["a"])


# ---------------------------------------------------------------------------- evaluate()


class BagOfWords:
    """A deterministic stand-in encoder: hashed word counts (no model needed)."""

    def __init__(self, dim: int = 512, constant: bool = False) -> None:
        self.dim, self.constant, self.calls = dim, constant, []

    def encode(self, texts, *, batch_size, pooling, normalize, max_length):
        self.calls.append((len(texts), pooling, normalize, max_length))
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        if self.constant:  # every text looks the same: ranking falls back to corpus order
            out = torch.ones(len(texts), self.dim)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _toy_task() -> ev.RetrievalTask:
    topics = ["apple banana", "train station", "kernel launch", "merge weights", "python list"]
    return ev.RetrievalTask(
        name="toy",
        queries={f"q{i}": f"about {t}" for i, t in enumerate(topics)},
        corpus={f"d{i}": f"a long text on {t} and more" for i, t in enumerate(topics)},
        qrels={f"q{i}": {f"d{i}"} for i in range(len(topics))},
    )


def test_evaluate_with_an_encoder_object() -> None:
    model = BagOfWords()
    out = ev.evaluate(model, _toy_task(), max_length=64, query_prefix="query: ")
    assert out["task"] == "toy"
    assert out["ndcg@10"] == pytest.approx(1.0)
    assert out["mrr@10"] == pytest.approx(1.0)
    assert out["num_queries"] == 5 and out["num_documents"] == 5
    assert model.calls == [(5, "mean", True, 64), (5, "mean", True, 64)]
    # All scores tie, so query i finds its document at rank i + 1 (corpus order).
    blind = ev.evaluate(BagOfWords(constant=True), _toy_task())
    assert blind["ndcg@10"] == pytest.approx(sum(1 / L2(i + 2) for i in range(5)) / 5)
    assert blind["mrr@10"] == pytest.approx(sum(1 / (i + 1) for i in range(5)) / 5)
    assert blind["recall@1"] == pytest.approx(0.2)


def test_task_validation() -> None:
    with pytest.raises(ValueError, match="unknown document"):
        ev.RetrievalTask("t", {"q": "x"}, {"d": "y"}, {"q": {"nope"}})
    with pytest.raises(ValueError, match="unknown query"):
        ev.RetrievalTask("t", {"q": "x"}, {"d": "y"}, {"other": {"d"}})
    with pytest.raises(ValueError, match="no query has a relevant"):
        ev.RetrievalTask("t", {"q": "x"}, {"d": "y"}, {})


# ---------------------------------------------------------------------------- embedded task


def test_split_is_by_top_level_package_and_stable() -> None:
    assert ev.split_of("email.mime.text") == ev.split_of("email")
    assert ev.split_of("json.decoder") == ev.split_of("json")
    # The hash is sha256-based, so the split is the same on every machine: pin two values.
    assert {ev.split_of("asyncio"), ev.split_of("pathlib")} == {"train", "heldout"}


def test_embedded_task_is_held_out_and_deterministic() -> None:
    task = ev.embedded_task()
    again = ev.embedded_task()
    assert task.queries == again.queries and task.corpus == again.corpus
    assert len(task.queries) >= 200
    assert all(len(rel) == 1 for rel in task.qrels.values())
    held = {q.split(":")[0] for q in task.queries}
    assert all(ev.split_of(m) == "heldout" for m in held)
    train = ev.stdlib_pairs("train")
    assert len(train) > len(task.queries)
    assert all(ev.split_of(p["id"].split(":")[0]) == "train" for p in train)
    # No training text (query or positive) appears in the held-out task.
    train_texts = {p["query"] for p in train} | {p["positive"] for p in train}
    assert not train_texts & (set(task.queries.values()) | set(task.corpus.values()))
    small = ev.embedded_task(max_queries=50)
    assert len(small.queries) == 50 and small.corpus == task.corpus
    assert set(small.queries) <= set(task.queries)


def test_stdlib_texts_respect_the_split() -> None:
    docs = ev.stdlib_texts("train", "docs")
    held = ev.embedded_task()
    assert docs and not set(held.corpus.values()) & {d.partition("\n\n")[2] for d in docs}
    code = ev.stdlib_texts("heldout", "code")
    assert code and len(code) < len(ev.stdlib_texts("train", "code"))
    with pytest.raises(ValueError, match="kind"):
        ev.stdlib_texts("train", "images")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- JSON Lines sets


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_pairs_file(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "set.jsonl",
        [
            {"query": "q one", "positive": "doc A", "negatives": ["doc B"]},
            {"query": "q two", "positive": ["doc B", "doc C"]},
        ],
    )
    task = ev.load_retrieval_jsonl(path)
    assert task.name == "set"
    assert sorted(task.corpus.values()) == ["doc A", "doc B", "doc C"]  # deduplicated by text
    by_text = {t: i for i, t in task.corpus.items()}
    assert task.qrels["q1"] == {by_text["doc A"]}
    assert task.qrels["q2"] == {by_text["doc B"], by_text["doc C"]}
    assert ev.load_task(path).corpus == task.corpus


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"positive": "x"}', "'query'"),
        ('{"query": "q", "positive": []}', "positive"),
        ('{"query": "q", "positive": "x", "negatives": "y"}', "negatives"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_pairs_file_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "ok", "positive": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        ev.load_retrieval_jsonl(path)
    assert "bad.jsonl:2" in str(info.value)


def _beir(folder: Path, qrels_tsv: bool) -> Path:
    folder.mkdir()
    _write_jsonl(folder / "queries.jsonl", [{"_id": "1", "text": "q"}, {"_id": "2", "text": "r"}])
    _write_jsonl(
        folder / "corpus.jsonl",
        [{"_id": "a", "title": "T", "text": "x"}, {"_id": "b", "text": "y"}],
    )
    if qrels_tsv:
        (folder / "qrels").mkdir()
        (folder / "qrels" / "test.tsv").write_text(
            "query-id\tcorpus-id\tscore\n1\ta\t1\n2\tb\t0\n", encoding="utf-8"
        )
    else:
        _write_jsonl(
            folder / "qrels.jsonl",
            [{"query-id": "1", "corpus-id": "a", "score": 2}, {"query-id": "2", "corpus-id": "b"}],
        )
    return folder


@pytest.mark.parametrize("qrels_tsv", [False, True])
def test_beir_folder(tmp_path: Path, qrels_tsv: bool) -> None:
    task = ev.load_retrieval_jsonl(_beir(tmp_path / "set", qrels_tsv))
    assert task.corpus == {"a": "T\nx", "b": "y"}
    assert task.qrels["1"] == {"a"}
    # score 0 in the TSV is "not relevant"; the JSONL default score is 1.
    assert task.qrels.get("2", set()) == (set() if qrels_tsv else {"b"})


def test_beir_errors(tmp_path: Path) -> None:
    folder = _beir(tmp_path / "set", qrels_tsv=False)
    _write_jsonl(folder / "qrels.jsonl", [{"query-id": "1", "corpus-id": "zzz"}])
    with pytest.raises(ValueError, match="unknown document 'zzz'"):
        ev.load_retrieval_jsonl(folder)
    (folder / "qrels.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="qrels"):
        ev.load_retrieval_jsonl(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.load_retrieval_jsonl(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------- CLI: eval, encode


def test_eval_and_encode_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from bidirlm.cli import main
    from bidirlm.runtime import load_model
    from bidirlm.runtime.embedded import embedded_tiny_model

    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    model = str(embedded_tiny_model())
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\n\nsecond line\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    assert main(["encode", model, "--input", str(texts), "--output", str(out)]) == 0
    emb = np.load(out)
    expected = load_model(model).encode(["first line", "second line"])
    assert emb.shape == (2, 64)
    torch.testing.assert_close(torch.from_numpy(emb), expected)
    assert main(["encode", model, "--input", str(tmp_path / "nope.txt"), "--output", str(out)]) == 1
    assert "nope.txt does not exist" in capsys.readouterr().err

    task = _write_jsonl(
        tmp_path / "set.jsonl",
        [{"query": "sort a list", "positive": "Return a new sorted list."},
         {"query": "open a file", "positive": "Open file and return a stream."}],
    )  # fmt: skip
    metrics_file = tmp_path / "m.json"
    assert main(["eval", model, "--task", str(task), "--output", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_queries"] == 2 and 0.0 <= metrics["ndcg@10"] <= 1.0
    assert json.loads(capsys.readouterr().out) == metrics
    assert main(["eval", model, "--task", str(tmp_path / "missing.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_non_utf8_lines_name_the_file_and_line(tmp_path: Path) -> None:
    ok = b'{"query": "ok", "positive": "fine"}\n'
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(ok + ok.replace(b"fine", "caf\xe9".encode("latin-1")))
    with pytest.raises(ValueError, match=rf"{pairs}:2: not UTF-8"):
        ev.load_retrieval_jsonl(pairs)
    folder = ev.save_task(_toy_task(), tmp_path / "beir")
    corpus = folder / "corpus.jsonl"
    lines = corpus.read_bytes().splitlines(keepends=True)
    corpus.write_bytes(b"".join(lines[:3]) + b'{"_id": "x", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"{corpus}:4: not UTF-8"):
        ev.load_retrieval_jsonl(folder)


class NonFinite(BagOfWords):
    """An encoder whose embedding of one text is NaN (a model with NaN weights, fp16 overflow)."""

    def __init__(self, bad: str, value: float) -> None:
        super().__init__()
        self.bad, self.value = bad, value

    def encode(self, texts, **kwargs):
        out = super().encode(texts, **kwargs)
        for i, text in enumerate(texts):
            if self.bad in text:
                out[i, 0] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_no_metrics_from_non_finite_embeddings(value: float) -> None:
    # before: a NaN document embedding just ranked last and the metrics looked plausible
    with pytest.raises(ValueError, match=r"1 of 5 embeddings are not finite.*kernel launch"):
        ev.evaluate(NonFinite("kernel launch", value), _toy_task())
