"""`bidirlm profile`: a trace the profiler tools open and a time breakdown per op family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import profile, record_function

from bidirlm.cli import main
from bidirlm.kernels import flash_attn_func, infonce_loss, mntp_loss
from bidirlm.runtime.training.profiling import HOST, ORDER, breakdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def test_breakdown_attributes_ops_to_their_family() -> None:
    q = torch.randn(1, 32, 2, 16, requires_grad=True)
    hidden, weight = torch.randn(64, 16, requires_grad=True), torch.randn(100, 16)
    labels = torch.randint(0, 100, (64,))
    with profile() as prof:
        with record_function("bidirlm.train.forward"):
            out = flash_attn_func(q, q, q)
            loss = mntp_loss(hidden, weight, labels) + infonce_loss(hidden[:8], hidden[:16])
            extra = (hidden @ hidden.T).sum()  # a matmul of no op family
        with record_function("bidirlm.train.backward"):
            (out.sum() + loss + extra).backward()
        with record_function("bidirlm.train.optimizer"):
            torch.optim.SGD([q, hidden], lr=0.1).step()
    result = breakdown(prof.events(), "mntp", 1)
    for family in ("attention fwd", "attention bwd", "MNTP loss", "InfoNCE", "optimizer"):
        assert result.cpu_ms.get(family, 0) > 0, family
    assert result.calls["other matmuls"] >= 1
    assert set(result.cpu_ms) <= set(ORDER)
    # every family's time lies inside the window, and together they cover it
    assert sum(result.cpu_ms.values()) >= 0.99 * result.window_ms
    assert result.cpu_ms[HOST] <= result.window_ms


@pytest.mark.parametrize(
    "example, family, dtype",
    [("tiny-mntp.toml", "MNTP loss", "float32"), ("tiny-contrastive.toml", "InfoNCE", "bfloat16")],
)
def test_profile_command_writes_trace_and_table(
    tmp_path: Path, capsys, example: str, family: str, dtype: str
) -> None:
    out = tmp_path / "prof"
    user_output = tmp_path / "user-run"
    argv = ["profile", str(ROOT / "examples" / example), "--steps", "2", "--output", str(out),
            "--set", f"train.dtype={dtype}", "--set", f"train.output={user_output}",
            "--threads", "1"]  # fmt: skip
    if example == "tiny-mntp.toml":
        argv += ["--set", "data.tokens_per_batch=256"]
    else:
        argv += ["--set", "data.batch_size=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| family | CPU ms |" in printed and f"| {family} |" in printed
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for stage in ("bidirlm.train.data", "bidirlm.train.forward", "bidirlm.train.backward",
                  "bidirlm.train.optimizer", "bidirlm.flash_attn"):  # fmt: skip
        assert stage in names
    table = json.loads((out / "breakdown.json").read_text())
    assert table["steps"] == 2 and table["cpu_ms"][family] > 0
    assert table["cpu_ms"]["attention fwd"] > 0 and table["cpu_ms"]["attention bwd"] > 0
    assert (out / "breakdown.md").read_text().startswith("Profile of 2 ")
    assert not user_output.exists()  # the config's own output is never written
    assert [p.name for p in out.iterdir() if p.name.startswith("run-")] == []


def test_profile_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["profile", str(tmp_path / "nope.toml"), "--steps", "1"]) == 1
    assert main(["profile", str(ROOT / "examples" / "tiny-mntp.toml"), "--steps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("bidirlm profile: error:") for line in err)
