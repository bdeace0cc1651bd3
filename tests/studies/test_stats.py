"""Study statistics (ftctl/stats.py) against scipy on known data: the seed t-interval, the bootstrap
interval of one run, and the paired comparison, which must call a real difference significant, an identical one
"within noise", and agree with scipy's paired bootstrap and permutation test on one seed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ftctl import stats
from tasks import _statistics as statistics


def accuracy_run(correct: np.ndarray, key: tuple = ("data",)) -> stats.Evaluation:
    """A classification run whose per-example correctness is given (2 classes, gold all 0)."""
    gold = np.zeros(len(correct), dtype=int)
    predicted = np.where(correct, 0, 1)
    rows = statistics.class_statistics(gold, predicted, 2)
    return stats.Evaluation(rows, lambda totals: statistics.class_metrics(totals, 2), key)


def test_seed_summary_is_the_t_interval():
    values = [0.81, 0.84, 0.79, 0.83]
    got = stats.seed_summary(values)
    a = np.asarray(values)
    half = scipy_stats.t.ppf(0.975, df=3) * a.std(ddof=1) / np.sqrt(4)
    assert got["mean"] == pytest.approx(a.mean()) and got["std"] == pytest.approx(a.std(ddof=1))
    assert got["ci"] == pytest.approx([a.mean() - half, a.mean() + half])
    assert stats.seed_summary([0.8])["ci"] is None and stats.seed_summary([0.8])["mean"] == 0.8


def test_bootstrap_interval_of_an_accuracy_covers_the_binomial_interval():
    rng = np.random.default_rng(0)
    correct = rng.random(800) < 0.8
    low, high = stats.bootstrap_interval(accuracy_run(correct), "accuracy")
    p = correct.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 800)
    assert low < p < high
    assert (low, high) == pytest.approx((p - half, p + half), abs=0.006)


def test_a_real_difference_is_significant_and_none_is_within_noise():
    rng = np.random.default_rng(1)
    a = rng.random(600) < 0.85
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a), 60, replace=False)  # b loses 60 of a's correct answers: 10 points
    b[flip] = False
    real = stats.paired_difference([accuracy_run(a)], [accuracy_run(b)], "accuracy")
    assert real["difference"] == pytest.approx(0.1)
    assert real["ci"][0] > 0.05 and real["p_value"] < 0.01 and not real["within_noise"]
    same = stats.paired_difference([accuracy_run(a)], [accuracy_run(a)], "accuracy")
    assert same["difference"] == 0 and same["within_noise"] and same["p_value"] == 1.0


def test_one_seed_agrees_with_scipys_paired_bootstrap_and_permutation_test():
    rng = np.random.default_rng(2)
    a = rng.random(400) < 0.80
    b = np.where(rng.random(400) < 0.12, ~a, a)  # b differs from a on about 12% of the examples
    ours = stats.paired_difference([accuracy_run(a)], [accuracy_run(b)], "accuracy", resamples=4000)
    scipys = scipy_stats.bootstrap(
        (a.astype(float), b.astype(float)),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=4000,
        rng=np.random.default_rng(3),
    ).confidence_interval
    assert ours["ci"] == pytest.approx([scipys.low, scipys.high], abs=0.01)
    permutation = scipy_stats.permutation_test(
        (a.astype(float), b.astype(float)),
        lambda x, y, axis: x.mean(axis) - y.mean(axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=4000,
        rng=np.random.default_rng(4),
    )
    assert ours["p_value"] == pytest.approx(permutation.pvalue, abs=0.05)


def test_seeds_widen_the_interval_when_methods_swap_places_between_seeds():
    """Method a wins by 6 points on one seed and loses by 6 on the other: over examples alone each seed looks
    significant, over seeds and examples the difference is within noise."""
    rng = np.random.default_rng(5)
    base = rng.random(1000) < 0.8
    better = base.copy()
    better[rng.choice(np.flatnonzero(~base), 60, replace=False)] = True
    worse = base.copy()
    worse[rng.choice(np.flatnonzero(base), 60, replace=False)] = False
    a = [accuracy_run(better, ("s1",)), accuracy_run(worse, ("s2",))]
    b = [accuracy_run(base, ("s1",)), accuracy_run(base, ("s2",))]
    assert not stats.paired_difference(a[:1], b[:1], "accuracy")["within_noise"]
    both = stats.paired_difference(a, b, "accuracy")
    assert both["seeds"] == 2 and both["within_noise"] and both["ci"][0] < -0.03 and both["ci"][1] > 0.03


def test_unpaired_evaluations_are_refused():
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_difference(
            [accuracy_run(np.ones(10, bool), ("x",))], [accuracy_run(np.ones(10, bool), ("y",))], "accuracy"
        )


def test_corpus_metrics_are_recomputed_on_each_resample():
    """Entity F1 is not an average over sentences: the interval comes from recomputing it on resampled sentences."""
    gold = [["B-PER", "I-PER", "O"], ["O", "B-LOC"], ["B-LOC", "O", "B-PER"]] * 50
    predicted = [["B-PER", "I-PER", "O"], ["O", "O"], ["B-LOC", "O", "O"]] * 50
    run = stats.Evaluation(statistics.entity_statistics(gold, predicted), statistics.entity_metrics, ("d",))
    low, high = stats.bootstrap_interval(run, "f1")
    # per block of three sentences: 2 true of 2 predicted and 4 gold entities: P = 1, R = 0.5, F1 = 2/3 (the mean of
    # per-sentence F1 would be (1 + 0 + 2/3) / 3 = 5/9)
    assert float(run.score("f1")) == pytest.approx(2 / 3) and low < 2 / 3 < high


def test_pareto_front():
    points = [(1.0, 0.80), (2.0, 0.85), (3.0, 0.84), (0.5, 0.70), (2.0, 0.86)]
    assert stats.pareto_front(points) == [3, 0, 4]
    assert stats.pareto_front([(1.0, 4.0), (2.0, 5.0), (3.0, 3.0)], higher_is_better=False) == [0, 2]


def test_holm_adjusts_a_family_of_p_values_as_the_worked_example():
    """Holm's step-down by hand: sorted p-values times (m, m-1, ...), made monotone, capped at 1."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and stats.holm([]) == []


def test_seeds_needed_reach_the_power_they_promise_in_simulation():
    """The seeds `seeds_needed` asks for, simulated: paired per-seed differences drawn with the observed mean and
    spread, tested with a two-sided paired t-test at 5%, find the difference in about 80% of studies (and one seed
    fewer in fewer of them)."""
    from scipy.stats import ttest_1samp

    plan = stats.seeds_needed([0.02, 0.035, 0.01, 0.03, 0.005])
    n, effect, spread = plan["seeds"], plan["effect"], plan["seed_std"]
    assert plan["power"] == 0.8 and 2 < n < 40

    def found(seeds: int) -> float:
        rng = np.random.default_rng(1)
        draws = rng.normal(effect, spread, size=(4000, seeds))
        return float(np.mean(ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05))

    from statsmodels.stats.power import TTestPower

    promised = TTestPower().power(effect / spread, nobs=n, alpha=0.05)  # >= 0.8: n is rounded up
    assert promised >= 0.8 and found(n) == pytest.approx(promised, abs=0.03)
    assert found(n - 1) < 0.8  # and no fewer seeds would do
    assert stats.seeds_needed([0.01])["seeds"] is None  # one seed: no variance to plan from
    assert stats.seeds_needed([0.01, 0.01])["why"] == "the seeds do not vary"
    assert stats.seeds_needed([0.001, -0.0012, 0.0003])["why"] == "more than 1000 seeds"
    assert (
        stats.seeds_needed([0.02, 0.035, 0.01], effect=0.1)["seeds"] < stats.seeds_needed([0.02, 0.035, 0.01])["seeds"]
    )
