"""The fine-tuning phases on two gloo processes give the losses of one process on the same
global batch (2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches), under DDP
(sequence-classification) and FSDP2 (token-classification), with dev evaluation, `best/` and
`final/` written once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from bidirlm.runtime.embedded.tasks import package_task, token_task
from bidirlm.runtime.training.config import load_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUNS = [("seqcls", "ddp"), ("tokcls", "fsdp")]


def _config(name: str, output: Path, dev: Path, *overrides: str):
    base = [
        f"train.output={output}",
        "train.steps=2",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "train.log_every=0",
        "data.batch_size=4",
        "data.max_seq_len=24",
        "task.eval_every=1",
        f"task.dev={dev}",
        "task.dropout=0.0",
    ]
    return load_train_config(EXAMPLES / f"tiny-{name}.toml", [*base, *overrides])


def _dev_files(root: Path) -> dict[str, Path]:
    out = {}
    for name, rows in (("seqcls", package_task("heldout")), ("tokcls", token_task("heldout"))):
        path = root / f"{name}-dev.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[::40]))
        out[name] = path
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, root: str, ports: list[int]) -> None:
    os.environ["BIDIRLM_KERNELS"] = "torch"
    torch.set_num_threads(1)
    from bidirlm.runtime.training.trainer import train

    devs = {name: Path(root) / f"{name}-dev.jsonl" for name, _ in RUNS}
    for (name, strategy), port in zip(RUNS, ports):
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        out = Path(root) / f"{name}-2"
        train(_config(name, out, devs[name], f"distributed.strategy={strategy}"))


def _rows(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devs = _dev_files(tmp_path)
    ports = [_free_port() for _ in RUNS]
    mp.spawn(_worker, args=(2, str(tmp_path), ports), nprocs=2, join=True)
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    from bidirlm.runtime.training.trainer import train

    try:
        for name, _ in RUNS:
            one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
            train(_config(name, one, devs[name], "train.grad_accum=2"))
            rows1, rows2 = _rows(one), _rows(two)
            torch.testing.assert_close(
                torch.tensor([r["loss"] for r in rows2]),
                torch.tensor([r["loss"] for r in rows1]),
                rtol=1e-5,
                atol=1e-5,
            )
            for r1, r2 in zip(rows1, rows2):
                assert r2["dev_score"] == pytest.approx(r1["dev_score"], abs=1e-6), name
            for folder in ("final", "best"):
                w1 = load_file(one / folder / "model.safetensors")
                w2 = load_file(two / folder / "model.safetensors")
                assert w1.keys() == w2.keys() and "score.weight" in w2, (name, folder)
                for key in w1:
                    torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
