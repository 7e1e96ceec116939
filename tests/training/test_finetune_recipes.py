"""The fine-tuning protocol (learning-rate sweep) and the domain-transfer recipe, tiny versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.cli import main as cli_main
from bidirlm.runtime.embedded import embedded_tiny_model
from bidirlm.runtime.embedded.tasks import package_task
from bidirlm.runtime.training.config import load_train_config
from bidirlm.runtime.training.schedules import lr_factor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch: pytest.MonkeyPatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dev(tmp_path: Path) -> Path:
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in package_task("heldout")[::60]))
    return path


def _overrides(tmp_path: Path, steps: int) -> list[str]:
    return [
        f"train.output={tmp_path / 'sweep'}",
        f"train.steps={steps}",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "train.log_every=0",
        "data.batch_size=4",
        "data.max_seq_len=24",
        f"task.dev={_dev(tmp_path)}",
        "task.eval_every=5",
    ]


def test_sweep_cli_reports_best_dev_score_per_model(tmp_path: Path, capsys) -> None:
    tiny = str(embedded_tiny_model())
    args = ["finetune-sweep", str(EXAMPLES / "tiny-seqcls.toml"), "--lrs", "1e-3,3e-3"]
    args += ["--models", f"base={tiny},again={tiny}"]
    for item in _overrides(tmp_path, 10):
        args += ["--set", item]
    assert cli_main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert report["metric"] == "accuracy" and report["lrs"] == [1e-3, 3e-3]
    for name in ("base", "again"):
        entry = report["models"][name]
        assert set(entry["scores"]) == {"0.001", "0.003"}
        assert entry["best_score"] == max(entry["scores"].values())
        for lr in ("0.001", "0.003"):
            run = tmp_path / "sweep" / name / f"lr-{lr}"
            best = json.loads((run / "best.json").read_text())
            assert best["score"] == entry["scores"][lr]
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            # 10% warmup (1 of 10 steps), then linear decay to 0
            want = [
                float(lr) * lr_factor(s, total_steps=10, schedule="linear", warmup_steps=1)
                for s in range(10)
            ]
            assert [r["lr"] for r in rows] == pytest.approx(want)
    # the same model at the same lr trains identically whatever its name
    assert report["models"]["base"]["scores"] == report["models"]["again"]["scores"]
    capsys.readouterr()
    assert cli_main(args) == 0  # finished runs are not redone; the table is printed
    table = capsys.readouterr().out
    assert "base" in table and "again" in table and "0.003" in table
    assert cli_main(["finetune-sweep", str(EXAMPLES / "tiny-mntp.toml"), "--lrs", "1e-3"]) == 1
    assert "the sweep needs one of" in capsys.readouterr().err


def test_domain_transfer_tiny(tmp_path: Path) -> None:
    from bidirlm.recipe.finetune import domain_transfer, format_transfer
    from bidirlm.runtime.training.trainer import train

    causal = load_train_config(
        EXAMPLES / "tiny-causal.toml",
        [
            f"train.output={tmp_path / 'specialist'}",
            "train.steps=2",
            "train.checkpoint_every=0",
            "train.progress_bar=false",
            "train.log_every=0",
            "data.tokens_per_batch=128",
            "data.max_seq_len=32",
        ],
    )
    specialist = train(causal)
    encoder = embedded_tiny_model()
    config = load_train_config(EXAMPLES / "tiny-seqcls.toml", _overrides(tmp_path, 4))
    out = tmp_path / "transfer"
    report = domain_transfer(
        config, encoder=str(encoder), specialist=str(specialist), steps=[2, 4], output=out
    )
    # the merged model is the 50/50 average of the two checkpoints
    a = load_file(encoder / "model.safetensors")
    b = load_file(specialist / "model.safetensors")
    merged = load_file(out / "merged-model" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], 0.5 * a[name] + 0.5 * b[name])
    assert (out / "finetune-merged" / "best.json").is_file()
    assert report == json.loads((out / "domain_transfer.json").read_text())
    for side in ("merged", "unmerged", "specialist"):
        curve = report[side]["curve"]
        assert list(curve) == ["2", "4"]
        assert report[side]["peak"] == max(curve.values())
        assert all(0.0 <= f <= 1.0 for f in report[side]["fraction_of_peak"].values())
        # EMA with alpha 0.4: s_1 = x_1, s_2 = 0.4 x_2 + 0.6 s_1
        smooth = report[side]["ema"]
        assert smooth["2"] == curve["2"]
        assert smooth["4"] == pytest.approx(0.4 * curve["4"] + 0.6 * curve["2"])
    # Bi+Specialist: the specialist itself fine-tuned, made bidirectional
    assert report["specialist"]["model"] == str(specialist) and report["ema_alpha"] == 0.4
    spec_cfg = json.loads((out / "finetune-specialist" / "final" / "config.json").read_text())
    assert spec_cfg["is_causal"] is False
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_transfer(report)
    assert "specialist" in table and "EMA (alpha 0.4)" in table
