"""`bidirlm eval MODEL --task FILE` and `bidirlm predict` on fine-tuned classifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bidirlm.cli import main as cli_main
from bidirlm.runtime.training.config import load_train_config
from bidirlm.runtime.training.trainer import train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _train(tmp_path: Path, example: str, data: Path) -> Path:
    config = load_train_config(
        EXAMPLES / example,
        [
            f"train.output={tmp_path / 'run'}",
            "train.steps=3",
            "train.checkpoint_every=0",
            "train.progress_bar=false",
            "train.log_every=0",
            "data.batch_size=4",
            f"data.sources.0.path={data}",
            f"task.dev={data}",
        ],
    )
    return train(config)


def test_eval_and_predict_sequence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"text": f"{w} {w} text", "label": w} for w in ("red", "green", "blue") * 4]
    data = _write(tmp_path / "data.jsonl", rows)
    final = _train(tmp_path, "tiny-seqcls.toml", data)
    capsys.readouterr()
    assert cli_main(["eval", str(final), "--task", str(data), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 12 and 0.0 <= metrics["accuracy"] <= 1.0 and "macro_f1" in metrics
    # the same numbers as the last dev evaluation of the run (same model, same file)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(last["dev"]["accuracy"])
    unlabelled = _write(tmp_path / "in.jsonl", [{"text": r["text"]} for r in rows])
    out = tmp_path / "out" / "pred.jsonl"
    code = cli_main(["predict", str(final), "--input", str(unlabelled), "--output", str(out)])
    assert code == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(preds) == 12 and {p["prediction"] for p in preds} <= {"red", "green", "blue"}
    assert all(1 / 3 - 1e-6 <= p["score"] <= 1.0 and p["text"] for p in preds)
    correct = sum(p["prediction"] == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert correct == pytest.approx(metrics["accuracy"])
    # errors: one line, exit 1
    assert cli_main(["eval", str(final)]) == 1
    assert "needs --task FILE" in capsys.readouterr().err
    assert cli_main(["predict", str(final), "--input", str(out), "--output", str(out)]) == 1
    bad = _write(tmp_path / "bad.jsonl", [{"text": "x", "label": "purple"}])
    assert cli_main(["eval", str(final), "--task", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1: unknown label 'purple'" in err and err.count("\n") == 2


def test_predict_tokens_and_plain_model_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    rows = [{"tokens": ["x", "=", "1"], "tags": ["NAME", "OP", "NUMBER"]}] * 6
    data = _write(tmp_path / "tok.jsonl", rows)
    final = _train(tmp_path, "tiny-tokcls.toml", data)
    inp = _write(tmp_path / "in.jsonl", [{"tokens": ["y", "+", "22", "z"]}])
    out = tmp_path / "pred.jsonl"
    assert cli_main(["predict", str(final), "--input", str(inp), "--output", str(out)]) == 0
    (pred,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(pred["predicted_tags"]) == 4 and len(pred["scores"]) == 4
    assert set(pred["predicted_tags"]) <= {"NAME", "OP", "NUMBER"}
    from bidirlm.runtime.embedded import embedded_tiny_model

    capsys.readouterr()
    plain = str(embedded_tiny_model())
    assert cli_main(["predict", plain, "--input", str(inp), "--output", str(out)]) == 1
    assert "not a fine-tuned classifier" in capsys.readouterr().err


def test_python_api_takes_in_memory_records(tmp_path: Path) -> None:
    from bidirlm.runtime.evaluation.classify import evaluate_classifier, predict_records
    from bidirlm.runtime.models import load_model

    rows = [{"text": f"{w} {w}", "label": w} for w in ("up", "down") * 3]
    final = _train(tmp_path, "tiny-seqcls.toml", _write(tmp_path / "d.jsonl", rows))
    model = load_model(final)
    metrics = evaluate_classifier(model, rows)
    preds = predict_records(model, [{"text": r["text"]} for r in rows])
    hits = sum(p["prediction"] == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert metrics["task"] == "records" and metrics["accuracy"] == pytest.approx(hits)
    with pytest.raises(ValueError, match="records:1: unknown label 'sideways'"):
        evaluate_classifier(model, [{"text": "x", "label": "sideways"}])
