"""The demo's pre-trained base: a small causal Qwen3 trained on the embedded stdlib corpora.

`pretrain_base(output, steps=...)` (the command `bidirlm demo --pretrain-base [--output DIR]
[--steps N]`) trains a random Qwen3 (`BASE_SHAPE`: 4 layers, width 128, the embedded BPE
tokenizer's 2048-token vocabulary, seed 0) as a causal language model (the training engine's
`causal` phase) on the *training* packages of the stdlib split only (docstrings and sources,
50/50), and writes a Hugging Face folder: `model.safetensors` (bfloat16, ~2 MB), `config.json`,
the tokenizer and `training_log.json` (the exact command, seed, steps, machine, wall time and the
loss curve). The package ships one such folder (`SHIPPED_BASE`, made by this command on the
project's 2-core CPU) so the demo starts from a base whose representations are worth adapting
instead of re-training one for a minute on every run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bidirlm.runtime import evaluation as ev
from bidirlm.runtime.embedded import embedded_tiny_model, save_random_qwen3
from bidirlm.runtime.training import train, train_config_from_dict

SHIPPED_BASE = Path(__file__).with_name("demo_base")
SEED = 0
DEFAULT_STEPS = 900
# Model shape: 4 layers of width 128 (GQA 4:2, head dim 32), ~0.7M non-embedding parameters
# plus the tied 2048 x 128 embedding: sized so a shared 2-core CPU sees ~3.7M tokens in ~20 min.
BASE_SHAPE: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
TOKENS_PER_BATCH = 4096
MAX_SEQ_LEN = 256
LR = 1e-3
# Each text's first 16k characters: a long document is packed into consecutive batches, so one
# giant file (pydoc_data/topics.py, Unicode tables) would otherwise fill dozens of steps in a row.
MAX_CHARS = 16_000


def _log(msg: str) -> None:
    print(f"[bidirlm demo --pretrain-base] {msg}", file=sys.stderr, flush=True)


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)


def pretrain_base(
    output: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    device: str = "auto",
    work: str | Path | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Pre-train the demo base into `output` (replaced atomically); returns its training log.

    `work`: the training run's folder (default `output` + ".work"; kept, so an interrupted run
    resumes). `device`: "auto" (cuda when present), "cpu" or "cuda".
    """
    from transformers import AutoTokenizer  # optional dependency ([train] extra)

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    output = Path(output).expanduser().resolve()
    if output.exists() and not (output / "training_log.json").is_file():
        # Only a previous base (it has our training log) is ever replaced, never a user folder.
        raise ValueError(f"output {output} exists and is not a pre-trained base: choose another")
    work = Path(work) if work is not None else output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    files = {}
    for kind in ("docs", "code"):
        files[kind] = work / f"train-{kind}.jsonl"
        if not files[kind].is_file():
            texts = [t[:MAX_CHARS] for t in ev.stdlib_texts("train", kind)]
            _write_jsonl(files[kind], texts)
    init = work / "init"
    if not (init / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
        tmp = work / ".init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_random_qwen3(tmp, tokenizer, **BASE_SHAPE)
        tmp.replace(init)
    config = train_config_from_dict(
        {
            "model": str(init),
            "phase": "causal",
            "train": {
                "output": str(work / "run"),
                "steps": steps,
                "seed": SEED,
                "checkpoint_every": max(steps // 4, 1),
                "keep_checkpoints": 1,
                "log_every": 20,
                "device": device,
                "progress_bar": False,
            },
            "optim": {"lr": LR, "schedule": "wsd", "warmup_steps": max(steps // 20, 1)},
            "data": {
                "tokens_per_batch": TOKENS_PER_BATCH,
                "max_seq_len": MAX_SEQ_LEN,
                "sources": [
                    {"path": str(files["docs"]), "weight": 0.5, "name": "stdlib-docs"},
                    {"path": str(files["code"]), "weight": 0.5, "name": "stdlib-code"},
                ],
            },
        }
    )
    log(f"{steps} steps of {TOKENS_PER_BATCH} tokens on {device}; run folder {work / 'run'}")
    final = Path(train(config))
    curve = []
    metrics = work / "run" / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "loss" in row and "step" in row:
                curve.append({"step": row["step"], "loss": round(float(row["loss"]), 4)})
    seconds = round(time.perf_counter() - start, 1)
    n_params = _save_bf16(final, output, log)
    record = {
        "command": f"bidirlm demo --pretrain-base --output {output.name} --steps {steps}"
        + (" --cpu" if device == "cpu" else ""),
        "seed": SEED,
        "steps": steps,
        "tokens_per_step": TOKENS_PER_BATCH,
        "max_seq_len": MAX_SEQ_LEN,
        "lr": LR,
        "schedule": "wsd, 5% warmup, last 20% decay",
        "shape": BASE_SHAPE,
        "parameters": n_params,
        "data": "stdlib training packages (bidirlm.runtime.embedded stdlib_texts('train')), "
        f"docs 50% / code 50%, first {MAX_CHARS} characters of each text",
        "device": device,
        "machine": _machine(device),
        "torch_threads": torch.get_num_threads() if device == "cpu" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": seconds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loss_curve": curve,
    }
    (output / "training_log.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    log(f"done in {seconds:.0f} s; final loss {curve[-1]['loss'] if curve else 'n/a'}: {output}")
    return record


def _save_bf16(final: Path, output: Path, log: Callable[[str], None]) -> int:
    """Copy the trained folder to `output` with bfloat16 weights (atomic replace)."""
    # optional dependency ([train] extra)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.replace(old)
    tmp.replace(output)
    shutil.rmtree(old, ignore_errors=True)
    log(f"{n_params / 1e6:.2f}M parameters saved in bfloat16 to {output}")
    return n_params
