"""Runs at the paper's scale (issue 28): the step's size, token budgets, token-share mixtures,
Parquet-shard and streamed sources (exact resume, per-rank parts), symmetric instructions, MFU
peaks per device, TensorBoard / W&B, and the in-run held-out evaluation. Training runs are bf16
autocast on the CPU with the tiny embedded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.runtime import embedded
from bidirlm.runtime.training import mfu
from bidirlm.runtime.training.batching import step_plan
from bidirlm.runtime.training.config import (
    HeldoutConfig,
    SourceConfig,
    load_train_config,
    train_config_from_dict,
)
from bidirlm.runtime.training.data import (
    HFStreamSource,
    ListSource,
    PackedBatches,
    PairBatches,
    ParquetShardsSource,
    check_sources,
    open_source,
    tokenize_document,
)
from bidirlm.runtime.training.monitor import tensorboard_available, wandb_available
from bidirlm.runtime.training.trainer import TrainingInterrupted, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROWS = [{"text": f"row {i} " + "word " * (i % 5), "id": i} for i in range(53)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded.embedded_tiny_model()))


@pytest.fixture(autouse=True)
def _cpu_reference_ops(monkeypatch: pytest.MonkeyPatch):
    """The torch reference ops and one thread (a shared 2-core CPU; Triton's interpreter is
    slow); the kernels themselves are tested elsewhere."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(phase: str, output: Path, *extra: str):
    small = {
        "causal": ["data.tokens_per_batch=128", "data.max_seq_len=64"],
        "mntp": ["data.tokens_per_batch=128", "data.max_seq_len=64"],
        "contrastive": ["data.batch_size=4", "data.query_max_len=16", "data.document_max_len=24"],
    }[phase]
    base = [f"train.output={output}", "train.progress_bar=false", "train.dtype=bfloat16"]
    return load_train_config(EXAMPLES / f"tiny-{phase}.toml", [*base, *small, *extra])


def _rows(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def _minimal(phase: str = "mntp", **train: object) -> dict:
    return {
        "model": "embedded:tiny",
        "phase": phase,
        "train": {"output": "out", **train},
        "data": {"sources": [{"path": "embedded:python-docs"}]},
    }


# ---------------------------------------------------------------------- the step's size


def test_tokens_per_step_derives_the_accumulation() -> None:
    config = train_config_from_dict(_minimal(steps=3, tokens_per_step=2359296))
    config.data.tokens_per_batch = 8192
    assert step_plan(config, 96).grad_accum == 3  # Table 2: 96 GPUs x 3 x 8192
    assert step_plan(config, 8).grad_accum == 36 and step_plan(config, 1).grad_accum == 288
    assert step_plan(config, 8).per_step == 2359296
    with pytest.raises(ValueError) as info:
        step_plan(config, 7)
    message = str(info.value)
    assert "\n" not in message
    assert "train.tokens_per_step=2359296" in message and "data.tokens_per_batch=8192" in message
    pairs = train_config_from_dict({**_minimal("contrastive", steps=2, pairs_per_step=512)})
    pairs.data.batch_size = 128
    assert step_plan(pairs, 4).grad_accum == 4 and step_plan(pairs, 4).unit == "pairs"
    pairs.data.batch_size = 100
    with pytest.raises(ValueError, match=r"train.pairs_per_step=512 .* data.batch_size=100"):
        step_plan(pairs, 1)
    wrong = train_config_from_dict(_minimal("contrastive", steps=2, tokens_per_step=4096))
    with pytest.raises(ValueError, match="use train.pairs_per_step"):
        step_plan(wrong, 1)
    with pytest.raises(ValueError, match="not both"):
        train_config_from_dict(_minimal(steps=2, tokens_per_step=4096, grad_accum=2))
    with pytest.raises(ValueError, match="not both"):
        train_config_from_dict(_minimal(steps=2, tokens_per_step=4096, pairs_per_step=8))


def test_token_budgets_and_warmup_fraction() -> None:
    config = train_config_from_dict(_minimal(tokens_per_step=2359296, token_budget="ablation"))
    assert config.train.steps == 4239 and config.train.budget_tokens == 10_000_000_000
    config = train_config_from_dict(_minimal(tokens_per_step=2359296, token_budget="scaling"))
    assert config.train.steps == 12716  # ceil(30e9 / 2359296)
    config = train_config_from_dict(_minimal(tokens_per_step=1000, token_budget=10_500))
    assert config.train.steps == 11
    explicit = train_config_from_dict(_minimal(steps=5, tokens_per_step=1000, token_budget=10**9))
    assert explicit.train.steps == 5  # a short trial run of a budgeted recipe
    with pytest.raises(ValueError, match="train.token_budget needs train.tokens_per_step"):
        train_config_from_dict(_minimal(token_budget="ablation"))
    with pytest.raises(ValueError, match="'huge' is not one of"):
        train_config_from_dict(_minimal(tokens_per_step=8, token_budget="huge"))
    raw = _minimal(steps=12716)
    raw["optim"] = {"warmup_fraction": 0.01}
    assert train_config_from_dict(raw).optim.warmup_for(12716) == 127
    raw["optim"] = {"warmup_fraction": 0.01, "warmup_steps": 3}
    with pytest.raises(ValueError, match="optim.warmup_steps or optim.warmup_fraction"):
        train_config_from_dict(raw)


def test_train_records_the_effective_batch_bf16(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _config(
        "causal", out, "train.steps=2", "train.tokens_per_step=256", "optim.warmup_steps=0",
        "optim.warmup_fraction=0.5",
    )  # fmt: skip
    train(config)
    rows = _rows(out)
    assert [r["grad_accum"] for r in rows] == [2, 2]
    assert [r["tokens_per_step"] for r in rows] == [256, 256] and rows[0]["world_size"] == 1
    assert [r["tokens"] for r in rows] == [256, 512]  # two micro-batches of 128 per step
    assert rows[0]["lr"] < rows[1]["lr"]  # warmup over 0.5 x 2 steps = 1 step
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


# ---------------------------------------------------------------------- token shares

SHORT, LONG = " ".join(["apple"] * 4), " ".join(["zebra"] * 75)  # 6 / 302 tokens, none shared


def _share_stream(tokenizer, seed: int = 0) -> PackedBatches:
    short = ListSource("short", [{"text": SHORT}] * 500)
    long = ListSource("long", [{"text": LONG}] * 50)
    return PackedBatches(
        [short, long], [0.8, 0.2], tokenizer, tokens_per_batch=512, max_seq_len=128, seed=seed
    )


def test_token_shares_follow_the_weights_not_the_documents(tokenizer) -> None:
    stream = _share_stream(tokenizer)
    special = set(tokenizer.all_special_ids)
    docs = {
        "long": tokenize_document(tokenizer, LONG),
        "short": tokenize_document(tokenizer, SHORT),
    }
    words = {k: set(v) - special for k, v in docs.items()}
    assert not words["long"] & words["short"]
    # a source's tokens = its (special-free) words x its document length / words per document
    scale = {k: len(v) / sum(1 for t in v if t in words[k]) for k, v in docs.items()}
    counted = {"long": 0.0, "short": 0.0}
    for _ in range(60):  # 30,720 tokens
        ids = stream.next_batch().input_ids.tolist()
        for k in counted:
            counted[k] += sum(1 for t in ids if t in words[k]) * scale[k]
    share = counted["long"] / sum(counted.values())  # counted from the batches themselves
    assert abs(share - 0.2) < 0.02, share
    assert abs(stream.token_shares()["long"] - 0.2) < 0.02
    mix = stream._mix
    # per document, the long source gives far fewer than 20% of the documents
    assert mix.docs[1] / sum(mix.docs) < 0.05
    # the state carries the counts: a resumed stream continues identically
    state = json.loads(json.dumps(stream.state_dict()))
    again = _share_stream(tokenizer)
    again.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(stream.next_batch().input_ids, again.next_batch().input_ids)


def test_training_logs_the_realised_token_shares_bf16(tmp_path: Path) -> None:
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": f"apple {i % 7}"}) + "\n" for i in range(400)))
    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"text": " ".join(["zebra"] * 60 + [str(i)])}) + "\n" for i in range(40))
    )
    out = tmp_path / "run"
    config = _config(
        "causal", out, "train.steps=16", "data.tokens_per_batch=1024", "data.max_seq_len=256",
        "data.log_shares_every=8", "optim.warmup_steps=0",
    )  # fmt: skip
    config.data.sources = [
        SourceConfig(str(short), weight=4.0, name="short"),
        SourceConfig(str(long), weight=1.0, name="long"),
    ]
    train(config)
    rows = _rows(out)
    logged = [r for r in rows if "token_shares" in r]
    assert [r["step"] for r in logged] == [8, 16]
    shares = logged[-1]["token_shares"]
    assert abs(shares["long"] - 0.2) < 0.02 and abs(shares["short"] - 0.8) < 0.02, shares


# ---------------------------------------------------------------------- Parquet shards


def _write_shards(folder: Path, rows: list[dict], shards: int = 3, group: int = 4) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        part = rows[s::shards]
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part), path, row_group_size=group)
        paths.append(path)
    return paths


def _read(source, n: int) -> list[int]:
    return [source.next_record()["id"] for _ in range(n)]


def test_parquet_shard_folder_is_one_source_read_per_rank(tmp_path: Path) -> None:
    _write_shards(tmp_path / "shards" / "sub", ROWS)
    source = open_source(SourceConfig(str(tmp_path / "shards")))  # searched recursively
    assert isinstance(source, ParquetShardsSource) and len(source.paths) == 3
    assert len(source) == 53  # from the footers
    glob = open_source(SourceConfig(str(tmp_path / "shards" / "*" / "part-*.parquet")))
    assert isinstance(glob, ParquetShardsSource) and glob.paths == source.paths
    source.set_rank(0, 1, seed=5)
    epoch0, epoch1 = _read(source, 53), _read(source, 53)
    assert sorted(epoch0) == sorted(epoch1) == list(range(53)) and epoch0 != epoch1
    parts = []
    for rank in range(2):
        mine = open_source(SourceConfig(str(tmp_path / "shards")))
        mine.set_rank(rank, 2, seed=5)
        # a rank reads whole row groups of its own until the epoch is done
        taken = []
        while mine.epoch == 0:
            taken.append(mine.next_record()["id"])
        parts.append(taken[:-1] if mine.epoch else taken)
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(53))
    checked = check_sources([SourceConfig(str(tmp_path / "shards"))], fields=("text",))
    assert checked[0].name == str(tmp_path / "shards")
    with pytest.raises(ValueError, match="lack field"):
        check_sources([SourceConfig(str(tmp_path / "shards"))], fields=("body",))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        open_source(SourceConfig(str(tmp_path / "nothing-*.parquet")))


def test_parquet_shards_resume_exactly(tmp_path: Path, tokenizer) -> None:
    _write_shards(tmp_path / "shards", ROWS)
    source = open_source(SourceConfig(str(tmp_path / "shards")))
    source.set_rank(1, 2, seed=3)
    _read(source, 17)
    state = json.loads(json.dumps(source.state_dict()))
    expected = _read(source, 40)  # across the epoch boundary
    fresh = open_source(SourceConfig(str(tmp_path / "shards")))
    fresh.set_rank(1, 2, seed=3)
    fresh.load_state_dict(state)
    assert _read(fresh, 40) == expected
    # packed: resumed mid-document (the pending record is re-read from its stream position)
    long_rows = [{"text": "long " * (20 + i), "id": i} for i in range(30)]
    _write_shards(tmp_path / "long", long_rows, group=2)

    def stream():
        src = open_source(SourceConfig(str(tmp_path / "long")))
        return PackedBatches([src], [1.0], tokenizer, tokens_per_batch=50, max_seq_len=16, seed=1)

    a = stream()
    for _ in range(7):
        a.next_batch()
    saved = json.loads(json.dumps(a.state_dict()))
    assert saved["pending"] is not None and isinstance(saved["pending"][1], dict)
    b = stream()
    b.load_state_dict(saved)
    for _ in range(6):
        assert torch.equal(a.next_batch().input_ids, b.next_batch().input_ids)


def test_training_on_parquet_shards_resumes_exactly_bf16(tmp_path: Path) -> None:
    docs = [{"text": t, "id": i} for i, t in enumerate(embedded.stdlib_texts()[:120])]
    _write_shards(tmp_path / "shards", docs, shards=4, group=8)
    extra = ["train.steps=4", "train.checkpoint_every=0", "optim.warmup_steps=0"]

    def config(out: Path):
        cfg = _config("causal", out, *extra)
        cfg.data.sources = [SourceConfig(str(tmp_path / "shards"))]
        return cfg

    train(config(tmp_path / "whole"))
    with pytest.raises(TrainingInterrupted):
        train(config(tmp_path / "split"), stop_after=2)
    train(config(tmp_path / "split"))
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    assert [r["loss"] for r in _rows(tmp_path / "whole")] == [
        r["loss"] for r in _rows(tmp_path / "split")
    ]


# ---------------------------------------------------------------------- datasets streaming


def test_datasets_streaming_source_resumes_and_splits_by_rank(tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for s in range(2):
        (folder / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[s::2]))
    config = SourceConfig(str(folder), streaming=True)
    source = open_source(config)
    assert isinstance(source, HFStreamSource) and source.builder == "json"
    source.set_rank(0, 1, seed=0)
    _read(source, 11)
    state = json.loads(json.dumps(source.state_dict()))
    expected = _read(source, 60)  # past the end: a second epoch
    fresh = open_source(config)
    fresh.set_rank(0, 1, seed=0)
    fresh.load_state_dict(state)
    assert _read(fresh, 60) == expected
    parts = []
    for rank in range(2):
        mine = open_source(config)
        mine.set_rank(rank, 2, seed=0)
        parts.append(set(_read(mine, 26)))
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 52
    glob = open_source(SourceConfig(str(folder / "*.jsonl"), streaming=True))
    assert isinstance(glob, HFStreamSource) and len(glob.files) == 2
    assert check_sources([config], fields=("text",))[0].first_record()["id"] in (0, 1)


def test_packed_stream_over_datasets_streaming_resumes_mid_document(
    tmp_path: Path, tokenizer
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "long " * (15 + i)}) + "\n" for i in range(20)))

    def stream():
        source = open_source(SourceConfig(str(path), streaming=True))
        return PackedBatches(
            [source], [1.0], tokenizer, tokens_per_batch=40, max_seq_len=16, seed=0
        )

    a = stream()
    assert a.per_rank  # a streamed source: each rank reads its own part
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["pending"] is not None  # mid-document
    b = stream()
    b.load_state_dict(state)
    for _ in range(12):  # past the end of the file: a second epoch
        assert torch.equal(a.next_batch().input_ids, b.next_batch().input_ids)


# ---------------------------------------------------------------------- symmetric instructions


def test_symmetric_instructions_on_both_sides() -> None:
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(8)]
    retrieval, sts = ListSource("retrieval", rows), ListSource("sts", rows)
    pairs = PairBatches(
        [retrieval, sts], [1.0, 1.0], batch_size=4, seed=0, negatives_per_query=1,
        instructions=["Retrieve: ", "Same meaning: "], symmetric=[False, True],
    )  # fmt: skip
    seen = set()
    for _ in range(12):
        batch = pairs.next_batch()
        seen.add(batch.dataset)
        if batch.dataset == "sts":  # both sides carry the instruction
            assert all(t.startswith("Same meaning: ") for t in batch.queries)
            assert all(t.startswith("Same meaning: ") for t in batch.positives + batch.negatives)
        else:  # queries only
            assert all(t.startswith("Retrieve: ") for t in batch.queries)
            assert not any(t.startswith("Retrieve") for t in batch.positives + batch.negatives)
    assert seen == {"retrieval", "sts"}  # one dataset per batch, both drawn
    with pytest.raises(ValueError, match="one instruction and one symmetric flag per source"):
        PairBatches([sts], [1.0], batch_size=2, seed=0, symmetric=[True, False])


def test_contrastive_symmetric_source_and_pairs_per_step_bf16(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = _config(
        "contrastive", out, "train.steps=2", "train.pairs_per_step=8",
        "contrastive.mini_batch_size=0", "data.sources.0.symmetric=true",
    )  # fmt: skip
    assert config.data.sources[0].symmetric and config.data.sources[0].instruction
    train(config)
    rows = _rows(out)
    assert [r["grad_accum"] for r in rows] == [2, 2] and rows[0]["pairs_per_step"] == 8
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


# ---------------------------------------------------------------------- MFU


@pytest.mark.parametrize(
    ("name", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("AMD Instinct MI250X", 191.5e12),  # one GCD = one torch device
        ("AMD Instinct MI250X / MI250", 191.5e12),
        ("AMD Instinct MI300X", 1307e12),
        ("AMD Instinct MI325X", 1307e12),
    ],
)
def test_mfu_peaks_by_the_name_torch_reports(
    name: str, bf16: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    device = torch.device("cuda:0")
    assert mfu.device_peak_flops(device, torch.bfloat16) == bf16
    assert mfu.device_peak_flops(device, torch.float16) == bf16  # dense fp16 = bf16 on these
    assert mfu.device_peak_flops(device, torch.float32) is None  # no fp32 row
    assert mfu.device_name(device) == name


def test_unknown_device_says_mfu_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some New GPU")
    assert mfu.device_peak_flops(torch.device("cuda:0"), torch.bfloat16) is None
    assert mfu.device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    # MI250X: a full utilisation of one GCD for a second is 191.5 TFLOP
    assert mfu.mfu(1_000_000, int(191.5e12 / 6e6), 1.0, mfu.peak_flops("MI250X")) == (
        pytest.approx(1.0, rel=1e-6)
    )
    out = tmp_path / "run"
    train(_config("causal", out, "train.steps=1"))
    err = capsys.readouterr().err
    assert "MFU unknown (cpu has no torch.bfloat16 peak" in err and "tokens/s" in err
    assert "mfu" not in _rows(out)[0] and _rows(out)[0]["tokens_per_s"] > 0


# ---------------------------------------------------------------------- monitoring


@pytest.mark.skipif(not tensorboard_available(), reason="the tensorboard package is not installed")
def test_tensorboard_event_files_bf16(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_config("mntp", out, "train.steps=2", "data.log_shares_every=1"))
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr", "grad_norm", "grad_accum"} <= set(tags)
    assert any(t.startswith("token_shares/") for t in tags)
    losses = [e.value for e in acc.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in _rows(out)], rel=1e-6)
    off = tmp_path / "off"
    train(_config("mntp", off, "train.steps=1", "train.tensorboard=false"))
    assert not (off / "tensorboard").exists()


def test_without_tensorboard_the_run_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bidirlm.runtime.training import monitor

    monkeypatch.setattr(monitor, "tensorboard_available", lambda: False)
    out = tmp_path / "run"
    train(_config("causal", out, "train.steps=1"))
    assert "the tensorboard package is not installed" in capsys.readouterr().err
    assert not (out / "tensorboard").exists() and len(_rows(out)) == 1


@pytest.mark.skipif(not wandb_available(), reason="the wandb package is not installed")
def test_wandb_logs_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(_config("causal", out, "train.steps=2", "train.wandb=true"))
    assert (out / "wandb").is_dir() and len(_rows(out)) == 2


@pytest.mark.skipif(wandb_available(), reason="wandb is installed: the run would log to it")
def test_wandb_asked_for_without_the_package(tmp_path: Path) -> None:
    config = _config("causal", tmp_path / "run", "train.steps=1", "train.wandb=true")
    with pytest.raises(ValueError, match="train.wandb = true but the wandb package") as info:
        train(config)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_heldout_evaluation_is_logged_beside_the_loss_bf16(tmp_path: Path) -> None:
    from bidirlm.runtime import load_model
    from bidirlm.runtime.evaluation.in_run import task_evaluator
    from bidirlm.runtime.training.heldout import heldout_tokens, pack
    from bidirlm.runtime.training.phases import PhaseModule, next_token_labels

    out = tmp_path / "run"
    config = _config(
        "mntp", out, "train.steps=3", "heldout.every=2", "heldout.tokens=200",
        'heldout.tasks=["embedded"]',
    )  # fmt: skip
    config.heldout.sources = [SourceConfig("embedded:python-code", name="code")]
    train(config, evaluator=task_evaluator(config, max_length=32))
    rows = _rows(out)
    assert [r["step"] for r in rows if "heldout" in r] == [2, 3]  # every 2 steps and the last
    last = rows[-1]["heldout"]
    assert set(last) == {"code", "embedded"}
    assert 0.0 <= last["embedded"]["ndcg@10"] <= 1.0
    # the logged loss is the final model's causal-LM loss on the first 200 tokens of the source
    model = load_model(out / "final", dtype=torch.float32, bidirectional=False)
    (source,) = check_sources([config.heldout.sources[0]], fields=("text",))
    batch = pack(heldout_tokens(source, model.tokenizer, 200, "text"), config.data.max_seq_len)
    labels = next_token_labels(batch.input_ids, batch.cu_seqlens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = PhaseModule(model)(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, labels)
    assert last["code"]["lm_loss"] == pytest.approx(float(loss), rel=1e-4)
    missing = _config("mntp", tmp_path / "y", "train.steps=1")
    missing.heldout = HeldoutConfig(every=1, sources=[SourceConfig(str(tmp_path / "nope.jsonl"))])
    with pytest.raises(FileNotFoundError, match="heldout.sources: .*nope.jsonl does not exist"):
        train(missing)
    assert not (tmp_path / "y").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="heldout.tasks needs an evaluator"):
        train(_config("mntp", tmp_path / "x", "train.steps=1", "heldout.every=1",
                      'heldout.tasks=["embedded"]'))  # fmt: skip
    assert os.path.isdir(out / "final")


def test_with_a_streamed_source_every_source_is_dealt_to_the_ranks(
    tmp_path: Path, tokenizer
) -> None:
    """A packed stream with a streamed source is read per rank; its random-access sources are
    dealt too (every world-th entry of each epoch's permutation), so no record is read twice."""
    _write_shards(tmp_path / "shards", ROWS)
    listed = [{"text": f"listed {i}", "id": 1000 + i} for i in range(10)]
    seen = []
    for rank in range(2):
        stream = PackedBatches(
            [open_source(SourceConfig(str(tmp_path / "shards"))), ListSource("l", listed)],
            [1.0, 1.0], tokenizer, tokens_per_batch=32, max_seq_len=16, seed=4,
            rank=rank, world=2,
        )  # fmt: skip
        assert stream.per_rank
        mix = stream._mix
        seen.append({mix.next_index(1) for _ in range(5)})  # one epoch of this rank's share
        assert mix.epochs[1] == 1
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(10))


def test_bidirlm_train_hands_the_evaluator_in(tmp_path: Path) -> None:
    from bidirlm.cli import main as cli_main

    out = tmp_path / "run"
    argv = [
        "train", str(EXAMPLES / "tiny-mntp.toml"), "--set", f"train.output={out}",
        "--set", "train.steps=2", "--set", "train.progress_bar=false",
        "--set", "data.tokens_per_batch=128", "--set", "data.max_seq_len=64",
        "--set", "train.dtype=bfloat16", "--set", "heldout.every=2",
        "--set", 'heldout.tasks=["embedded"]',
    ]  # fmt: skip
    assert cli_main(argv) == 0
    heldout = _rows(out)[-1]["heldout"]
    assert set(heldout) == {"embedded"} and 0.0 <= heldout["embedded"]["mrr@10"] <= 1.0


def test_training_on_a_datasets_stream_resumes_exactly_bf16(tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    folder.mkdir()
    texts = embedded.stdlib_texts()[:60]
    for s in range(2):
        (folder / f"part-{s}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[s::2])
        )
    extra = ["train.steps=4", "train.checkpoint_every=0", "optim.warmup_steps=0"]

    def config(out: Path):
        cfg = _config("mntp", out, *extra)
        cfg.data.sources = [SourceConfig(str(folder), streaming=True, name="stream")]
        return cfg

    train(config(tmp_path / "whole"))
    with pytest.raises(TrainingInterrupted):
        train(config(tmp_path / "split"), stop_after=2)
    train(config(tmp_path / "split"))
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    losses = [r["loss"] for r in _rows(tmp_path / "whole")]
    assert losses == [r["loss"] for r in _rows(tmp_path / "split")] and len(set(losses)) == 4
