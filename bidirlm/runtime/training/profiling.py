"""Profile training steps: a Chrome/Perfetto trace and the time per op family.

`profile_training(config, steps, output)` runs `steps` steps of `config` (its own run folder under
`output`, never the config's `train.output`) under `torch.profiler`, writes `output/trace.json`
(open it in Perfetto, chrome://tracing or TensorBoard's profiler plugin) and returns a
`Breakdown`: self time per family, each event counted once in the first family that claims it:

1. the public ops, with everything they call: attention forward / backward
   (`bidirlm::flash_attn_fwd|bwd`, range `bidirlm.flash_attn`), MNTP loss (`bidirlm::mntp_loss_*`,
   `bidirlm.mntp_loss`), InfoNCE (`bidirlm::infonce_*`, `bidirlm.infonce_loss`);
2. trainer stages that are not model compute: data loading (`bidirlm.train.data*`), the
   optimizer (`bidirlm.train.optim*`, `Optimizer.step`, `zero_grad`), checkpoints;
3. by the op's own name: other matmuls (`aten::mm|addmm|bmm|matmul|linear|...`), norms;
4. everything else under forward/backward ("other compute"), and host gaps: time inside the
   profiled steps not covered by any operator (Python between ops, the trainer's own work).

Times are CPU self times (the host's view; on a GPU the device time of the kernels each op
launched is reported beside it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bidirlm.runtime.training.trainer import train

# op families: an event or any of its ancestors matching the pattern belongs to the family
OP_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention bwd", re.compile(r"bidirlm::flash_attn_bwd|FlashAttnFunctionBackward")),
    ("attention fwd", re.compile(r"bidirlm::flash_attn_fwd|^bidirlm\.flash_attn")),
    ("MNTP loss", re.compile(r"bidirlm::mntp|^bidirlm\.mntp_loss|MNTPLoss")),
    ("InfoNCE", re.compile(r"bidirlm::infonce|^bidirlm\.infonce|InfoNCE")),
)
STAGE_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("data loading", re.compile(r"^bidirlm\.train\.(data|batch)")),
    ("optimizer", re.compile(r"^bidirlm\.train\.optim|^Optimizer\.|zero_grad")),
    ("checkpoint", re.compile(r"^bidirlm\.train\.(checkpoint|save)")),
)
OWN_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "other matmuls",
        re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation)$"),
    ),
    ("norms", re.compile(r"^aten::(.*norm.*|rsqrt)$|RMSNorm|LayerNorm")),
)
HOST = "host gaps"
OTHER = "other compute"
ORDER = [n for n, _ in OP_FAMILIES + STAGE_FAMILIES + OWN_FAMILIES] + [OTHER, HOST]
STEP_RANGE = re.compile(r"^bidirlm\.train\.")


@dataclass
class Breakdown:
    """Time per family (ms), the profiled window and the run's facts."""

    phase: str
    steps: int
    window_ms: float
    cpu_ms: dict[str, float] = field(default_factory=dict)
    device_ms: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        """A markdown table: family, CPU ms, share of the window, device ms (GPU runs), calls."""
        gpu = any(self.device_ms.values())
        head = "| family | CPU ms | share | " + ("device ms | " if gpu else "") + "ops |"
        lines = [
            f"Profile of {self.steps} `{self.phase}` step(s): {self.window_ms:.1f} ms in all",
            "",
            head,
            "|---|---:|---:|" + ("---:|" if gpu else "") + "---:|",
        ]
        for name in ORDER:
            ms = self.cpu_ms.get(name, 0.0)
            share = 100 * ms / self.window_ms if self.window_ms else 0.0
            dev = f" {self.device_ms.get(name, 0.0):.2f} |" if gpu else ""
            lines.append(f"| {name} | {ms:.2f} | {share:.1f}% |{dev} {self.calls.get(name, 0)} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "steps": self.steps,
            "window_ms": self.window_ms,
            "cpu_ms": self.cpu_ms,
            "device_ms": self.device_ms,
            "calls": self.calls,
        }


def _match(name: str, families: tuple[tuple[str, re.Pattern[str]], ...]) -> str | None:
    for family, pattern in families:
        if pattern.search(name):
            return family
    return None


def _family(event: Any) -> str:
    chain = []
    node = event
    while node is not None:
        chain.append(node.name)
        node = node.cpu_parent
    for families in (OP_FAMILIES, STAGE_FAMILIES):
        for name in chain:
            found = _match(name, families)
            if found:
                return found
    if STEP_RANGE.search(event.name):  # a trainer range's own (self) time: Python, no op
        return HOST
    return _match(event.name, OWN_FAMILIES) or OTHER


def breakdown(events: Any, phase: str, steps: int) -> Breakdown:
    """Attribute every profiled event's self time to one family (see the module docstring).

    The window runs from the first trainer range (`bidirlm.train.*`) to the end of the last one:
    loading the model and building the data streams before the first step are left out."""
    cpu = torch.autograd.DeviceType.CPU
    events = [
        e
        for e in events
        if getattr(e, "time_range", None) is not None and getattr(e, "device_type", cpu) == cpu
    ]
    ranges = [e for e in events if STEP_RANGE.search(e.name)] or events
    if not ranges:
        return Breakdown(phase, steps, 0.0)
    start = min(e.time_range.start for e in ranges)
    end = max(e.time_range.end for e in ranges)
    out = Breakdown(phase, steps, (end - start) / 1e3)
    covered = 0.0
    for e in events:
        if e.time_range.start < start or e.time_range.end > end:
            continue
        family = _family(e)
        ms = e.self_cpu_time_total / 1e3
        out.cpu_ms[family] = out.cpu_ms.get(family, 0.0) + ms
        out.calls[family] = out.calls.get(family, 0) + 1
        dev = getattr(e, "self_device_time_total", 0.0) or 0.0
        out.device_ms[family] = out.device_ms.get(family, 0.0) + dev / 1e3
        covered += ms
    # the window not covered by any event's self time (threads may overlap: never below 0)
    out.cpu_ms[HOST] = out.cpu_ms.get(HOST, 0.0) + max(0.0, out.window_ms - covered)
    return out


def profile_training(config: Any, steps: int, output: str | Path) -> Breakdown:
    """Run `steps` steps of `config` under the torch profiler; write trace and breakdown.

    `config` is a `TrainConfig`; its `train.steps` and `train.output` are replaced (the run
    writes to a fresh `output/run-*` folder, removed afterwards, never the config's own output).
    Writes `trace.json`, `breakdown.md` and `breakdown.json` into `output`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=output))  # ours: removed below
    section = dataclasses.replace(
        config.train, steps=steps, output=str(run_dir), checkpoint_every=0
    )
    config = dataclasses.replace(config, train=section)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=activities) as prof:
            train(config)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    trace = output / "trace.json"
    tmp = output / ".trace.json.tmp"
    prof.export_chrome_trace(str(tmp))
    tmp.replace(trace)
    result = breakdown(prof.events(), str(config.phase), steps)
    _write(output / "breakdown.md", result.table())
    _write(output / "breakdown.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
