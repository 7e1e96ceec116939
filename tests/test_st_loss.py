"""The sentence-transformers loss classes on the fused InfoNCE kernel: the same losses and
gradients as sentence-transformers' MultipleNegativesRankingLoss, its cached and symmetric
variants, and a real SentenceTransformerTrainer run."""

from __future__ import annotations

import inspect
import json.decoder
from pathlib import Path

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

import bidirlm.kernels  # noqa: E402
from bidirlm.integrations import sentence_transformers as ours  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SentenceTransformer: a 2-layer Qwen3 (float32) + mean pooling, BPE trained here."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("st") / "tiny"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([inspect.getsource(json.decoder)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    modules = [Transformer(str(folder), max_seq_length=24), Pooling(32, pooling_mode="mean")]
    return SentenceTransformer(modules=modules, device="cpu")


TEXTS = [
    "decode a JSON document",
    "raise ValueError on bad input",
    "scan the string for the next token",
    "return the python object",
    "skip whitespace before a value",
    "parse a number literal",
]


def _embeddings(columns: int, rows: int = 6, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=gen).requires_grad_() for _ in range(columns)]


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts calls of the fused kernel (the loss classes import it at call time)."""
    seen: list[int] = []
    real = bidirlm.kernels.infonce_loss

    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bidirlm.kernels, "infonce_loss", counting)
    return seen


CASES = {
    # name: (our class, their class, kwargs, columns, fused)
    "mnrl-pairs": ("FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss", {}, 2,
                   True),
    "mnrl-triplets-dot": (
        "InfoNCELoss",
        "MultipleNegativesRankingLoss",
        {"scale": 1.0, "similarity_fct": util.dot_score},
        3,
        True,
    ),
    "mnrl-4col-scale": ("FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
                        {"scale": 33.0}, 4, True),
    "mnrl-symmetric-directions": (
        "FusedMultipleNegativesRankingLoss",
        "MultipleNegativesRankingLoss",
        {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
        3,
        True,
    ),
    "mnsrl": ("FusedMultipleNegativesSymmetricRankingLoss",
              "MultipleNegativesSymmetricRankingLoss", {"scale": 10.0}, 2, True),
    "mnsrl-triplets": ("FusedMultipleNegativesSymmetricRankingLoss",
                       "MultipleNegativesSymmetricRankingLoss", {}, 3, True),
    # the joint directions: the kernel's query_to_query / doc_to_doc negatives
    "gte-joint": (
        "FusedMultipleNegativesRankingLoss",
        "MultipleNegativesRankingLoss",
        {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")},
        3,
        True,
    ),
    "q2q-joint-dot": ("FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
                      {"directions": ("query_to_doc", "query_to_query"), "scale": 3.0,
                       "similarity_fct": util.dot_score}, 2, True),
    "d2d-joint-4col": ("FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
                       {"directions": ("query_to_doc", "doc_to_doc")}, 4, True),
    "q2q-d2q-joint": ("FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
                      {"directions": ("query_to_doc", "query_to_query", "doc_to_query")}, 3,
                      True),
    # not covered by the kernel: sentence-transformers' own computation, same result
    "q2d-d2q-joint-fallback": ("FusedMultipleNegativesRankingLoss",
                               "MultipleNegativesRankingLoss",
                               {"directions": ("query_to_doc", "doc_to_query"),
                                "partition_mode": "joint"}, 2, False),
    "hardness-fallback": ("FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
                          {"hardness_mode": "in_batch_negatives", "hardness_strength": 5.0}, 3,
                          False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_same_loss_and_gradients_as_sentence_transformers(case, model, calls):
    mine_name, theirs_name, kwargs, columns, fused = CASES[case]
    mine = getattr(ours, mine_name)(model, **kwargs)
    theirs = getattr(losses, theirs_name)(model, **kwargs)
    assert isinstance(mine, getattr(losses, theirs_name))
    assert mine.get_config_dict() == theirs.get_config_dict()
    a, b = _embeddings(columns), _embeddings(columns)
    loss_a = mine.compute_loss_from_embeddings(a, None)
    loss_b = theirs.compute_loss_from_embeddings(b, None)
    assert len(calls) == int(fused)
    assert loss_a.dtype == torch.float32 and loss_a.dim() == 0
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    loss_a.backward()
    loss_b.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)


def _features(model, texts):
    return dict(model.tokenize(texts))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("columns", [2, 3])
def test_forward_through_the_model_and_cached_variant(model, calls, columns):
    """Losses and parameter gradients through a real model: our MNRL vs theirs, and our
    CachedMNRL (GradCache, mini_batch_size 2 over 6 rows) vs theirs."""
    cols = [TEXTS, TEXTS[::-1], TEXTS[2:] + TEXTS[:2]][:columns]
    results = {}
    for key, cls, kw in [
        ("ours", ours.FusedMultipleNegativesRankingLoss, {}),
        ("theirs", losses.MultipleNegativesRankingLoss, {}),
        ("ours-cached", ours.FusedCachedMultipleNegativesRankingLoss, {"mini_batch_size": 2}),
        ("theirs-cached", losses.CachedMultipleNegativesRankingLoss, {"mini_batch_size": 2}),
    ]:
        model.zero_grad(set_to_none=True)
        loss = cls(model, scale=20.0, **kw)([_features(model, c) for c in cols], None)
        loss.backward()
        results[key] = (loss.detach(), _grads(model))
    assert len(calls) == 2
    for mine, theirs in (
        ("ours", "theirs"),
        ("ours-cached", "theirs-cached"),
        ("ours", "ours-cached"),
    ):
        torch.testing.assert_close(results[mine][0], results[theirs][0], rtol=1e-5, atol=1e-6)
        ga, gb = results[mine][1], results[theirs][1]
        assert ga.keys() == gb.keys() and len(ga) > 10
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-6, msg=n)


def test_bf16_embeddings_match_float32_reference(calls):
    """bf16 embeddings (a bf16 model): the loss accumulates in float32 like the reference."""
    mine = ours.FusedMultipleNegativesRankingLoss(torch.nn.Identity())
    theirs = losses.MultipleNegativesRankingLoss(torch.nn.Identity())
    a = [e.detach().bfloat16().requires_grad_() for e in _embeddings(3)]
    ref = [e.detach().float().requires_grad_() for e in a]
    loss = mine.compute_loss_from_embeddings(a, None)
    expected = theirs.compute_loss_from_embeddings(ref, None)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=2e-3)
    loss.backward()
    expected.backward()
    for x, y in zip(a, ref):
        assert x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(x.grad.float(), y.grad, rtol=3e-2, atol=2e-3)


def test_trainer_runs_two_steps(model, calls, tmp_path: Path):
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    data = Dataset.from_dict(
        {"anchor": TEXTS[:4] * 2, "positive": TEXTS[2:] + TEXTS[:2] + TEXTS[1:3]}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = ours.FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert len(calls) >= 2
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed


def test_lazy_names():
    assert ours.InfoNCELoss is ours.FusedMultipleNegativesRankingLoss
    assert ours.FusedMultipleNegativesRankingLoss.__module__ == ours.__name__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ours.Nope  # noqa: B018


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["BIDIRLM_KERNELS"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, cls, their_cls in [
            ("mnrl", "FusedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss"),
            ("mnsrl", "FusedMultipleNegativesSymmetricRankingLoss",
             "MultipleNegativesSymmetricRankingLoss"),
        ]:  # fmt: skip
            out = []
            for loss_cls in (getattr(ours, cls), getattr(losses, their_cls)):
                loss_fn = loss_cls(torch.nn.Identity(), scale=20.0, gather_across_devices=True)
                embeddings = _embeddings(3, rows=3, seed=100 + rank)
                loss = loss_fn.compute_loss_from_embeddings(embeddings, None)
                loss.backward()
                out.append((loss.detach(), [e.grad for e in embeddings]))
            results[name] = out
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import sentence-transformers
def test_gather_across_devices_two_processes(tmp_path: Path):
    """Two gloo ranks (3 triplets each): with gather_across_devices=True each rank's loss and
    gradients equal sentence-transformers' (which gathers with `all_gather_with_grad`)."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name, ((loss_a, grads_a), (loss_b, grads_b)) in results.items():
            torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6, msg=name)
            for ga, gb in zip(grads_a, grads_b):
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=name)


# --- GIST and the cached symmetric loss (sentence-transformers' own test ports: tests/peers) ----


def _gist(cls, **over):
    """A GIST loss on precomputed embeddings (sentence-transformers' own test construction)."""
    obj = cls.__new__(cls)
    torch.nn.Module.__init__(obj)
    settings = dict(temperature=0.05, margin_strategy="absolute", margin=0.0,
                    contrast_anchors=True, contrast_positives=True, gather_across_devices=False,
                    must_retokenize=False)  # fmt: skip
    settings.update(over)
    for key, value in settings.items():
        setattr(obj, key, value)
    obj.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
    obj.cross_entropy_loss = torch.nn.CrossEntropyLoss()
    obj.model = obj.guide = lambda f: {"sentence_embedding": f["sentence_embedding"]}
    return obj


def test_gist_bf16_embeddings_match_float32_reference():
    """bf16 embeddings: the fused GIST loss accumulates in float32 like the float32 reference."""
    a = [e.detach().bfloat16().requires_grad_() for e in _embeddings(3, rows=6)]
    ref = [e.detach().float().requires_grad_() for e in a]
    loss = _gist(ours.FusedGISTEmbedLoss, margin=0.05)([{"sentence_embedding": e} for e in a], None)
    expected = _gist(losses.GISTEmbedLoss, margin=0.05)(
        [{"sentence_embedding": e} for e in ref], None
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    loss.backward()
    expected.backward()
    for x, y in zip(a, ref):
        assert x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(x.grad.float(), y.grad, rtol=5e-2, atol=2e-2)


@pytest.mark.parametrize("over", [{}, {"margin": 0.2}, {"contrast_anchors": False},
                                  {"margin_strategy": "relative", "margin": 0.1}])  # fmt: skip
def test_gist_loss_and_gradients_equal_sentence_transformers(over):
    embeddings = _embeddings(3, rows=6, seed=3)
    results = []
    for cls in (ours.FusedGISTEmbedLoss, losses.GISTEmbedLoss):
        e = [x.detach().clone().requires_grad_() for x in embeddings]
        loss = _gist(cls, **over)([{"sentence_embedding": x} for x in e], None)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in e]))
    (mine, grads_m), (theirs, grads_t) = results
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_m, grads_t):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="margin_strategy"):
        ours.gist_loss(embeddings[0], embeddings[1:], embeddings[0], embeddings[1:],
                       margin_strategy="soft")  # fmt: skip


def test_new_lazy_names():
    assert issubclass(ours.FusedCachedMultipleNegativesSymmetricRankingLoss,
                      losses.CachedMultipleNegativesSymmetricRankingLoss)  # fmt: skip
    assert issubclass(ours.FusedGISTEmbedLoss, losses.GISTEmbedLoss)
    assert issubclass(ours.FusedCachedGISTEmbedLoss, losses.CachedGISTEmbedLoss)
    for name in ("FusedCachedMultipleNegativesSymmetricRankingLoss", "FusedGISTEmbedLoss",
                 "FusedCachedGISTEmbedLoss"):  # fmt: skip
        assert getattr(ours, name).__module__ == ours.__name__ and name in ours.LOSS_CLASSES
