"""Cross-modal retrieval metrics (bidirlm eval on image/audio-text JSON Lines) and the
sentence-transformers export of an omni model's text path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bidirlm.runtime import compose_omni, load_model
from bidirlm.runtime.evaluation.crossmodal import evaluate_crossmodal, is_crossmodal_task
from bidirlm.runtime.models.media import write_wav
from tests.omni.helpers import image, specialists, tone


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("omni_eval")
    parts = specialists(root)
    omni = compose_omni(parts["text"], parts["vision"], parts["audio"], root / "omni").output
    (root / "m").mkdir()
    lines = []
    for i in range(6):
        image(10 + i).save(root / "m" / f"{i}.png")
        write_wav(root / "m" / f"{i}.wav", tone(150 + 120 * i)["array"], 16000)
        lines.append({"image": f"m/{i}.png", "text": f"picture number {i}"})
        lines.append({"audio": f"m/{i}.wav", "text": f"sound number {i}"})
    task = root / "pairs.jsonl"
    task.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"omni": omni, "task": task, "root": root}


def _manual(q: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
    """recall@1 and nDCG@10 from a plain similarity matrix (one relevant item per query)."""
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
    ranks = (sims > sims.diag()[:, None]).sum(1)  # 0-based rank of the relevant item
    ndcg = torch.where(ranks < 10, 1 / torch.log2(ranks.double() + 2), torch.zeros(()))
    return {"recall@1": float((ranks == 0).double().mean()), "ndcg@10": float(ndcg.mean())}


def test_crossmodal_metrics_match_manual_computation(setup) -> None:
    model = load_model(setup["omni"])
    assert is_crossmodal_task(setup["task"])
    metrics = evaluate_crossmodal(model, setup["task"])
    assert set(metrics) == {"task", "image->text", "text->image", "audio->text"}
    root = setup["root"]
    imgs = model.encode([root / "m" / f"{i}.png" for i in range(6)])
    auds = model.encode([root / "m" / f"{i}.wav" for i in range(6)])
    caps = model.encode([f"picture number {i}" for i in range(6)])
    sounds = model.encode([f"sound number {i}" for i in range(6)])
    for key, (q, d) in {
        "image->text": (imgs, caps),
        "text->image": (caps, imgs),
        "audio->text": (auds, sounds),
    }.items():
        ref = _manual(q, d)
        got = metrics[key]
        assert got["recall@1"] == pytest.approx(ref["recall@1"]), key
        assert got["ndcg@10"] == pytest.approx(ref["ndcg@10"]), key
        assert got["recall@10"] == 1.0 and got["num_queries"] == 6
        assert {"recall@5", "mrr@10"} <= set(got)


def test_eval_command_and_errors(setup, tmp_path: Path, capsys) -> None:
    from bidirlm.cli import main

    assert main(["eval", str(setup["omni"]), "--task", str(setup["task"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image->text"]["num_queries"] == 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "text": "x"}\n')
    assert main(["eval", str(setup["omni"]), "--task", str(bad)]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "embedded:tiny", "--task", str(setup["task"])]) == 1


def test_sentence_transformers_export_of_text_path(setup, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from bidirlm.integrations.sentence_transformers import export_sentence_transformers

    export_sentence_transformers(setup["omni"], tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    texts = ["def f(): pass", "import os"]
    model = load_model(setup["omni"])
    ours = model.encode(texts)
    theirs = torch.as_tensor(st.encode(texts))
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=2e-3)


def test_mteb_adapter_takes_images_and_audio(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    mteb = pytest.importorskip("mteb", reason="mteb is an optional dependency")
    from mteb.mocks.mock_tasks.classification import MockImageClassificationTask

    from bidirlm.integrations.mteb import MTEBEncoder

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = MTEBEncoder(setup["omni"], batch_size=4)
    assert set(model.mteb_model_meta.modalities) == {"text", "image", "audio"}
    task = MockImageClassificationTask()
    results = mteb.evaluate(model, [task], cache=None, raise_error=True, show_progress_bar=False)
    (result,) = results.task_results
    assert result.task_name == task.metadata.name and 0.0 <= result.get_score() <= 1.0
    # audio batches as mteb passes them (its audio mock tasks need torchcodec to build): the
    # same vectors as encode on the items, normalized
    clips = [tone(300, rate=8000), tone(500)]
    meta = task.metadata
    got = model.encode([{"audio": clips}], task_metadata=meta, hf_split="test", hf_subset="default")
    ref = model.model.encode(clips, normalize=True)
    torch.testing.assert_close(torch.as_tensor(got), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one per batch"):
        model.encode(
            [{"audio": clips, "text": ["a", "b"]}],
            task_metadata=meta,
            hf_split="test",
            hf_subset="default",
        )
