"""The fine-tuning phases: they learn the embedded tasks, resume exactly, run in bf16, stop early,
reject bad data in one line, and save folders that transformers and `load_model` read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm.runtime.embedded.tasks import PACKAGES, package_task, token_task
from bidirlm.runtime.training.config import load_train_config
from bidirlm.runtime.training.trainer import TrainingInterrupted, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE = {"sequence": "tiny-seqcls.toml", "token": "tiny-tokcls.toml"}


@pytest.fixture(autouse=True)
def _torch_ops_one_thread(monkeypatch: pytest.MonkeyPatch):
    """Torch reference ops (the Triton interpreter is slow) and one thread on a shared CPU."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("BIDIRLM_KERNELS", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(kind: str, output: Path, *extra: str):
    base = [f"train.output={output}", "train.progress_bar=false", "train.log_every=0"]
    return load_train_config(EXAMPLES / EXAMPLE[kind], [*base, *extra])


def _rows(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def _dev_subset(kind: str, path: Path, every: int) -> Path:
    rows = package_task("heldout") if kind == "sequence" else token_task("heldout")
    return _write(path, rows[::every])


# --------------------------------------------------------------------------------------------
# Learning the embedded tasks
# --------------------------------------------------------------------------------------------


def test_sequence_phase_learns_embedded_task(tmp_path: Path) -> None:
    dev = _dev_subset("sequence", tmp_path / "dev.jsonl", 4)
    labels = [json.loads(x)["label"] for x in dev.read_text().splitlines()]
    chance = max(labels.count(p) for p in PACKAGES) / len(labels)  # majority class
    final = train(
        _config(
            "sequence",
            tmp_path / "run",
            "train.steps=80",
            "train.checkpoint_every=0",
            "task.eval_every=40",
            f"task.dev={dev}",
            "data.max_seq_len=32",
        )
    )
    rows = _rows(tmp_path / "run")
    evals = [r for r in rows if "dev" in r]
    assert [r["step"] for r in evals] == [40, 80]
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["metric"] == "accuracy"
    assert best["score"] == max(r["dev_score"] for r in evals)
    assert best["score"] > chance + 0.1, (best, chance)
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert config["is_causal"] is False
    assert [config["id2label"][str(i)] for i in range(len(PACKAGES))] == list(PACKAGES)
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_token_phase_learns_embedded_task(tmp_path: Path) -> None:
    dev = _dev_subset("token", tmp_path / "dev.jsonl", 4)
    tags = [t for x in dev.read_text().splitlines() for t in json.loads(x)["tags"]]
    final = train(
        _config(
            "token",
            tmp_path / "run",
            "train.steps=30",
            "train.checkpoint_every=0",
            f"task.dev={dev}",
            "data.max_seq_len=48",
        )
    )
    dev_metrics = _rows(tmp_path / "run")[-1]["dev"]
    majority = max(tags.count(t) for t in set(tags)) / len(tags)
    assert dev_metrics["accuracy"] > majority + 0.2, (dev_metrics, majority)
    assert dev_metrics["macro_f1"] > 0.5, dev_metrics  # predicting the majority tag: ~0.1
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForTokenClassification"]


# --------------------------------------------------------------------------------------------
# Exact resume, bf16, early stopping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_resume_is_exact(kind: str, tmp_path: Path) -> None:
    dev = _dev_subset(kind, tmp_path / "dev.jsonl", 25)
    args = (
        "train.steps=4",
        "train.checkpoint_every=1",
        "data.batch_size=4",
        "data.max_seq_len=32",
        "task.eval_every=2",
        f"task.dev={dev}",
        "optim.warmup_steps=1",
    )
    straight = train(_config(kind, tmp_path / "a", *args))
    config = _config(kind, tmp_path / "b", *args)
    with pytest.raises(TrainingInterrupted):
        train(config, stop_after=3)
    resumed = train(config)
    timing = ("tokens_per_s", "step_time_s", "mfu")
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    strip = [
        [{k: v for k, v in r.items() if k not in timing} for r in rows] for rows in (rows_a, rows_b)
    ]
    assert strip[0] == strip[1]  # losses, dev metrics, best flags: bitwise the same
    assert [r["step"] for r in rows_a if "dev" in r] == [2, 4]
    for name in ("final", "best"):
        wa = load_file(tmp_path / "a" / name / "model.safetensors")
        wb = load_file(tmp_path / "b" / name / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert "score.weight" in wa
    assert resumed == straight.parent.parent / "b" / "final"


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_bf16_autocast_trains(kind: str, tmp_path: Path) -> None:
    args = ("train.steps=6", "data.batch_size=8", "data.max_seq_len=32", "train.seed=1")
    train(_config(kind, tmp_path / "f32", *args, "train.dtype=float32"))
    final = train(_config(kind, tmp_path / "bf16", *args, "train.dtype=bfloat16"))
    f32 = [r["loss"] for r in _rows(tmp_path / "f32")]
    bf16 = [r["loss"] for r in _rows(tmp_path / "bf16")]
    assert all(torch.isfinite(torch.tensor(bf16)))
    # Same initial weights and data: the first loss agrees to bf16 precision.
    assert bf16[0] == pytest.approx(f32[0], rel=3e-2)
    assert sum(bf16[-2:]) < sum(bf16[:2]), bf16
    weights = load_file(final / "model.safetensors")
    assert weights["score.weight"].dtype == torch.float32  # master weights stay float32


def test_early_stopping_by_patience(tmp_path: Path) -> None:
    dev = _dev_subset("sequence", tmp_path / "dev.jsonl", 40)
    config = _config(
        "sequence",
        tmp_path / "run",
        "train.steps=20",
        "train.checkpoint_every=0",
        "data.batch_size=4",
        "data.max_seq_len=32",
        "optim.lr=1e-12",  # nothing moves: the dev score never improves after the first eval
        "task.dropout=0.0",
        "task.eval_every=1",
        "task.patience=2",
        f"task.dev={dev}",
    )
    final = train(config)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0].get("best") and rows[-1].get("early_stop")
    assert final.joinpath("config.json").is_file() and (tmp_path / "run" / "best").is_dir()
    mtime = (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns
    assert train(config) == final  # a run that stopped early is finished
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------------------------
# Data: formats, labels, errors
# --------------------------------------------------------------------------------------------


def test_alignment_first_subword_and_all_subwords() -> None:
    from transformers import AutoTokenizer

    from bidirlm.runtime.embedded import embedded_tiny_model
    from bidirlm.runtime.training.task_data import TaskRecords, encode_records

    tok = AutoTokenizer.from_pretrained(str(embedded_tiny_model()))
    words = ["isinstance", "Xylophonequux", "is", "ok"]
    records = TaskRecords("mem", [(1, {"tokens": words, "tags": ["B-A", "I-A", "O", "B-B"]})])
    labels = ["O", "B-A", "I-A", "B-B"]
    kw = dict(kind="token", labels=labels, problem_type="single_label", max_len=64)
    first = encode_records(records, tok, **kw)[0]
    every = encode_records(records, tok, **kw, label_all_subwords=True)[0]
    # Expected layout: <s>, each word's pieces (a lone "Ġ" space piece belongs to no word), </s>
    pos, spans, ids = 1, [], [tok.bos_token_id]
    for i, w in enumerate(words):
        piece_ids = tok((" " if i else "") + w, add_special_tokens=False)["input_ids"]
        lead = 1 if tok.convert_ids_to_tokens(piece_ids)[0] == "Ġ" else 0
        spans.append(range(pos + lead, pos + len(piece_ids)))
        pos += len(piece_ids)
        ids += piece_ids
    assert first.input_ids == [*ids, tok.eos_token_id]
    assert len(spans[1]) > 1  # the odd word is split, so the test means something
    assert first.word_starts == [span[0] for span in spans]
    expected = [-100] * len(first.input_ids)
    for w, span in enumerate(spans):
        expected[span[0]] = [1, 2, 0, 3][w]
    assert first.token_labels == expected
    # every subword labelled; B-A continues as I-A, B-B (no I-B tag) as itself
    cont = [2, 2, 0, 3]
    want = [-100] * len(every.input_ids)
    for w, span in enumerate(spans):
        for j in span:
            want[j] = [1, 2, 0, 3][w] if j == span[0] else cont[w]
    assert every.token_labels == want
    # truncation: words cut away have no subword (-1) and keep their gold tag for evaluation
    short = encode_records(records, tok, **{**kw, "max_len": 4})[0]
    assert short.word_starts[-1] == -1 and short.word_labels == [1, 2, 0, 3]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}],
         r"train\.jsonl:3: unknown label 'z' \(labels: x, y\)"),
        ([{"tokens": ["a", "b"], "tags": ["O"]}], r"train\.jsonl:1: 2 tokens but 1 tags"),
        ([], r"train\.jsonl: empty file"),
        ([{"text": "a"}], r'train\.jsonl:1: missing "label"'),
    ],
)  # fmt: skip
def test_data_errors_are_one_line(rows: list[dict], message: str, tmp_path: Path) -> None:
    train_file = _write(tmp_path / "train.jsonl", rows)
    token = bool(rows) and "tokens" in rows[0]
    kind = "token" if token else "sequence"
    extra = ['task.labels=["x", "y"]'] if rows and rows[0].get("label") == "x" else []
    config = _config(kind, tmp_path / "run", f"data.sources.0.path={train_file}", "task.dev=",
                     *extra)  # fmt: skip
    with pytest.raises(ValueError, match=message) as info:
        train(config)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training


def test_json_errors_name_the_line(tmp_path: Path) -> None:
    from bidirlm.runtime.training.task_data import read_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: invalid JSON"):
        read_records(str(path))


def test_pairs_multilabel_and_regression(tmp_path: Path) -> None:
    """Text pairs, label lists and float labels train, save and load back with their head."""
    from bidirlm.runtime.models import as_classifier, load_model

    words = ["alpha", "beta", "gamma", "delta"]
    rows_multi = [
        {"text": f"{a} and {b}", "text_pair": b, "label": sorted({a, b})}
        for a in words
        for b in words
    ]
    rows_reg = [{"text": " ".join(words[: i % 4 + 1]), "label": float(i % 4)} for i in range(16)]
    cases = {
        "multi_label": (rows_multi, "micro_f1", "multi_label_classification"),
        "regression": (rows_reg, "spearman", "regression"),
    }
    for problem, (rows, metric, hf_name) in cases.items():
        data = _write(tmp_path / f"{problem}.jsonl", rows)
        final = train(
            _config(
                "sequence",
                tmp_path / problem,
                "train.steps=3",
                "train.checkpoint_every=0",
                "data.batch_size=8",
                f"data.sources.0.path={data}",
                f"task.dev={data}",
                f"task.problem_type={problem}",
                "task.pooling=late",
            )
        )
        row = _rows(tmp_path / problem)[-1]
        assert metric in row["dev"] and torch.isfinite(torch.tensor(row["loss"]))
        config = json.loads((final / "config.json").read_text())
        assert config["problem_type"] == hf_name
        model = load_model(final)
        clf = as_classifier(model)
        assert model.head.problem_type == problem and model.head.pooling == "late"
        expected = len(words) if problem == "multi_label" else 1
        assert clf.num_labels == expected
        if problem == "multi_label":
            assert clf.labels == sorted(words)


# --------------------------------------------------------------------------------------------
# Hugging Face folders: transformers reads them with the same logits
# --------------------------------------------------------------------------------------------


def _random_classifier(kind: str, pooling: str = "last"):
    from bidirlm.runtime.embedded import embedded_tiny_model
    from bidirlm.runtime.models import SequenceClassifier, TokenClassifier, load_model

    encoder = load_model(embedded_tiny_model(), dtype=torch.float32)
    torch.manual_seed(0)
    if kind == "sequence":
        clf = SequenceClassifier(encoder, 3, pooling=pooling, labels=["neg", "neu", "pos"])
    else:
        clf = TokenClassifier(encoder, 5)
    with torch.no_grad():  # move every weight off the checkpoint so the head and trunk matter
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return encoder, clf.eval()


@pytest.mark.parametrize(("kind", "pooling"), [("sequence", "last"), ("token", "")])
def test_transformers_loads_saved_classifier(kind: str, pooling: str, tmp_path: Path) -> None:
    import transformers

    from bidirlm.runtime.models import as_classifier, load_model

    encoder, clf = _random_classifier(kind, pooling)
    encoder.save_pretrained(tmp_path)
    tok = encoder.tokenizer
    batch = tok(
        ["def f(x): return x", "a longer line of text with words", "x"],
        padding=True,
        return_tensors="pt",
    )
    ours = clf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    auto = (
        transformers.AutoModelForSequenceClassification
        if kind == "sequence"
        else transformers.AutoModelForTokenClassification
    )
    hf = auto.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.is_causal is False  # bidirectional kept
    with torch.no_grad():
        theirs = hf(**batch).logits
    mask = batch["attention_mask"].bool()
    if kind == "token":
        ours, theirs = ours[mask], theirs[mask]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    if kind == "sequence":
        assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    # load_model reads it back with its head: the same logits again
    back = as_classifier(load_model(tmp_path))
    again = back(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    again = again[mask] if kind == "token" else again
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "first", "late"])
def test_transformers_pools_the_last_token(pooling: str, tmp_path: Path) -> None:
    """Other poolings load in transformers, which scores the last token: its logits are our
    head's `score` applied at the last token, not our pooled logits (documented)."""
    import transformers

    encoder, clf = _random_classifier("sequence", pooling)
    encoder.save_pretrained(tmp_path)
    batch = encoder.tokenizer(["def f(x): return x", "two words"], padding=True,
                              return_tensors="pt")  # fmt: skip
    ours = clf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = hf(**batch).logits
        hidden = encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
        last = batch["attention_mask"].sum(1) - 1
        at_last = encoder.head.score(hidden[torch.arange(2), last])
    torch.testing.assert_close(theirs, at_last, rtol=1e-4, atol=1e-5)
    assert (theirs - ours).abs().max() > 1e-3


def test_transformers_loads_saved_gemma3_sequence_classifier(tmp_path: Path) -> None:
    """Gemma3 (text) has `Gemma3TextForSequenceClassification` in transformers: same logits,
    bidirectional (`use_bidirectional_attention`). It has no token-classification class, so a
    Gemma3 token model is read back by `load_model` only."""
    import transformers

    from bidirlm.runtime.models import (
        SequenceClassifier,
        TokenClassifier,
        as_classifier,
        load_model,
    )
    from tests.models.test_models import build_checkpoint

    source = build_checkpoint("gemma3", tmp_path / "base")
    encoder = load_model(source, dtype=torch.float32)
    torch.manual_seed(0)
    clf = SequenceClassifier(encoder, 2, pooling="last").eval()
    encoder.save_pretrained(tmp_path / "seq")
    batch = encoder.tokenizer(["the quick brown fox jumps", "a cat"], padding=True,
                              return_tensors="pt")  # fmt: skip
    ours = clf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "seq", dtype=torch.float32
    ).eval()
    assert type(hf).__name__ == "Gemma3TextForSequenceClassification"
    with torch.no_grad():
        theirs = hf(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-5)
    encoder = load_model(source, dtype=torch.float32)
    tok_clf = TokenClassifier(encoder, 3).eval()
    encoder.save_pretrained(tmp_path / "tok")
    back = as_classifier(load_model(tmp_path / "tok"))
    ids = batch["input_ids"]
    torch.testing.assert_close(
        back(ids, attention_mask=batch["attention_mask"]).logits,
        tok_clf(ids, attention_mask=batch["attention_mask"]).logits,
    )


def test_head_lr_multiplier_scales_the_head_update_only(tmp_path: Path) -> None:
    """One AdamW step moves each weight by ~lr * sign(grad): the head's move scales with
    `task.head_lr_multiplier`, the encoder's does not."""
    base = ["train.steps=1", "train.checkpoint_every=0", "data.batch_size=4", "task.dev=",
            "optim.schedule=constant", "optim.warmup_steps=0", "task.dropout=0.0"]  # fmt: skip
    runs = {"w0": ["optim.lr=1e-30"], "m1": ["optim.lr=1e-3", "task.head_lr_multiplier=1.0"],
            "m10": ["optim.lr=1e-3", "task.head_lr_multiplier=10.0"]}  # fmt: skip
    weights = {}
    for name, extra in runs.items():
        final = train(_config("sequence", tmp_path / name, *base, *extra))
        weights[name] = load_file(final / "model.safetensors")
    head0, head1, head10 = (weights[k]["score.weight"].double() for k in ("w0", "m1", "m10"))
    torch.testing.assert_close(head10 - head0, 10 * (head1 - head0), rtol=1e-3, atol=1e-9)
    assert (head1 - head0).abs().max() > 5e-4  # it moved by about lr
    emb = "model.embed_tokens.weight"
    assert torch.equal(weights["m1"][emb], weights["m10"][emb])
    assert not torch.equal(weights["m1"][emb], weights["w0"][emb])


def test_head_losses_against_float64() -> None:
    import torch.nn.functional as F

    from bidirlm.runtime.models.heads import ClassificationHead

    torch.manual_seed(0)
    logits = torch.randn(7, 3)
    w = torch.tensor([0.5, 2.0, 1.0])
    single = ClassificationHead(8, 3, problem_type="single_label", device="cpu")
    labels = torch.tensor([0, 2, 1, -100, 2, 0, 1])
    ref = F.cross_entropy(logits.double(), labels, weight=w.double(), ignore_index=-100)
    torch.testing.assert_close(single.loss(logits, labels, w).double(), ref, rtol=1e-6, atol=0)
    multi = ClassificationHead(8, 3, problem_type="multi_label", device="cpu")
    hot = (torch.rand(7, 3) > 0.5).float()
    ref = F.binary_cross_entropy_with_logits(logits.double(), hot.double(), pos_weight=w.double())
    torch.testing.assert_close(multi.loss(logits, hot, w).double(), ref, rtol=1e-6, atol=0)
    reg = ClassificationHead(8, 1, problem_type="regression", device="cpu")
    target = torch.randn(7)
    ref = ((logits[:, :1].double().squeeze(1) - target.double()) ** 2).mean()
    torch.testing.assert_close(reg.loss(logits[:, :1], target).double(), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="pooling"):
        ClassificationHead(8, 3, pooling="max")
    with pytest.raises(ValueError, match="problem_type"):
        ClassificationHead(8, 3, kind="token", problem_type="regression")


def test_bio_tags_select_by_entity_f1_and_causal_attention(tmp_path: Path) -> None:
    """BIO tags: the dev metric is seqeval's entity F1; `task.attention = "causal"` fine-tunes
    the Base variant and saves it causal."""
    words = ["Alice", "Smith", "went", "to", "Paris", "and", "Bob", "stayed", "home"]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-PER", "O", "O"]
    data = _write(tmp_path / "ner.jsonl", [{"tokens": words, "tags": tags}] * 8)
    final = train(
        _config(
            "token",
            tmp_path / "run",
            "train.steps=3",
            "train.checkpoint_every=0",
            "data.batch_size=4",
            f"data.sources.0.path={data}",
            f"task.dev={data}",
            "task.attention=causal",
        )
    )
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["metric"] == "entity_f1"
    assert {"entity_precision", "entity_recall", "entity_f1"} <= set(best["dev"])
    config = json.loads((final / "config.json").read_text())
    assert "is_causal" not in config  # causal: transformers' default
    assert config["id2label"]["0"] == "O"  # "O" first, then sorted
    assert [config["id2label"][str(i)] for i in range(4)] == ["O", "B-LOC", "B-PER", "I-PER"]
    from bidirlm.runtime.models import load_model

    assert load_model(final, bidirectional=None).bidirectional is False


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_trained_example_loads_in_transformers(kind: str, tmp_path: Path) -> None:
    """The examples' result (default last-token pooling) gives our logits in transformers."""
    import transformers

    from bidirlm.runtime.models import as_classifier, load_model

    final = train(_config(kind, tmp_path, "train.steps=3", "train.checkpoint_every=0",
                          "task.dev=", "data.batch_size=4", "data.max_seq_len=32"))  # fmt: skip
    clf = as_classifier(load_model(final)).eval()
    batch = clf.encoder.tokenizer(["import os", "Return the sum of the two numbers."],
                                  padding=True, return_tensors="pt")  # fmt: skip
    ours = clf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    auto = {
        "sequence": transformers.AutoModelForSequenceClassification,
        "token": transformers.AutoModelForTokenClassification,
    }[kind]
    hf = auto.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(**batch).logits
    if kind == "token":
        mask = batch["attention_mask"].bool()
        ours, theirs = ours[mask], theirs[mask]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
