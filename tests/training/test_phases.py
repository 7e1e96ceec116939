"""Training phases as registered objects: the table of the six built-in phases, a new phase
written from `PhaseBase` trained end to end (float32 and bf16 on CPU, exact resume), the
README's MLM example, the loop's profiler ranges, and the pieces moved out of the trainer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.runtime.embedded import embedded_tiny_model
from bidirlm.runtime.training import PHASES, PhaseBase, register_phase
from bidirlm.runtime.training import phases as phases_pkg
from bidirlm.runtime.training.config import train_config_from_dict
from bidirlm.runtime.training.data import ListSource, RecordSource, check_sources, pack_texts
from bidirlm.runtime.training.mfu import peak_bf16_flops
from bidirlm.runtime.training.phases import (
    MicroStep,
    MNTPPhase,
    PhaseModule,
    get_phase,
    next_token_labels,
)
from bidirlm.runtime.training.trainer import TrainingInterrupted, train
from tests.test_imports import import_graph

BUILTIN = {
    "causal": "causal",
    "mntp": "mntp",
    "contrastive": "contrastive",
    "multimodal-contrastive": "multimodal_contrastive",
    "sequence-classification": "sequence_classification",
    "token-classification": "token_classification",
}
TRAINING = Path(phases_pkg.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_ops_one_thread(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_registry_holds_the_six_phases_one_module_each() -> None:
    assert list(PHASES)[:6] == list(BUILTIN)
    for name, module in BUILTIN.items():
        phase = PHASES[name]
        assert phase.name == name and phase.__module__.endswith(f".phases.{module}")
        assert (TRAINING / "phases" / f"{module}.py").is_file()
        for member in ("check", "bidirectional", "module", "batches", "loss", "param_groups"):
            assert callable(getattr(phase, member)), (name, member)
    assert not PHASES["causal"].bidirectional(None) and PHASES["mntp"].bidirectional(None)
    with pytest.raises(ValueError, match=r"phase: 'nope' is not one of 'causal', 'mntp'"):
        get_phase("nope")


def test_trainer_is_only_the_loop() -> None:
    text = (TRAINING / "trainer.py").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 500
    names = "mntp|contrastive|causal|sequence-classification|token-classification"
    branch = rf"(==|!=)\s*['\"]({names})['\"]"
    assert not re.search(branch, text)
    assert "TASK_PHASES" not in text


def test_training_imports_no_evaluation() -> None:
    graph = import_graph()
    bad = {
        (m, t)
        for m, targets in graph.items()
        if m.startswith("bidirlm.runtime.training")
        for t in targets
        if t.startswith("bidirlm.runtime.evaluation")
    }
    assert bad == set()


# ------------------------------------------------------------------ a new phase, end to end


class _Documents:
    """Whole documents in order, one per rank per micro-step, tokenized here (the stream)."""

    def __init__(self, source: RecordSource, tokenizer: Any, max_len: int, rank: int, world: int):
        self.source, self.tokenizer, self.max_len = source, tokenizer, max_len
        self.rank, self.world = rank, world
        self.position = 0

    def next_batch(self) -> Any:
        picked = [self.position + self.rank + i * self.world for i in range(2)]
        self.position += 2 * self.world
        texts = [self.source[i % len(self.source)]["text"] for i in picked]
        ids, cu, longest = pack_texts(self.tokenizer, texts, self.max_len)
        return _Batch(ids, cu, longest)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class _Batch:
    def __init__(self, ids: torch.Tensor, cu: torch.Tensor, longest: int) -> None:
        self.input_ids, self.cu_seqlens, self.max_seqlen = ids, cu, longest
        self.num_tokens = int(ids.numel())


class DocumentLMPhase(PhaseBase):
    """Next-token prediction on whole documents (two per micro-batch, cut to max_seq_len),
    only the last layer optimized: every `Phase` member written here."""

    name = "test-document-lm"

    @classmethod
    def check(cls, config, model_path, log) -> list[RecordSource]:
        return check_sources(config.data.sources, fields=("text",), log=log)

    @classmethod
    def bidirectional(cls, config) -> bool:
        return False

    def __init__(self, context, encoder) -> None:
        super().__init__(context, encoder)
        self.steps_seen = 0

    def module(self) -> torch.nn.Module:
        return PhaseModule(self.encoder)

    def batches(self) -> _Documents:
        info = self.context.info
        source: ListSource = self.context.data[0]
        max_len = self.config.data.max_seq_len
        return _Documents(source, self.tokenizer, max_len, info.rank, info.world_size)

    def loss(self, module, batch: _Batch, micro: MicroStep) -> torch.Tensor:
        device = self.context.device
        ids, cu = batch.input_ids.to(device), batch.cu_seqlens.to(device)
        labels = next_token_labels(ids, cu)
        with self.context.amp():
            return module(ids, cu, batch.max_seqlen, labels) * micro.scale

    def param_groups(self, module, weight_decay):
        last = [p for n, p in module.named_parameters() if ".layers.1." in n]
        return [{"params": last, "weight_decay": weight_decay}]

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state) -> None:
        self.steps_seen = int((state or {}).get("steps_seen", 0))

    def after_step(self, run, row) -> None:
        self.steps_seen += 1
        row["steps_seen"] = self.steps_seen


@pytest.fixture
def document_lm():
    register_phase(DocumentLMPhase)
    yield DocumentLMPhase
    del PHASES[DocumentLMPhase.name]


def _config(output: Path, phase: str, **train: Any):
    return train_config_from_dict(
        {
            "model": "embedded:tiny",
            "phase": phase,
            "train": {"output": str(output), "steps": 3, "progress_bar": False, "seed": 0, **train},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "data": {
                "tokens_per_batch": 128,
                "max_seq_len": 32,
                "sources": [{"path": "embedded:python-docs"}],
            },
            "mntp": {"mask_ratio": 0.3},
        }
    )


def _rows(output: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def _steady(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rows]


def test_a_registered_phase_trains_resumes_and_runs_in_bf16(
    document_lm: type, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"phase: 'test-document-lm-2' is not one of .*'test-"):
        _config(tmp_path / "x", "test-document-lm-2")
    whole = tmp_path / "whole"
    train(_config(whole, document_lm.name))
    rows = _rows(whole)
    assert [r["steps_seen"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows)
    # only the last layer trained (the phase's parameter groups)
    before = load_file(embedded_tiny_model() / "model.safetensors")
    after = load_file(whole / "final" / "model.safetensors")
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(".layers.1." in k for k in moved), sorted(moved)[:4]
    # interrupted after one step, then resumed: the same losses and phase state, bitwise
    parts = tmp_path / "parts"
    with pytest.raises(TrainingInterrupted):
        train(_config(parts, document_lm.name), stop_after=1)
    train(_config(parts, document_lm.name))
    assert _steady(_rows(parts)) == _steady(rows)
    # bf16 autocast: finite, and the first loss close to the float32 one
    bf16 = tmp_path / "bf16"
    train(_config(bf16, document_lm.name, dtype="bfloat16", steps=2))
    first = _rows(bf16)[0]["loss"]
    assert math.isfinite(first) and abs(first - rows[0]["loss"]) < 0.02 * rows[0]["loss"]


# ------------------------------------------------------------------ the README's example


class MLMPhase(MNTPPhase):
    """As in the README: a masked token is predicted at its own position."""

    name = "test-mlm"

    def inputs_and_labels(self, batch, micro):
        inputs, labels = super().inputs_and_labels(batch, micro)  # labels[i]: masked token i+1
        own = torch.full_like(labels, -100)
        own[1:] = labels[:-1]  # labels[i]: masked token i
        return inputs, own


def test_readme_mlm_phase_labels_the_masked_positions(tmp_path: Path) -> None:
    register_phase(MLMPhase)
    try:
        output = tmp_path / "mlm"
        seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        real = MLMPhase.inputs_and_labels

        def spy(self, batch, micro):
            inputs, labels = real(self, batch, micro)
            seen.append((batch.input_ids, inputs, labels))
            return inputs, labels

        MLMPhase.inputs_and_labels = spy
        try:
            train(_config(output, "test-mlm", steps=2, dtype="bfloat16"))
        finally:
            MLMPhase.inputs_and_labels = real
        assert all(math.isfinite(r["loss"]) for r in _rows(output))
        for original, inputs, labels in seen:
            trained = labels != -100
            assert trained.sum() > 0
            # every trained position is a masked one, and its label is the token it hides
            assert torch.equal(labels[trained], original[trained])
            assert bool((inputs[trained] != original[trained]).any())
    finally:
        del PHASES[MLMPhase.name]


# ------------------------------------------------------------------ loop pieces


def test_profiler_sees_the_loop_stages(tmp_path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(_config(tmp_path / "p", "causal", steps=1))
    names = {e.name for e in prof.events()}
    stages = ("data", "forward", "backward", "optimizer", "checkpoint")
    assert {f"bidirlm.train.{s}" for s in stages} <= names, sorted(
        n for n in names if "bidirlm" in n
    )


def test_mfu_peaks_by_device_name() -> None:
    assert peak_bf16_flops("AMD Instinct MI250X") == 191.5e12  # one GCD = one torch device
    assert peak_bf16_flops("AMD Instinct MI250") == 181e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("AMD Instinct MI300X") == 1307e12
    assert peak_bf16_flops("a CPU") is None


# ------------------------------------------------------------------ multimodal-contrastive


@pytest.fixture(scope="module")
def omni_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from bidirlm.runtime import compose_omni
    from tests.omni.helpers import image, specialists

    root = tmp_path_factory.mktemp("omni_phase")
    parts = specialists(root)
    omni = compose_omni(parts["text"], parts["vision"], parts["audio"], root / "omni").output
    (root / "media").mkdir()
    words = ["red", "green", "blue", "apple"]
    images, texts = [], []
    for i, w in enumerate(words):
        image(i).save(root / "media" / f"{i}.png")
        images.append({"query": {"image": f"media/{i}.png"}, "positive": f"a {w}"})
        texts.append({"query": f"what is {w}", "positive": f"{w} is a word"})
    for name, rows in (("image", images), ("text", texts)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"omni": omni, "image": root / "image.jsonl", "text": root / "text.jsonl"}


def _contrastive(output: Path, phase: str, model: Path | str, sources: list[Path]):
    return train_config_from_dict(
        {
            "model": str(model),
            "phase": phase,
            "train": {"output": str(output), "steps": 2, "progress_bar": False},
            "optim": {"lr": 1e-3},
            "data": {
                "batch_size": 4,
                "query_max_len": 16,
                "document_max_len": 16,
                "sources": [{"path": str(s)} for s in sources],
            },
        }
    )


def test_multimodal_contrastive_phase(omni_data: dict[str, Path], tmp_path: Path) -> None:
    """Every chunk through the OmniEncoder: on text-only records it gives the contrastive
    phase's losses (same tokens, same model); image records train in bf16 with frozen towers;
    a text-only model is refused before any step."""
    from tests.omni.helpers import bits_equal, tensors

    text = [omni_data["text"]]
    train(_contrastive(tmp_path / "c", "contrastive", omni_data["omni"], text))
    train(_contrastive(tmp_path / "m", "multimodal-contrastive", omni_data["omni"], text))
    plain, omni = (
        [r["loss"] for r in _rows(tmp_path / "c")],
        [r["loss"] for r in _rows(tmp_path / "m")],
    )
    assert omni == pytest.approx(plain, rel=1e-4, abs=1e-5)
    both = [omni_data["image"], omni_data["text"]]
    config = _contrastive(tmp_path / "b", "multimodal-contrastive", omni_data["omni"], both)
    config.train.steps, config.train.dtype = 3, "bfloat16"
    final = train(config)
    assert all(math.isfinite(r["loss"]) for r in _rows(tmp_path / "b"))
    before, after = tensors(omni_data["omni"]), load_file(final / "model.safetensors")
    assert all(bits_equal(after[n], before[n]) for n in before if n.startswith("model.visual."))
    with pytest.raises(ValueError, match=r"phase 'multimodal-contrastive': .* is text-only"):
        train(_contrastive(tmp_path / "t", "multimodal-contrastive", "embedded:tiny", text))
