"""Metric functions against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import _metrics as metrics


def test_squad_normalisation_and_scores():
    assert metrics.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_answer("an apple, a day") == "apple day"
    # prediction "Denver Broncos team" vs gold "the Denver Broncos": 2 common tokens, P = 2/3, R = 2/2
    assert metrics.exact_match("Denver Broncos team", "the Denver Broncos") == 0.0
    assert metrics.token_f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    scores = metrics.squad_scores(["Denver Broncos", "Carolina"], [["the Denver Broncos", "Broncos"], ["Panthers"]])
    assert scores == {"exact_match": 50.0, "f1": 50.0}  # best over golds: EM 1 and 0, F1 1 and 0


def test_squad_v2_has_and_no_answer_breakdown():
    scores = metrics.squad_scores(["", "Paris", "", "x"], [[], ["Paris"], ["Rome"], []])
    assert scores["exact_match"] == 50.0  # right: the empty answer to no-answer 1, Paris
    assert scores["HasAns_exact"] == 50.0 and scores["HasAns_total"] == 2
    assert scores["NoAns_exact"] == 50.0 and scores["NoAns_total"] == 2
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("a thing", "") == 0.0


def test_rouge_known_values():
    # unigrams: 'the cat sat on the mat' vs 'the cat was on the mat': 5 of 6 match -> R1 = 5/6;
    # bigrams: the-cat, on-the, the-mat of 5 -> R2 = 3/5; LCS 'the cat on the mat' = 5 -> RL = 5/6
    scores = metrics.rouge_scores(["the cat sat on the mat"], ["the cat was on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["rougeLsum"] == pytest.approx(5 / 6)
    stemmed = metrics.rouge_scores(["cats running"], ["cat runs"])  # the Porter stemmer makes these match
    assert stemmed["rouge1"] == pytest.approx(1.0)


def test_rouge_lsum_splits_sentences():
    # sentence order changes ROUGE-L (one subsequence) but not ROUGE-Lsum (union LCS over sentences)
    scores = metrics.rouge_scores(["b c d. a x y."], ["a x y. b c d."])
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert scores["rougeL"] < 1.0
    assert metrics.sentence_lines("One. Two! Three?") == "One.\nTwo!\nThree?"
    assert metrics.sentence_lines("kept\nas lines") == "kept\nas lines"


def test_bleu_and_chrf_on_a_tiny_corpus():
    import sacrebleu

    predictions = ["the cat sat on the mat", "a quick brown fox"]
    references = ["the cat sat on the mat", "a quick brown fox"]
    scores, _ = metrics.translation_scores(predictions, references)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    # one 4-word hypothesis against a 6-word reference, every n-gram precision 1: BLEU = brevity penalty
    # exp(1 - 6/4) = 60.65
    scores, _ = metrics.translation_scores(["the cat sat on"], ["the cat sat on the mat"])
    assert scores["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 4), abs=0.01)
    expected = sacrebleu.corpus_chrf(["the cat sat on"], [["the cat sat on the mat"]]).score
    assert scores["chrf"] == pytest.approx(expected)


def test_meteor_with_wordnet_or_a_note():
    scores, notes = metrics.translation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    if metrics.wordnet() is None:
        assert "meteor" not in scores and "wordnet-base" in notes[0]
    else:
        assert not notes and scores["meteor"] == pytest.approx(0.9977, abs=1e-3)  # fragmentation penalty only


def test_seqeval_on_hand_made_tags():
    """Entity-level scoring: gold has PER (B I) and LOC; the prediction gets PER right and LOC as ORG."""
    from launch.run.config import resolve

    task = resolve(["--task", "ner"], prog="test").task
    task = task.bind(state={"label_names": ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]})
    encoded = {"word_starts": [[1, 2, 3, 5]], "tags": [[1, 2, 0, 3]]}  # sub-word positions of the 4 words
    predictions = np.array([[0, 1, 2, 0, 0, 4, 0]])
    scores = task.compute_metrics(predictions, None, encoded)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    assert scores["accuracy"] == 0.75  # 3 of 4 words tagged right
    details = task.metric_details(predictions, None, encoded)["per_entity"]
    assert details["PER"]["f1"] == 1.0 and details["LOC"]["recall"] == 0.0 and details["LOC"]["support"] == 1
    # words cut off by truncation count as predicted O: the LOC entity is missed
    truncated = {"word_starts": [[1, 2, 3]], "tags": [[1, 2, 0, 3]]}
    assert task.compute_metrics(predictions, None, truncated)["recall"] == 0.5


def test_pearson_and_spearman():
    from launch.run.config import resolve

    task = resolve(["--task", "stsb"], prog="test").task
    scores = task.compute_metrics(np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0]), None)
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["pearson"] == pytest.approx(0.9827, abs=1e-4)
    assert scores["mse"] == pytest.approx(0.25)
    assert task.compute_metrics(np.ones(3), np.array([1.0, 2.0, 3.0]), None)["pearson"] == 0.0


def test_qa_post_processing_picks_the_best_span_across_windows():
    """Two windows of one question: the answer is in the second; the first's best span is weaker."""
    from launch.run.config import resolve

    task = resolve(["--task", "squad", "--max-answer-length", "2"], prog="test").task
    context = "alpha beta gamma delta"
    offsets = [[-1, -1], [0, 5], [6, 10], [11, 16], [17, 22]]
    encoded = {
        "example": [0, 0],
        "offsets": [offsets, offsets],
        "null_index": [0, 0],
        "context": [context, context],
        "golds": [["gamma delta"], ["gamma delta"]],
    }
    logits = np.full((2, 5, 2), -5.0)
    logits[0, 0] = [9, 9]  # the null position scores highest: ignored for SQuAD v1
    logits[0, 1] = [2, 2]  # 'alpha': score 4
    logits[1, 3, 0], logits[1, 4, 1] = 4, 4  # 'gamma delta': score 8
    logits[1, 1, 0], logits[1, 4, 1] = 6, 4  # 'alpha ... delta' would score 10 but is longer than 2 tokens
    answer = task.decode(logits, _Rows(encoded))[0]
    assert answer["prediction"] == "gamma delta" and answer["score"] == 8.0
    assert task.compute_metrics(logits, None, _Rows(encoded)) == {"exact_match": 100.0, "f1": 100.0}

    v2 = resolve(["--task", "squad_v2"], prog="test").task
    # the null score is the smallest over the windows (-10 here): the best span (10) wins
    assert v2.decode(logits, _Rows(encoded))[0]["prediction"] == "alpha beta gamma delta"
    logits[1, 0] = [9, 9]  # now every window's null scores 18, above the best span: no answer
    assert v2.decode(logits, _Rows(encoded))[0]["prediction"] == ""


class _Rows:
    """The bit of a `datasets.Dataset` the QA decoder uses, built from columns."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    def select_columns(self, names: list[str]) -> list[dict]:
        return [dict(zip(names, values, strict=True)) for values in zip(*(self.columns[n] for n in names), strict=True)]
