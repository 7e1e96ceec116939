"""Classification metrics against the reference libraries: sklearn, scipy and seqeval."""

from __future__ import annotations

import numpy as np
import pytest

from bidirlm.runtime.evaluation.classification import (
    accuracy,
    entity_scores,
    get_entities,
    is_bio,
    macro_f1,
    metric_names,
    multilabel_scores,
    pearson,
    primary_metric,
    spearman,
    task_metrics,
)


def test_single_label_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n, c in [(1, 2), (7, 3), (123, 5), (47, 9)]:
        t, p = rng.integers(0, c, n), rng.integers(0, c, n)
        p[: n // 3] = t[: n // 3]
        assert accuracy(t, p) == pytest.approx(metrics.accuracy_score(t, p))
        assert macro_f1(t, p) == pytest.approx(
            metrics.f1_score(t, p, average="macro", zero_division=0)
        )
    # a class never predicted counts with F1 0; a class in neither side is not averaged
    assert macro_f1([0, 0, 1], [0, 0, 0]) == pytest.approx((0.8 + 0.0) / 2)
    with pytest.raises(ValueError, match="y_pred"):
        accuracy([0, 1], [0])


def test_multilabel_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    t = rng.integers(0, 2, (53, 6))
    p = rng.integers(0, 2, (53, 6))
    p[:20] = t[:20]
    got = multilabel_scores(t, p)
    assert got["micro_f1"] == pytest.approx(metrics.f1_score(t, p, average="micro"))
    assert got["macro_f1"] == pytest.approx(
        metrics.f1_score(t, p, average="macro", zero_division=0)
    )
    assert got["subset_accuracy"] == pytest.approx(metrics.accuracy_score(t, p))


def test_correlations_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.normal(size=101)
    y = x + rng.normal(size=101)
    ties = np.round(x * 2) / 2  # many ties: average ranks
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert spearman(ties, y) == pytest.approx(stats.spearmanr(ties, y)[0], abs=1e-12)
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # constant side: defined as 0


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-PER", "S-LOC", "I-MISC"]


def test_entities_match_seqeval() -> None:
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

    rng = np.random.default_rng(3)
    y_true, y_pred = [], []
    for _ in range(200):
        n = int(rng.integers(1, 12))
        t = [TAGS[i] for i in rng.integers(0, len(TAGS), n)]
        p = [TAGS[i] if rng.random() < 0.4 else t[k] for k, i in enumerate(rng.integers(0, 8, n))]
        assert get_entities(t) == seqeval_entities(t), t
        y_true.append(t)
        y_pred.append(p)
    got = entity_scores(y_true, y_pred)
    assert got["entity_f1"] == pytest.approx(seqeval.f1_score(y_true, y_pred))
    assert got["entity_precision"] == pytest.approx(seqeval.precision_score(y_true, y_pred))
    assert got["entity_recall"] == pytest.approx(seqeval.recall_score(y_true, y_pred))


def test_entities_by_hand() -> None:
    # IOB2: an I- after O starts an entity (conlleval), a type change splits one
    assert get_entities(["B-PER", "I-PER", "O", "I-LOC", "I-PER"]) == [
        ("PER", 0, 1),
        ("LOC", 3, 3),
        ("PER", 4, 4),
    ]
    perfect = [["B-PER", "I-PER", "O"], ["B-LOC"]]
    assert entity_scores(perfect, perfect)["entity_f1"] == 1.0
    # a wrong boundary is a miss and a false alarm
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]]) == {
        "entity_precision": 0.0,
        "entity_recall": 0.0,
        "entity_f1": 0.0,
    }


def test_task_metrics_and_primary() -> None:
    assert is_bio(["O", "B-X", "I-X"]) and not is_bio(["NAME", "OP"]) and not is_bio(["O"])
    assert primary_metric("token", "single_label", ["O", "B-X", "I-X"]) == "entity_f1"
    assert primary_metric("token", "single_label", ["NAME", "OP"]) == "macro_f1"
    assert primary_metric("sequence", "regression", []) == "spearman"
    out = task_metrics("token", "single_label", ["O", "B-X", "I-X"], [[1, 2, 0]], [[1, 2, 0]])
    assert out["entity_f1"] == 1.0 and out["accuracy"] == 1.0
    assert set(metric_names("token", "single_label", ["O", "B-X"])) <= set(out)
    reg = task_metrics("sequence", "regression", ["s"], [[1.0], [2.0], [3.0]], [[1], [3], [2]])
    assert reg["spearman"] == pytest.approx(0.5) and reg["mse"] == pytest.approx(2 / 3)
