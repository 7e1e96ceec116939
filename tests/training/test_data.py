"""Data sources, mixtures, packing with cu_seqlens, contrastive batches, resume; embedded."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from bidirlm.runtime import embedded
from bidirlm.runtime.training.config import SourceConfig
from bidirlm.runtime.training.data import (
    ListSource,
    PackedBatches,
    PairBatches,
    check_sources,
    open_source,
    pack_texts,
    tokenize_document,
)

DOCS = [f"document number {i} " + "word " * (i % 7) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded.embedded_tiny_model()))


def _write_sources(tmp: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp / "a.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n\n"
    )
    parquet = tmp / "a.parquet"
    pq.write_table(pa.table({"text": DOCS}), parquet, row_group_size=7)
    txt = tmp / "a.txt"
    txt.write_text("\n\n".join(DOCS[:5]) + "\n")
    folder = tmp / "txts"
    folder.mkdir()
    for i, t in enumerate(DOCS[:3]):
        (folder / f"{i}.txt").write_text(t)
    hf = tmp / "hf"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(hf))
    return {"jsonl": jsonl, "parquet": parquet, "txt": txt, "folder": folder, "hf": hf}


def test_every_source_kind_reads_its_records(tmp_path: Path) -> None:
    paths = _write_sources(tmp_path)
    for kind in ("jsonl", "parquet", "hf"):
        source = open_source(SourceConfig(str(paths[kind])))
        assert len(source) == len(DOCS), kind
        assert [source[i]["text"] for i in (0, 13, 39, 8)] == [DOCS[i] for i in (0, 13, 39, 8)]
    assert [r["text"] for r in _all(open_source(SourceConfig(str(paths["txt"]))))] == DOCS[:5]
    assert [r["text"] for r in _all(open_source(SourceConfig(str(paths["folder"]))))] == DOCS[:3]
    docs = open_source(SourceConfig("embedded:python-docs"))
    assert len(docs) > 1000 and isinstance(docs[0]["text"], str)
    pairs = open_source(SourceConfig("embedded:python-pairs"))
    assert set(pairs[0]) == {"query", "positive", "negatives"}


def _all(source):
    return [source[i] for i in range(len(source))]


def test_source_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.jsonl does not exist"):
        open_source(SourceConfig(str(tmp_path / "nothing.jsonl")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type .csv"):
        open_source(SourceConfig(str(tmp_path / "x.csv")))
    with pytest.raises(ValueError, match="unknown embedded source 'embedded:nope'"):
        open_source(SourceConfig("embedded:nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a datasets save_to_disk folder"):
        open_source(SourceConfig(str(tmp_path / "empty")))
    (tmp_path / "q.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl: records lack field\(s\) text .*has: body"):
        check_sources([SourceConfig(str(tmp_path / "q.jsonl"))], fields=("text",))
    (tmp_path / "none.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="none.jsonl has no records"):
        check_sources([SourceConfig(str(tmp_path / "none.jsonl"))], fields=("text",))


def _stream(tokenizer, sources, weights=None, seed=0, budget=64, max_len=16):
    return PackedBatches(
        sources,
        weights or [1.0] * len(sources),
        tokenizer,
        tokens_per_batch=budget,
        max_seq_len=max_len,
        seed=seed,
    )


def test_packing_exact_budget_no_token_lost(tokenizer) -> None:
    source = ListSource("docs", [{"text": t} for t in DOCS])
    stream = _stream(tokenizer, [source], budget=61, max_len=13)
    batches = [stream.next_batch() for _ in range(5)]  # within the first epoch
    flat = []
    for b in batches:
        assert b.input_ids.shape == (61,) and b.input_ids.dtype == torch.long
        cu = b.cu_seqlens
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 61
        lengths = cu[1:] - cu[:-1]
        assert (lengths > 0).all() and (lengths <= 13).all() and b.max_seqlen == lengths.max()
        flat += b.input_ids.tolist()
    # The token stream is the documents, tokenized, in the permutation order of epoch 0.
    assert stream._mix.epochs == [0]
    order = torch.tensor(stream._mix._perms[0][1])
    expected = [tok for i in order.tolist() for tok in tokenize_document(tokenizer, DOCS[i])]
    assert flat == expected[: len(flat)]
    assert expected[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in expected


def test_determinism_mixture_weights_and_resume(tokenizer) -> None:
    a = ListSource("a", [{"text": "alpha " * 3}] * 50)
    b = ListSource("b", [{"text": "beta " * 3}] * 50)
    s1, s2 = _stream(tokenizer, [a, b], [0.8, 0.2]), _stream(tokenizer, [a, b], [0.8, 0.2])
    first = [s1.next_batch().input_ids for _ in range(40)]
    assert all(torch.equal(x, s2.next_batch().input_ids) for x in first)
    other = _stream(tokenizer, [a, b], [0.8, 0.2], seed=1)
    assert not all(torch.equal(x, other.next_batch().input_ids) for x in first)
    share = s1._mix.draws and s1._mix.epochs[0] * 50 + s1._mix.cursors[0]
    assert 0.7 < share / s1._mix.draws < 0.9  # ~80% of the documents came from source a
    # Resume mid-document: a fresh stream loaded with the state continues identically.
    state = json.loads(json.dumps(s1.state_dict()))
    assert state["pending"] is not None or state["mixture"]["draws"] > 0
    resumed = _stream(tokenizer, [a, b], [0.8, 0.2])
    resumed.load_state_dict(state)
    for _ in range(10):
        x, y = s1.next_batch(), resumed.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.cu_seqlens, y.cu_seqlens)
    with pytest.raises(ValueError, match="the data mixture changed"):
        _stream(tokenizer, [a]).load_state_dict(state)


def test_epochs_cover_every_record_once(tokenizer) -> None:
    source = ListSource("s", [{"text": f"d{i}"} for i in range(9)])
    stream = _stream(tokenizer, [source])
    seen = [stream._mix.next_index(0) for _ in range(18)]
    assert sorted(seen[:9]) == list(range(9)) and sorted(seen[9:]) == list(range(9))
    assert seen[:9] != seen[9:]  # a fresh permutation per epoch


def test_pair_batches(tmp_path: Path) -> None:
    rows = [
        {"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}a", f"n{i}b"]}
        for i in range(10)
    ]
    rows[3]["negatives"] = [rows[3]["negatives"][0]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    other = ListSource("other", [{"query": f"x{i}", "positive": f"y{i}"} for i in range(6)])
    sources = check_sources([SourceConfig(str(path))], fields=("query", "positive")) + [other]
    stream = PairBatches(
        sources, [1.0, 1.0], batch_size=4, seed=3, negatives_per_query=2, instructions=["Q: ", ""]
    )
    twin = PairBatches(
        sources, [1.0, 1.0], batch_size=4, seed=3, negatives_per_query=2, instructions=["Q: ", ""]
    )
    batches = [stream.next_batch() for _ in range(8)]
    assert {b.dataset for b in batches} == {str(path), "other"}
    for b in batches:
        assert len(b.queries) == len(b.positives) == 4
        if b.dataset == "other":
            assert b.negatives_per_query == 0 and b.negatives == []
            assert all(q.startswith("x") for q in b.queries)  # one dataset per batch
        else:
            assert all(q.startswith("Q: q") for q in b.queries)
            # Each query keeps its own negatives: record 3's single one drops nobody else's.
            counts = b.counts()
            assert counts == [1 if q == "Q: q3" else 2 for q in b.queries]
            assert len(b.negatives) == sum(counts) and b.negatives_per_query == max(counts)
            for i, q in enumerate(b.queries):
                assert b.positives[i] == "p" + q[4:]
                assert b.negatives_of(i) == [n for n in rows[int(q[4:])]["negatives"]]
    half = batches[0].shard(1, 2)
    assert half.queries == batches[0].queries[2:]
    with pytest.raises(ValueError, match="does not split evenly"):
        batches[0].shard(0, 3)
    twin.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    assert stream.next_batch() == twin.next_batch()


def test_pack_texts(tokenizer) -> None:
    ids, cu, longest = pack_texts(tokenizer, ["a b c", "a much longer text " * 20], max_len=9)
    assert cu.tolist()[-1] == ids.numel() and longest == 9 and cu.dtype == torch.int32


def test_embedded_corpora_and_tiny_model() -> None:
    docs = embedded.python_docs_texts()
    assert docs == embedded.python_docs_texts() and len(docs) > 1000
    code = embedded.python_code_texts()
    assert len(code) > 100 and any("def " in t for t in code[:20])
    pairs = embedded.python_pairs()
    assert len(pairs) > 500 and all(len(p["negatives"]) == 1 for p in pairs[:50])
    path = embedded.embedded_tiny_model()
    assert path == embedded.embedded_tiny_model()  # cached: built once
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] % 64 == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.mask_token == "<mask>" and tok.pad_token == "<pad>"
    assert tok("x").input_ids[0] == tok.bos_token_id and tok("x").input_ids[-1] == tok.eos_token_id


def test_atomic_build_under_concurrency(tmp_path: Path) -> None:
    calls: list[int] = []
    barrier = threading.Barrier(4)

    def build(tmp: Path) -> None:
        barrier.wait()  # every builder is inside its build at the same time
        (tmp / "payload").write_text(str(threading.get_ident()))
        calls.append(1)

    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(embedded._build_atomic(tmp_path / "x", build))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 4 and set(results) == {tmp_path / "x"}
    assert (tmp_path / "x" / "payload").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary folder left


def test_pair_batches_keep_every_querys_negatives() -> None:
    """Issue 18: 1-7 hard negatives per record; a short record does not cut the batch's others,
    shards split by each query's own count, and the loss equals InfoNCE over exactly the
    batch's real documents (float64 reference; no padded or duplicated document)."""
    from bidirlm.kernels import infonce_loss

    rows = [
        {
            "query": f"q{i}",
            "positive": f"p{i}",
            "negatives": [f"n{i}.{j}" for j in range(i % 7 + 1)],
        }
        for i in range(8)
    ]
    source = ListSource("s", rows)
    stream = PairBatches([source], [1.0], batch_size=8, seed=0, negatives_per_query=5)
    b = stream.next_batch()
    by_query = {r["query"]: r["negatives"][:5] for r in rows}
    assert b.counts() == [len(by_query[q]) for q in b.queries]
    assert min(b.counts()) == 1 and b.negatives_per_query == 5
    assert [b.negatives_of(i) for i in range(8)] == [by_query[q] for q in b.queries]
    assert len(set(b.negatives)) == len(b.negatives) == sum(b.counts())
    halves = [b.shard(r, 2) for r in range(2)]
    assert halves[0].negatives + halves[1].negatives == b.negatives
    assert halves[1].negatives_of(0) == b.negatives_of(4)
    # The loss over the documents positives + negatives: every real document is a negative of
    # every query, each exactly once.
    g = torch.Generator().manual_seed(0)
    docs = b.positives + b.negatives
    emb = {t: torch.randn(16, generator=g, dtype=torch.float64) for t in b.queries + docs}
    q = torch.stack([emb[t] for t in b.queries])
    d = torch.stack([emb[t] for t in docs])
    got = infonce_loss(q.float(), d.float(), temperature=0.1)
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    ref = torch.nn.functional.cross_entropy(qn @ dn.T / 0.1, torch.arange(8))
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
