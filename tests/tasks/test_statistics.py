"""The additive per-example statistics (tasks/_statistics.py) give exactly what the reference libraries compute on the
same examples, on random data: scikit-learn (accuracy, macro precision/recall/F1), seqeval (entity scores), scipy
(Pearson's r), sacreBLEU (corpus BLEU and chrF); and on any subset of examples, which is what a bootstrap scores."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tasks import _statistics as statistics


def test_classes_match_scikit_learn_with_absent_classes_and_invalid_predictions():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    classes = 5
    gold = rng.integers(0, classes - 1, 300)  # class 4 never gold
    predicted = rng.integers(-1, classes - 1, 300)  # -1: not a label (text-to-text), class 4 never predicted
    predicted[:40] = gold[:40]
    rows = statistics.class_statistics(gold, predicted, classes)
    for subset in (np.arange(300), rng.integers(0, 300, 300)):
        got = statistics.class_metrics(rows[subset].sum(0), classes)
        p, r, f, _ = precision_recall_fscore_support(
            gold[subset], predicted[subset], labels=list(range(classes)), average="macro", zero_division=0
        )
        assert float(got["accuracy"]) == pytest.approx(accuracy_score(gold[subset], predicted[subset]))
        assert (float(got["precision"]), float(got["recall"]), float(got["f1"])) == pytest.approx((p, r, f))


def _tags(rng: random.Random) -> list[str]:
    tags = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.choice(["O", "O", "PER", "LOC"])
        tags.append("O" if kind == "O" else rng.choice(["B-", "I-"]) + kind)  # I- after O too (seqeval: an entity)
    return tags


def test_entities_match_seqeval():
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(1)
    gold = [_tags(rng) for _ in range(200)]
    predicted = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-LOC"]) for t in g] for g in gold]
    rows = statistics.entity_statistics(gold, predicted)
    for subset in (list(range(200)), [rng.randrange(200) for _ in range(200)]):
        g, p = [gold[i] for i in subset], [predicted[i] for i in subset]
        got = statistics.entity_metrics(rows[subset].sum(0))
        assert float(got["precision"]) == pytest.approx(precision_score(g, p, zero_division=0))
        assert float(got["recall"]) == pytest.approx(recall_score(g, p, zero_division=0))
        assert float(got["f1"]) == pytest.approx(f1_score(g, p, zero_division=0))
        assert float(got["accuracy"]) == pytest.approx(accuracy_score(g, p))


def test_moments_match_scipy_and_a_constant_side_gives_zero():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(2)
    gold = rng.uniform(0, 5, 500)
    predicted = gold + rng.normal(0, 1.5, 500)
    rows = statistics.moment_statistics(predicted, gold)
    got = statistics.moment_metrics(rows.sum(0))
    assert float(got["pearson"]) == pytest.approx(pearsonr(predicted, gold)[0], rel=1e-9)
    assert float(got["mse"]) == pytest.approx(np.mean((predicted - gold) ** 2))
    flat = statistics.moment_statistics(np.full(50, 2.5), gold[:50])
    assert float(statistics.moment_metrics(flat.sum(0))["pearson"]) == 0.0


def test_sacrebleu_statistics_give_corpus_bleu_and_chrf():
    import sacrebleu
    from sacrebleu.metrics import BLEU, CHRF

    rng = random.Random(3)
    words = "the a cat dog sat on mat house red blue runs fast slowly".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(80)]
    hyps = [" ".join(w if rng.random() < 0.7 else rng.choice(words) for w in r.split()) for r in refs]
    for metric, corpus in ((BLEU(), sacrebleu.corpus_bleu), (CHRF(), sacrebleu.corpus_chrf)):
        rows = statistics.sacrebleu_statistics(metric, hyps, refs)
        subset = [rng.randrange(80) for _ in range(80)]
        for idx in (list(range(80)), subset):
            expected = corpus([hyps[i] for i in idx], [[refs[i] for i in idx]]).score
            assert float(statistics.sacrebleu_scores(metric, rows[idx].sum(0))) == pytest.approx(expected)


def test_means_scale_and_vectorize():
    rows = statistics.mean_statistics({"exact_match": [1, 0, 1, 1], "f1": [1, 0.5, 1, 0.75]})
    totals = np.stack([rows.sum(0), rows[[0, 0, 1, 1]].sum(0)])
    got = statistics.mean_metrics(totals, ("exact_match", "f1"), scale=100.0)
    assert got["exact_match"].tolist() == [75.0, 50.0] and got["f1"].tolist() == pytest.approx([81.25, 75.0])
