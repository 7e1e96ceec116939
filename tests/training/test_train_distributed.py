"""Two gloo processes on the CPU give the same losses as one process on the same global batch.

LM phases: 2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches (the data stream
is global, micro-batch j goes to rank j % world). Contrastive: 2 ranks x 2 pairs with documents
gathered across ranks == 1 process x 4 pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from bidirlm.runtime.embedded import stdlib_texts
from bidirlm.runtime.training.config import SourceConfig, load_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUNS = [
    # (phase, strategy, overrides shared by both runs, single-process extra, per-rank extra)
    (
        "causal",
        "ddp",
        ["data.tokens_per_batch=128", "data.max_seq_len=32"],
        ["train.grad_accum=2"],
        [],
    ),
    (
        "mntp",
        "fsdp",
        ["data.tokens_per_batch=128", "data.max_seq_len=32"],
        ["train.grad_accum=2"],
        [],
    ),
    (
        "contrastive",
        "ddp",
        ["data.batch_size=4", "data.query_max_len=12", "data.document_max_len=16"],
        [],
        [],
    ),
]


def _config(phase: str, output: Path, *overrides: str):
    base = [f"train.output={output}", "train.steps=2", "train.checkpoint_every=0"]
    return load_train_config(
        EXAMPLES / f"tiny-{phase}.toml", [*base, "train.progress_bar=false", *overrides]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, root: str, ports: list[int]) -> None:
    os.environ["BIDIRLM_KERNELS"] = "torch"
    torch.set_num_threads(1)
    from bidirlm.runtime.training.trainer import train

    for (phase, strategy, shared, _, per_rank), port in zip(RUNS, ports):
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        out = Path(root) / f"{phase}-2"
        train(_config(phase, out, f"distributed.strategy={strategy}", *shared, *per_rank))


def _losses(output: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (output / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = [_free_port() for _ in RUNS]
    mp.spawn(_worker, args=(2, str(tmp_path), ports), nprocs=2, join=True)
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    from bidirlm.runtime.training.trainer import train

    for phase, _, shared, single, _ in RUNS:
        one = tmp_path / f"{phase}-1"
        train(_config(phase, one, *shared, *single))
        two = tmp_path / f"{phase}-2"
        assert (two / "final" / "config.json").is_file(), phase
        torch.testing.assert_close(
            torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-5,
            msg=lambda m, p=phase: f"{p}: {m}",
        )  # fmt: skip
    torch.set_num_threads(threads)


def test_two_nodes_with_a_torchrun_rendezvous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`torchrun --nnodes 2` on one machine (two launchers, a c10d rendezvous on localhost, one
    process each) gives the losses of one process; the accumulation follows the world size
    (`train.tokens_per_step` = 256: 2 micro-batches of 128 alone, 1 per rank on two nodes)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    shared = ["data.tokens_per_batch=128", "data.max_seq_len=32", "train.tokens_per_step=256"]
    sets = [f"--set={s}" for s in [*shared, "train.steps=2", "train.progress_bar=false"]]
    port = _free_port()
    env = {**os.environ, "BIDIRLM_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = tmp_path / "nodes"
    launchers = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=bidirlm",
                "-m",
                "bidirlm.cli",
                "train",
                str(EXAMPLES / "tiny-causal.toml"),
                f"--set=train.output={out}",
                *sets,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    from bidirlm.runtime.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = tmp_path / "one"
    train(_config("causal", one, *shared))
    torch.set_num_threads(threads)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["world_size"], r["grad_accum"]) for r in rows] == [(2, 1), (2, 1)]
    assert "256 tokens per step = 2 rank(s) x 1 accumulation step(s)" in logs[0] + logs[1]
    torch.testing.assert_close(
        torch.tensor(_losses(out)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-5
    )


def _shards_config(output: Path, shards: Path):
    config = _config(
        "causal", output, "train.steps=4", "train.dtype=bfloat16", "data.tokens_per_batch=96",
        "data.max_seq_len=32", "data.log_shares_every=1", "optim.warmup_steps=0",
    )  # fmt: skip
    config.data.sources = [
        SourceConfig(str(shards), weight=3.0, name="shards"),
        SourceConfig("embedded:python-code", weight=1.0, name="code"),
    ]
    return config


def _shards_worker(rank: int, world: int, root: str, ports: list[int]) -> None:
    os.environ["BIDIRLM_KERNELS"] = "torch"
    torch.set_num_threads(1)
    from bidirlm.runtime.training.trainer import TrainingInterrupted, train

    runs = [("whole", None), ("split", 2), ("split", None)]
    for (name, stop_after), port in zip(runs, ports):
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        try:
            train(_shards_config(Path(root) / name, Path(root) / "shards"), stop_after=stop_after)
        except TrainingInterrupted:
            pass


def test_parquet_shards_per_rank_resume_exactly_on_two_processes(tmp_path: Path) -> None:
    """A Parquet-shard source is read per rank (each rank its own row groups); the checkpoint
    keeps every rank's position, so an interrupted 2-process bf16 run resumes bitwise."""
    import pyarrow as pa  # optional dependency (the [train] extra)
    import pyarrow.parquet as pq

    texts = stdlib_texts()[:96]
    (tmp_path / "shards").mkdir()
    for s in range(4):
        table = pa.Table.from_pylist([{"text": t} for t in texts[s::4]])
        pq.write_table(table, tmp_path / "shards" / f"part-{s}.parquet", row_group_size=6)
    ports = [_free_port() for _ in range(3)]
    mp.spawn(_shards_worker, args=(2, str(tmp_path), ports), nprocs=2, join=True)
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    assert _losses(tmp_path / "whole") == _losses(tmp_path / "split")
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    shares = rows[-1]["token_shares"]  # summed over both ranks
    assert set(shares) == {"shards", "code"} and sum(shares.values()) == pytest.approx(1.0)
    state = json.loads(
        next((tmp_path / "whole" / "checkpoints").iterdir()).joinpath("state.json").read_text()
    )
    per_rank = state["data"]["per_rank"]
    assert len(per_rank) == 2
    for rank, data in enumerate(per_rank):  # each rank stands in a row group of its own
        assert data["mixture"]["streams"][0]["unit"] % 2 == rank
