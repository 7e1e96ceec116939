"""The MTEB adapter on mteb's offline mock tasks (skipped where mteb is not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb", reason="mteb is an optional dependency")

from bidirlm.integrations.mteb import MTEBEncoder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_path() -> Path:
    from bidirlm.runtime.embedded import embedded_tiny_model

    return embedded_tiny_model()


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whole-model forwards run the torch reference kernels: the Triton interpreter is too slow.
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_mock_tasks_run_and_score(tiny_model_path: Path) -> None:
    from mteb.mocks.mock_tasks.classification import MockClassificationTask
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.mocks.mock_tasks.sts import MockSTSTask

    model = MTEBEncoder(tiny_model_path, max_length=64, batch_size=8)
    tasks = [MockRetrievalTask(), MockSTSTask(), MockClassificationTask()]
    results = mteb.evaluate(model, tasks, cache=None, raise_error=True, show_progress_bar=False)
    by_name = {r.task_name: r for r in results.task_results}
    assert set(by_name) == {t.metadata.name for t in tasks}
    for result in by_name.values():
        score = result.get_score()
        assert np.isfinite(score), result.task_name
    assert model.mteb_model_meta.embed_dim == 64
    assert model.mteb_model_meta.similarity_fn_name == "cosine"


def test_encode_matches_encoder_and_applies_prompts(tiny_model_path: Path) -> None:
    from mteb.types import PromptType

    model = MTEBEncoder(
        tiny_model_path,
        max_length=32,
        prompts={"query": "Q: ", "MockSTSTask": "S: ", "Retrieval-document": "D: "},
    )
    meta = type("Meta", (), {"name": "MockRetrievalTask", "type": "Retrieval"})()
    batches = [{"text": ["first text", "second"]}, {"text": ["third one"]}]
    out = model.encode(
        batches, task_metadata=meta, hf_split="test", hf_subset="default",
        prompt_type=PromptType.query,
    )  # fmt: skip
    expected = model.model.encode(
        ["Q: first text", "Q: second", "Q: third one"], pooling="mean", normalize=True,
        max_length=32,
    )  # fmt: skip
    assert out.dtype == np.float32 and out.shape == (3, 64)
    torch.testing.assert_close(torch.from_numpy(out), expected)
    # mteb's priority: task-side, task, type-side, type, side.
    assert model.prompt_for("MockRetrievalTask", "Retrieval", PromptType.document) == "D: "
    assert model.prompt_for("MockSTSTask", "STS", PromptType.query) == "S: "
    assert model.prompt_for("Other", "STS", None) == ""
    sims = model.similarity(out, out)
    torch.testing.assert_close(torch.diagonal(sims), torch.ones(3), atol=1e-5, rtol=0)
    pair = model.similarity_pairwise(out, out[::-1].copy())
    assert pair.shape == (3,)


def test_bad_arguments(tiny_model_path: Path) -> None:
    with pytest.raises(ValueError, match="pooling"):
        MTEBEncoder(tiny_model_path, pooling="max")
    with pytest.raises(TypeError, match="Encoder"):
        MTEBEncoder(42)
    model = MTEBEncoder(tiny_model_path)
    meta = type("Meta", (), {"name": "ImageTask", "type": "Any2AnyRetrieval"})()
    with pytest.raises(ValueError, match="text only"):
        model.encode([{"image": [1]}], task_metadata=meta, hf_split="t", hf_subset="d")
