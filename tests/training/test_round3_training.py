"""Issue 24's training items: non-finite regression labels refused with file and line and never
a NaN in JSON (4); a full disk while a checkpoint is written is one line, leaves no temporary
and the run resumes (11); fine-tuning prints the dev score and a final best line, and `bidirlm
eval` on `best/` uses the length the model was trained with (15); a bf16 base comes out of the
pipeline as bf16 (18)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bidirlm.cli import main
from bidirlm.recipe.pipeline import run_pipeline
from bidirlm.runtime import load_model
from bidirlm.runtime.embedded import embedded_tiny_model
from bidirlm.runtime.embedded.tasks import package_task
from bidirlm.runtime.training import checkpoints as cio
from bidirlm.runtime.training.task_config import TaskConfig
from bidirlm.runtime.training.task_data import check_task
from bidirlm.runtime.training.task_metrics import json_text

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _torch_ops_one_thread(monkeypatch: pytest.MonkeyPatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (what strict JSON readers do)."""

    def refuse(token: str):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _write(path: Path, rows: list[dict]) -> Path:
    # json.dumps writes float("nan") as the bare token NaN, as a careless producer would
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ item 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [0.5, float("-inf")]])
def test_non_finite_regression_label_names_file_and_line(tmp_path: Path, bad) -> None:
    width = 2 if isinstance(bad, list) else 1
    good = [0.1, 0.2] if width == 2 else 0.3
    data = _write(
        tmp_path / "train.jsonl",
        [{"text": "one", "label": good}, {"text": "two", "label": bad}],
    )
    task = TaskConfig(problem_type="regression")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: regression label .* is not finite"):
        check_task("sequence", task, [str(data)])


def test_json_writer_never_writes_nan() -> None:
    text = json_text({"score": float("nan"), "dev": {"pearson": float("inf"), "n": 3}})
    assert _strict(text) == {"score": None, "dev": {"pearson": None, "n": 3}}


def test_pipeline_records_write_a_nan_loss_as_null(tmp_path: Path) -> None:
    from bidirlm.recipe.pipeline import _write_json

    _write_json(tmp_path / "phase.json", {"result": {"loss": float("nan"), "step": 3}})
    assert _strict((tmp_path / "phase.json").read_text()) == {"result": {"loss": None, "step": 3}}


def _seqcls(output: Path, *extra: str) -> list[str]:
    base = [
        str(EXAMPLES / "tiny-seqcls.toml"),
        "--set",
        f"train.output={output}",
        "--set",
        "train.progress_bar=false",
        "--set",
        "train.log_every=0",
    ]
    for item in extra:
        base += ["--set", item]
    return ["train", *base]


def test_nan_dev_metric_is_null_in_best_json_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bidirlm.runtime.training.phases import finetune

    def nan_scores(*args, **kwargs):
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 4}

    monkeypatch.setattr(finetune, "score_examples", nan_scores)
    out = tmp_path / "run"
    dev = _write(tmp_path / "dev.jsonl", package_task("heldout")[:8])
    args = _seqcls(out, "train.steps=2", "train.checkpoint_every=0", f"task.dev={dev}")
    assert main([*args, "--set", "task.eval_every=1"]) == 0
    best = _strict((out / "best.json").read_text())
    assert best["score"] is None and best["dev"]["accuracy"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict(line)


def test_a_finite_score_beats_a_first_nan_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bidirlm.runtime.training.phases import finetune

    scores = iter([float("nan"), 0.25, 0.125])

    def scored(*args, **kwargs):
        value = next(scores)
        return {"accuracy": value, "macro_f1": value, "n": 4}

    monkeypatch.setattr(finetune, "score_examples", scored)
    out = tmp_path / "run"
    dev = _write(tmp_path / "dev.jsonl", package_task("heldout")[:8])
    args = _seqcls(out, "train.steps=3", "train.checkpoint_every=0", f"task.dev={dev}")
    assert main([*args, "--set", "task.eval_every=1"]) == 0
    best = _strict((out / "best.json").read_text())
    assert (best["step"], best["score"]) == (2, 0.25)


# ------------------------------------------------------------------ item 11


def test_disk_full_while_checkpointing_is_one_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    straight = tmp_path / "straight"
    common = ("train.steps=4", "train.checkpoint_every=1", "task.dev=")
    assert main(_seqcls(straight, *common)) == 0
    out = tmp_path / "run"
    real = cio.save_file

    def full_disk(tensors, filename, metadata=None):
        if ".step-00000003.tmp" in str(filename):
            Path(filename).write_bytes(b"partial")  # some bytes made it before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cio, "save_file", full_disk)
    capsys.readouterr()
    assert main(_seqcls(out, *common)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and "step-00000003" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert [s for s, _ in cio.list_checkpoints(out)] == [1, 2]
    monkeypatch.setattr(cio, "save_file", real)  # space freed: the same command resumes
    assert main(_seqcls(out, *common)) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = (
        load_file(straight / "final" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ item 15


def test_dev_score_lines_and_eval_uses_the_trained_length(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    dev = _write(tmp_path / "dev.jsonl", package_task("heldout")[::6])
    args = _seqcls(out, "train.steps=4", "train.checkpoint_every=0", f"task.dev={dev}",
                   "task.eval_every=2", "data.max_seq_len=12")  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "step 2/4 dev accuracy " in err and "step 4/4 dev accuracy " in err
    best = json.loads((out / "best.json").read_text())
    assert best["max_seq_len"] == 12
    assert f"best accuracy {best['score']:.4f} at step {best['step']}" in err.splitlines()[-2]
    metrics = tmp_path / "eval.json"
    assert main(["eval", str(out / "best"), "--task", str(dev), "--output", str(metrics)]) == 0
    got = json.loads(metrics.read_text())
    assert got["max_length"] == 12
    assert got["accuracy"] == pytest.approx(best["score"])
    # an explicit --max-length still wins; a folder outside a run keeps the 512 default
    assert main(["eval", str(out / "best"), "--task", str(dev), "--max-length", "20",
                 "--output", str(metrics)]) == 0  # fmt: skip
    assert json.loads(metrics.read_text())["max_length"] == 20
    copy = tmp_path / "copied"
    (out / "best").rename(copy)
    assert main(["eval", str(copy), "--task", str(dev), "--output", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["max_length"] == 512


# ------------------------------------------------------------------ item 18


def _dtypes(folder: Path) -> set[torch.dtype]:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            out |= {fh.get_tensor(k).dtype for k in fh.keys()}
    return out


def test_bf16_base_comes_out_of_the_pipeline_as_bf16(tmp_path: Path) -> None:
    base = tmp_path / "base-bf16"
    load_model(embedded_tiny_model(), dtype=torch.bfloat16, bidirectional=False).save_pretrained(
        base
    )
    assert _dtypes(base) == {torch.bfloat16}
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f"""
[recipe]
name = "bf16"
base = "{base}"
output = "{tmp_path / "run"}"
phases = ["mntp", "merge"]
[mntp]
model = "@base"
phase = "mntp"
[mntp.train]
steps = 2
progress_bar = false
[mntp.data]
batch_size = 2
max_seq_len = 16
[[mntp.data.sources]]
path = "embedded:python-docs"
[merge]
kind = "merge"
models = ["@mntp", "@base"]
weights = [0.5, 0.5]
"""
    )
    run_pipeline(recipe, log=lambda _m: None)
    for folder in (tmp_path / "run" / "mntp" / "final", tmp_path / "run" / "merge" / "model"):
        assert _dtypes(folder) == {torch.bfloat16}, folder
        config = json.loads((folder / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
        assert load_model(folder).dtype == torch.bfloat16
    # asked: recipe.dtype = float32 writes float32
    run_pipeline(recipe, ["recipe.dtype=float32", f"recipe.output={tmp_path / 'run32'}"],
                 log=lambda _m: None)  # fmt: skip
    assert _dtypes(tmp_path / "run32" / "merge" / "model") == {torch.float32}
