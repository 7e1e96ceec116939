"""Two gloo processes on the CPU give the same losses as one process on the same global batch.

LM phases: 2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches (the data stream
is global, micro-batch j goes to rank j % world). Contrastive: 2 ranks x 2 pairs with documents
gathered across ranks == 1 process x 4 pairs.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bidirlm.runtime.training.config import load_train_config

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
