"""`bidirlm export`: a sentence-transformers folder that loads offline and gives our embeddings."""

from __future__ import annotations

import json
import shutil
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


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_force_never_deletes_the_input_or_the_working_directory(
    ckpts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # `export run/final run --force` used to rmtree the run, its own input included
    run = tmp_path / "run"
    shutil.copytree(ckpts["qwen3-gqa"], run / "final")
    (run / "metrics.jsonl").write_text("{}\n")
    before = _tree(run)
    assert main(["export", str(run / "final"), str(run), "--force"]) == 1
    assert "contains the input" in capsys.readouterr().err
    assert main(["export", str(run / "final"), str(run / "final"), "--force"]) == 1
    assert "is the input" in capsys.readouterr().err
    # `cd a/b && bidirlm export M .. --force` used to rmtree a/
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in ("..", ".", str(tmp_path)):
        assert main(["export", str(run / "final"), out, "--force"]) == 1
        assert "working directory" in capsys.readouterr().err
    assert _tree(run) == before and (tmp_path / "a" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "run"]  # no temporary left


def test_force_replaces_only_once_the_new_export_is_complete(
    ckpts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st"
    argv = ["export", str(ckpts["qwen3-gqa"]), str(out), "--max-length", "16"]
    assert main(argv) == 0
    before = _tree(out)
    real_save = SentenceTransformer.save

    def half_then_fail(self, path, *args, **kwargs):
        (Path(path) / "config.json").write_text("{}")  # a partial write, then the disk fills up
        raise OSError(28, "No space left on device", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(SentenceTransformer, "save", half_then_fail)
    assert main([*argv, "--force", "--pooling", "last"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' progress bars)
    assert err == f"bidirlm export: error: cannot write {out}: No space left on device"
    assert _tree(out) == before  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]  # and nothing half-written
    monkeypatch.setattr(SentenceTransformer, "save", real_save)
    assert main([*argv, "--force", "--pooling", "last"]) == 0
    modules = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert modules["pooling_mode"] == "lasttoken"  # the new export replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(ckpts["qwen3-gqa"]), str(empty)]) == 0  # an empty folder is fine
    assert (empty / "config.json").is_file()


def test_real_qwen3_shape_exports_with_our_embeddings(tmp_path: Path) -> None:
    """The same check on a tiny checkpoint built from Qwen3-0.6B's published config (sizes
    shrunk; rope_theta 1e6, tied embeddings, the real 151936-token vocabulary kept), in bf16."""
    from sentence_transformers import SentenceTransformer

    from tests.real_models import build_text, real_config, shrink

    src = build_text(tmp_path / "q06", shrink(real_config("qwen3-0.6b")), dtype=torch.bfloat16)
    out = tmp_path / "st"
    assert main(["export", str(src), str(out), "--max-length", "16", "--dtype", "float32"]) == 0
    ours = load_model(src, dtype=torch.float32).encode(TEXTS, max_length=16, batch_size=2)
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    theirs = st.encode(TEXTS, batch_size=8, convert_to_tensor=True)
    torch.testing.assert_close(theirs.float(), ours, rtol=0, atol=2e-5)
    raw = json.loads((out / "config.json").read_text())
    assert raw["is_causal"] is False and raw["tie_word_embeddings"] is True
    assert raw["vocab_size"] == 151936
