"""`bidirlm export`: a sentence-transformers folder that loads offline and gives our embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bidirlm.cli import main
from bidirlm.runtime.models import load_model
from tests.models.test_models import CORPUS, build_checkpoint

TEXTS = [CORPUS[2], "short one", CORPUS[4], CORPUS[0] + " " + CORPUS[5], "x"]


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-src")
    return {kind: build_checkpoint(kind, root / kind) for kind in ("qwen3-gqa", "gemma3")}


@pytest.mark.parametrize(
    "kind, pooling, normalize",
    [("gemma3", "mean", False), ("qwen3-gqa", "last", True), ("qwen3-gqa", "first", False)],
)
def test_sentence_transformers_gives_our_embeddings(
    ckpts, tmp_path: Path, kind: str, pooling: str, normalize: bool
) -> None:
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st"
    argv = ["export", str(ckpts[kind]), str(out), "--pooling", pooling, "--max-length", "16"]
    assert main([*argv, *(["--normalize"] if normalize else [])]) == 0
    raw = json.loads((out / "config.json").read_text())
    if kind == "gemma3":
        assert raw["use_bidirectional_attention"] is True
    else:
        assert raw["is_causal"] is False
    ours = load_model(ckpts[kind]).encode(
        TEXTS, pooling=pooling, normalize=normalize, max_length=16, batch_size=2
    )
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    theirs = st.encode(TEXTS, batch_size=8, convert_to_tensor=True)  # one padded batch
    torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=2e-5)
    if normalize:
        torch.testing.assert_close(theirs.norm(dim=-1), torch.ones(len(TEXTS)))
    # the causal model gives different embeddings: the export really is bidirectional
    causal = load_model(ckpts[kind], bidirectional=False).encode(TEXTS, pooling=pooling)
    assert not torch.allclose(causal, ours, atol=1e-3)


def test_export_errors_are_one_line(ckpts, tmp_path: Path, capsys) -> None:
    no_tok = tmp_path / "no-tokenizer"
    load_model(ckpts["qwen3-gqa"]).save_pretrained(no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    assert main(["export", str(no_tok), str(tmp_path / "a")]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "b")]) == 1
    assert "no such folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["export", str(ckpts["qwen3-gqa"]), str(busy)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (busy / "keep.txt").exists()
    with pytest.raises(SystemExit):
        main(["export", str(ckpts["qwen3-gqa"]), str(tmp_path / "c"), "--pooling", "max"])
