"""sentence-transformers' own loss tests (tests/sentence_transformer/losses/test_gist_embed.py,
test_cached_gist_embed.py, test_cached_mnsrl.py at sentence-transformers 6.3), ported to the
fused classes: each test builds and calls our class exactly as sentence-transformers' test builds
and calls theirs (the `__new__` + attributes construction with precomputed embeddings, the
monkeypatched rank-1 gather, `calculate_loss(reps, reps_guided)`, real models with GradCache
mini-batches or token budgets). Their `stsb_bert_tiny_model` download becomes a tiny local
model (a 2-layer Qwen3 with a BPE trained here); every result is also compared with the installed
sentence-transformers class on the same inputs (loss and gradients), and the GIST losses with a
float64 evaluation of sentence-transformers' own formula.
"""

from __future__ import annotations

import inspect
import json.decoder
import math

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
import sentence_transformers.sentence_transformer.losses.cached_gist_embed as cge  # noqa: E402
import sentence_transformers.sentence_transformer.losses.gist_embed as ge  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from bidirlm.integrations import sentence_transformers as ours  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """Stands for sentence-transformers' `stsb_bert_tiny_model`: a 2-layer Qwen3 (float32),
    mean pooling, a BPE tokenizer trained here (no download)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("st-peer") / "tiny"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([inspect.getsource(json.decoder)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
    )  # fmt: skip
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    modules = [Transformer(str(folder), max_seq_length=24), Pooling(32, pooling_mode="mean")]
    model = SentenceTransformer(modules=modules, device="cpu")
    model.train()
    return model


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_trained(grads: dict[str, torch.Tensor]) -> None:
    assert grads and sum(g.abs().sum() for g in grads.values()) > 0


# Model-gradient tolerance against sentence-transformers' float32 GIST at temperature 0.01: the
# anchors the InfoNCE kernel computes carry its float32 lse and positive logit, each rounded at
# |logit| ~ 1 / temperature = 100 (ulp 7.6e-6); measured 1.4e-5 against float64 where
# sentence-transformers' own error is 2.4e-6 (test_gist_model_gradient_precision below). A wrong
# mask or direction changes gradients at O(1e-1).
GIST_GRAD_TOL = {"rtol": 1e-3, "atol": 1e-4}

ANCHORS = ["anchor a", "anchor b", "anchor c", "anchor d", "anchor e"]
POSITIVES = ["positive a", "positive b", "positive c", "positive d", "positive e"]
NEGATIVES = ["negative a", "negative b", "negative c", "negative d", "negative e"]


# --- test_cached_mnsrl.py ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("minibatching", [{"mini_batch_size": 2}, {"mini_batch_num_tokens": 16}])
def test_cached_symmetric_matches_symmetric(tiny_model, minibatching: dict) -> None:
    model = tiny_model
    labels = torch.zeros(5, dtype=torch.long)

    def loss_and_grads(loss_fn):
        model.zero_grad()
        value = loss_fn([model.preprocess(ANCHORS), model.preprocess(POSITIVES)], labels)
        value.backward()
        return value.detach(), gradients(model)

    fused = ours.FusedCachedMultipleNegativesSymmetricRankingLoss(model, **minibatching)
    assert isinstance(fused, losses.CachedMultipleNegativesSymmetricRankingLoss)
    cached_loss, cached_grads = loss_and_grads(fused)
    plain_loss, plain_grads = loss_and_grads(ours.FusedMultipleNegativesSymmetricRankingLoss(model))
    theirs_loss, theirs_grads = loss_and_grads(
        losses.CachedMultipleNegativesSymmetricRankingLoss(model, **minibatching)
    )
    assert_trained(cached_grads)
    for loss, grads in ((plain_loss, plain_grads), (theirs_loss, theirs_grads)):
        assert cached_loss.item() == pytest.approx(loss.item(), rel=1e-4, abs=1e-5)
        for name, grad in cached_grads.items():
            torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)


# --- test_gist_embed.py / test_cached_gist_embed.py: precomputed embeddings ---------------------


def _make_loss(cls, margin: float, *, strategy="absolute", contrast=True, gather=True,
               mini_batch_size: int | None = None):  # fmt: skip
    """sentence-transformers' construction: bypass __init__, set the configuration, fake models
    that return the embeddings carried on the feature dicts."""
    obj = cls.__new__(cls)
    torch.nn.Module.__init__(obj)
    obj.temperature = 0.01
    obj.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
    obj.margin_strategy = strategy
    obj.margin = margin
    obj.contrast_anchors = contrast
    obj.contrast_positives = contrast
    obj.gather_across_devices = gather
    obj.cross_entropy_loss = torch.nn.CrossEntropyLoss()
    if mini_batch_size is None:
        obj.must_retokenize = False
        fake = lambda feature: {"sentence_embedding": feature["sentence_embedding"]}  # noqa: E731
        obj.model = fake
        obj.guide = fake
    else:
        obj.mini_batch_size = mini_batch_size
        obj.show_progress_bar = False
    return obj


@pytest.fixture
def simulate_rank1_world2(monkeypatch):
    """rank 1 of 2 in one process: the gather prepends a fixed rank-0 block; rank is 1."""
    per = 3

    def fake_gather(tensor: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        return torch.cat([torch.randn(per, tensor.size(1), generator=g), tensor], dim=0)

    for module in (ge, cge):
        monkeypatch.setattr(module, "all_gather_with_grad", fake_gather)
        monkeypatch.setattr(module, "get_rank", lambda: 1)
    return per


def _embeddings(per: int, dim: int = 16, seed: int = 7, columns: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(per, dim, generator=g) for _ in range(columns)]


def _gist_both(embeddings, **kw):
    """(loss, grads) of theirs and ours (GISTEmbedLoss, fake models) on the same embeddings."""
    out = []
    for cls in (losses.GISTEmbedLoss, ours.FusedGISTEmbedLoss):
        e = [x.clone().requires_grad_() for x in embeddings]
        loss = _make_loss(cls, **kw)([{"sentence_embedding": x} for x in e], labels=None)
        loss.backward()
        out.append((loss.detach(), [x.grad for x in e]))
    return out


def _cached_gist_both(embeddings, **kw):
    out = []
    for cls in (losses.CachedGISTEmbedLoss, ours.FusedCachedGISTEmbedLoss):
        e = [x.clone().requires_grad_() for x in embeddings]
        reps = [[x] for x in e]
        reps_guided = [[x.detach().clone()] for x in e]
        loss = _make_loss(cls, **kw).calculate_loss(reps, reps_guided)
        loss.backward()
        out.append((loss.detach(), [x.grad for x in e]))
    return out


def _assert_same(results, rtol=1e-3, atol=1e-5):
    (loss_t, grads_t), (loss_m, grads_m) = results
    assert torch.isfinite(loss_m), f"loss must be finite, got {loss_m.item()}"
    torch.testing.assert_close(loss_m, loss_t, rtol=rtol, atol=atol)
    for a, b in zip(grads_m, grads_t):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_gather_rank1_positive_not_masked_with_margin(simulate_rank1_world2):
    per = simulate_rank1_world2
    loss = _make_loss(ours.FusedGISTEmbedLoss, margin=0.1)(
        [{"sentence_embedding": e} for e in _embeddings(per)], labels=None
    )
    assert torch.isfinite(loss), f"rank>0 loss must be finite, got {loss.item()}"
    _assert_same(_gist_both(_embeddings(per), margin=0.1))


def test_gather_rank1_margin_zero_baseline(simulate_rank1_world2):
    per = simulate_rank1_world2
    _assert_same(_gist_both(_embeddings(per), margin=0.0))


def test_positive_mask_protects_ce_target_column(simulate_rank1_world2):
    """sentence-transformers captures the score matrix; ours has none, so the port checks what
    that protects: a finite loss equal to theirs, with 3 columns too."""
    per = simulate_rank1_world2
    _assert_same(_gist_both(_embeddings(per, columns=3), margin=0.1))


def _negative_score_features():
    a0 = [1.0, 0.0, 0.0]
    p0 = [-0.50, math.sqrt(1 - 0.50**2), 0.0]
    p1 = [-0.49, 0.0, math.sqrt(1 - 0.49**2)]
    return [torch.tensor([a0, p1]), torch.tensor([p0, p1])]


def test_relative_margin_negative_positive_score_suppresses_closer_negative():
    """The closer-than-positive candidate (cos -0.49 > -0.50) is dropped for anchor 0: the loss
    equals sentence-transformers' and differs from the loss that keeps it (margin -> no drop)."""
    results = _gist_both(_negative_score_features(), margin=0.05, strategy="relative",
                         contrast=False, gather=False)  # fmt: skip
    _assert_same(results)
    kept = _gist_both(_negative_score_features(), margin=-1.0, strategy="absolute",
                      contrast=False, gather=False)  # fmt: skip
    assert results[1][0].item() < kept[1][0].item() - 1e-3


@pytest.mark.parametrize("mini_batch_size", [32, 2])
def test_cached_gather_rank1_positive_not_masked_with_margin(simulate_rank1_world2,
                                                             mini_batch_size):  # fmt: skip
    per = simulate_rank1_world2
    _assert_same(_cached_gist_both(_embeddings(per), margin=0.1, mini_batch_size=mini_batch_size))


def test_cached_gather_rank1_margin_zero_baseline(simulate_rank1_world2):
    per = simulate_rank1_world2
    _assert_same(_cached_gist_both(_embeddings(per), margin=0.0, mini_batch_size=32))


@pytest.mark.parametrize("mini_batch_size", [32, 2])
def test_cached_positive_mask_protects_ce_target_column(simulate_rank1_world2, mini_batch_size):
    per = simulate_rank1_world2
    _assert_same(
        _cached_gist_both(_embeddings(per, columns=3), margin=0.1, mini_batch_size=mini_batch_size)
    )


def test_cached_relative_margin_negative_positive_score():
    _assert_same(_cached_gist_both(_negative_score_features(), margin=0.05, strategy="relative",
                                   contrast=False, gather=False, mini_batch_size=32))  # fmt: skip


# --- float64: sentence-transformers' own formula, both float32 errors -------------------------


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("margin,strategy", [(0.0, "absolute"), (0.1, "absolute"),
                                             (0.05, "relative")])  # fmt: skip
def test_gist_error_vs_float64_at_most_twice_sentence_transformers(columns, margin, strategy):
    torch.manual_seed(5)
    embeddings = [torch.randn(7, 24) for _ in range(columns)]
    theirs, mine = _gist_both(embeddings, margin=margin, strategy=strategy, gather=False)
    ref = []
    e64 = [x.double().requires_grad_() for x in embeddings]
    loss64 = _make_loss(losses.GISTEmbedLoss, margin=margin, strategy=strategy, gather=False)(
        [{"sentence_embedding": x} for x in e64], labels=None
    )
    loss64.backward()
    ref = [x.grad for x in e64]
    err_t = max(abs(theirs[0].item() - loss64.item()),
                *((a.double() - r).abs().max().item() for a, r in zip(theirs[1], ref)))  # fmt: skip
    err_m = max(abs(mine[0].item() - loss64.item()),
                *((a.double() - r).abs().max().item() for a, r in zip(mine[1], ref)))  # fmt: skip
    # floor: half an ulp of the float32 lse / positive logit at |logit| = 1 / temperature = 100
    assert err_m <= 2 * err_t + 3.8e-6, (err_m, err_t)


# --- test_cached_gist_embed.py: real models --------------------------------------------------


def _loss_and_grads(model, loss_fn, columns, labels):
    model.zero_grad()
    value = loss_fn([model.preprocess(c) for c in columns], labels)
    value.backward()
    return value.detach(), gradients(model)


@pytest.mark.parametrize("num_columns", [2, 3])
@pytest.mark.parametrize("mini_batch_size", [2, 3])
def test_cached_gist_matches_gist(tiny_model, num_columns: int, mini_batch_size: int) -> None:
    model = tiny_model
    columns = [ANCHORS, POSITIVES, NEGATIVES][:num_columns]
    labels = torch.zeros(5, dtype=torch.long)
    cached = ours.FusedCachedGISTEmbedLoss(model, guide=model, mini_batch_size=mini_batch_size)
    assert isinstance(cached, losses.CachedGISTEmbedLoss)
    cached_loss, cached_grads = _loss_and_grads(model, cached, columns, labels)
    plain = ours.FusedGISTEmbedLoss(model, guide=model)
    assert isinstance(plain, losses.GISTEmbedLoss)
    assert plain.get_config_dict() == losses.GISTEmbedLoss(model, guide=model).get_config_dict()
    plain_loss, plain_grads = _loss_and_grads(model, plain, columns, labels)
    theirs_loss, theirs_grads = _loss_and_grads(
        model, losses.GISTEmbedLoss(model, guide=model), columns, labels
    )
    assert_trained(cached_grads)
    # cached vs plain: the same float32 math summed in another order (mini-batches, and the thread
    # count of the run): one element of 10240 was measured 2.9e-4 apart relatively
    for loss, grads, tol in ((plain_loss, plain_grads, {"rtol": 1e-3, "atol": 1e-5}),
                             (theirs_loss, theirs_grads, GIST_GRAD_TOL)):  # fmt: skip
        assert cached_loss.item() == pytest.approx(loss.item(), rel=1e-4, abs=1e-5)
        for name, grad in cached_grads.items():
            torch.testing.assert_close(grad, grads[name], **tol)


def test_cached_gist_two_forwards_before_one_backward(tiny_model) -> None:
    model = tiny_model
    first = [model.preprocess(ANCHORS[:3]), model.preprocess(POSITIVES[:3])]
    second = [model.preprocess(ANCHORS[2:]), model.preprocess(POSITIVES[2:])]
    labels = torch.zeros(3, dtype=torch.long)

    def make_loss():
        return ours.FusedCachedGISTEmbedLoss(model, guide=model, mini_batch_size=2)

    model.zero_grad()
    shared = make_loss()
    (shared(first, labels) + shared(second, labels)).backward()
    shared_grads = gradients(model)
    model.zero_grad()
    (make_loss()(first, labels) + make_loss()(second, labels)).backward()
    reference_grads = gradients(model)
    assert_trained(shared_grads)
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cached_gist_token_budget_matches_gist(tiny_model) -> None:
    model = tiny_model
    anchors = ["a", "anchor b with quite a few more words in it", "c and d", "final anchor", "e"]
    positives = ["short", "positive b also has a longer surface form", "p", "another one", "q r"]
    labels = torch.zeros(5, dtype=torch.long)
    cached_loss, cached_grads = _loss_and_grads(
        model, ours.FusedCachedGISTEmbedLoss(model, guide=model, mini_batch_num_tokens=16),
        [anchors, positives], labels,
    )  # fmt: skip
    plain_loss, plain_grads = _loss_and_grads(
        model, losses.GISTEmbedLoss(model, guide=model), [anchors, positives], labels
    )
    assert_trained(cached_grads)
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=1e-4, abs=1e-5)
    for name, grad in cached_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], **GIST_GRAD_TOL, msg=name)


def test_gist_with_a_retokenizing_guide(tiny_model) -> None:
    """A guide with a shorter max_seq_length forces sentence-transformers' re-tokenization path;
    ours gives the same loss and gradients."""
    import copy

    model = tiny_model
    guide = copy.deepcopy(model)
    guide.max_seq_length = 4
    for p in guide.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    columns = [ANCHORS, POSITIVES]
    labels = torch.zeros(5, dtype=torch.long)
    mine = ours.FusedGISTEmbedLoss(model, guide=guide, margin=0.01)
    assert mine.must_retokenize
    loss_m, grads_m = _loss_and_grads(model, mine, columns, labels)
    loss_t, grads_t = _loss_and_grads(
        model, losses.GISTEmbedLoss(model, guide=guide, margin=0.01), columns, labels
    )
    assert loss_m.item() == pytest.approx(loss_t.item(), rel=1e-4, abs=1e-5)
    for name, grad in grads_m.items():
        torch.testing.assert_close(grad, grads_t[name], **GIST_GRAD_TOL, msg=name)


@pytest.mark.xfail(
    strict=True,
    reason="InfoNCE kernel precision at temperature 0.01 (issue #30, the loss kernel's item): its "
    "float32 lse and positive logit at |logit| ~ 100 put the model-gradient error of the anchors "
    "the kernel computes (no dropped candidate) at 6.1x sentence-transformers' own (2026-12-07); "
    "an XPASS means the kernel got there: drop this mark",
)
def test_gist_model_gradient_precision(tiny_model) -> None:
    """The issue's bar: the fused GIST model gradients are within 2x sentence-transformers' own
    float32 error against a float64 copy of the model. margin=0.1 leaves most anchors without a
    dropped candidate, so the kernel computes them (margin 0 drops one for nearly every anchor
    here and the exact torch rows measured 2.06x; temperature 0.05: 1.19x / 1.71x)."""
    import copy

    model = tiny_model
    model64 = copy.deepcopy(model).double()
    labels = torch.zeros(5, dtype=torch.long)
    _, ref = _loss_and_grads(model64, losses.GISTEmbedLoss(model64, guide=model64, margin=0.1),
                             [ANCHORS, POSITIVES], labels)  # fmt: skip
    errors = []
    for loss_cls in (losses.GISTEmbedLoss, ours.FusedGISTEmbedLoss):
        _, grads = _loss_and_grads(model, loss_cls(model, guide=model, margin=0.1),
                                   [ANCHORS, POSITIVES], labels)  # fmt: skip
        errors.append(max((grads[n].double() - ref[n]).abs().max().item() for n in grads))
    theirs, mine = errors
    assert mine <= 2 * theirs, (mine, theirs)


@pytest.mark.parametrize("mini_batch_size", [2, 3])
def test_gist_matryoshka_matches_cached_gist_matryoshka(tiny_model, mini_batch_size: int) -> None:
    """MatryoshkaLoss around the plain and the cached fused GIST: the same loss and gradients
    (the guide is a copy of the model, as sentence-transformers' test has it), and the same as
    MatryoshkaLoss around sentence-transformers' GISTEmbedLoss."""
    import copy

    model = tiny_model
    guide = copy.deepcopy(model)
    labels = torch.zeros(5, dtype=torch.long)

    def loss_and_grads(inner):
        model.zero_grad()
        features = [model.preprocess(ANCHORS), model.preprocess(POSITIVES)]
        value = losses.MatryoshkaLoss(model, inner, matryoshka_dims=[32, 16, 8])(features, labels)
        value.backward()
        return value.detach(), gradients(model)

    plain_loss, plain_grads = loss_and_grads(ours.FusedGISTEmbedLoss(model, guide=guide))
    cached_loss, cached_grads = loss_and_grads(
        ours.FusedCachedGISTEmbedLoss(model, guide=guide, mini_batch_size=mini_batch_size)
    )
    theirs_loss, theirs_grads = loss_and_grads(losses.GISTEmbedLoss(model, guide=guide))
    assert_trained(plain_grads)
    assert plain_loss.item() == pytest.approx(cached_loss.item(), rel=1e-4, abs=1e-5)
    assert plain_loss.item() == pytest.approx(theirs_loss.item(), rel=1e-4, abs=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grad, cached_grads[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad, theirs_grads[name], **GIST_GRAD_TOL)
