"""`bidirlm check`: passes on bidirectional models, fails (exit 1, one line why) on causal ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bidirlm.cli import main
from bidirlm.integrations.check import check_model
from bidirlm.runtime import load_model
from tests.models.test_models import build_checkpoint


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain transformers (causal) folders and our bidirectional saves of them."""
    root = tmp_path_factory.mktemp("check")
    out = {}
    for kind in ("qwen3-gqa", "gemma3"):
        plain = build_checkpoint(kind, root / f"{kind}-causal")
        bi = root / f"{kind}-bi"
        load_model(plain, bidirectional=True).save_pretrained(bi)
        out[kind], out[f"{kind}-causal"] = bi, plain
    return out


@pytest.mark.parametrize("kind", ["qwen3-gqa", "gemma3"])
def test_bidirectional_models_pass(models, kind: str, capsys) -> None:
    assert main(["check", str(models[kind]), "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:3]] == ["ok", "ok", "ok"]
    assert "eager" in out[1] and "sdpa" in out[1] and "bidirlm" in out[1]
    assert out[-1] == "check: all 3 checks passed"


def test_plain_causal_transformers_folder_fails(models, capsys) -> None:
    assert main(["check", str(models["qwen3-gqa-causal"])]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL bidirectional: the model is causal")
    # backends still agree with each other on the causal model
    assert out[1].startswith("ok   backends")
    assert out[-1].startswith("check: 2 of 3 checks failed")


def test_export_that_lost_bidirectionality_fails(models, tmp_path: Path, capsys) -> None:
    st = tmp_path / "st"
    assert main(["export", str(models["qwen3-gqa"]), str(st), "--max-length", "32"]) == 0
    assert main(["check", str(st)]) == 0  # the exported folder itself passes
    assert "own sentence-transformers form" in capsys.readouterr().out
    cfg = json.loads((st / "config.json").read_text())
    del cfg["is_causal"]  # what a careless re-save does: transformers' default is causal
    (st / "config.json").write_text(json.dumps(cfg))
    assert main(["check", str(st)]) == 1
    assert "FAIL bidirectional: the model is causal" in capsys.readouterr().out


def test_partial_visibility_is_reported() -> None:
    from bidirlm.integrations.check import check_bidirectional

    class Windowed:  # sees only the 4 previous tokens: a (causal) sliding window
        config = type("C", (), {"vocab_size": 100})()

        def parameters(self):
            import torch

            yield torch.zeros(1)

        def __call__(self, ids):
            import torch

            emb = torch.nn.functional.one_hot(ids, 100).float()
            out = torch.zeros_like(emb)
            for i in range(ids.shape[1]):
                out[:, i] = emb[:, max(0, i - 4) : i + 5].sum(1)
            return out

    check = check_bidirectional(Windowed(), length=16)
    assert not check.ok and check.detail.startswith("only 4 of 15 earlier positions")


def test_missing_folder_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["check", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a model folder" in err[0]


def test_check_model_api_lists_checks(models) -> None:
    names = [c.name for c in check_model(models["gemma3"])]
    assert names == ["bidirectional", "backends", "sentence-transformers"]
