"""The profile's paired comparisons and decision rule (mos/lab/profiling/paired.py) on known cases."""
import itertools

import numpy as np
import pytest

from mos.delong import auc_difference
from mos.lab.metrics import auc
from mos.lab.profiling.paired import MIN_SEEDS, Z_95, compare, expected_auc
from tolerances import STATISTICAL


def _data(n=2400, users=400, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    labels = (signal + rng.normal(size=n) > 0).astype(int)
    return rng, signal, labels, np.repeat(np.arange(users), n // users)


def test_identical_predictions_differ_by_nothing():
    rng, signal, labels, users = _data()
    scores = {s: signal + rng.normal(size=signal.size) for s in range(5)}
    result = compare("a", "b", labels, users, scores, {s: v.copy() for s, v in scores.items()})
    assert result.differences == (0.0,) * 5 and result.ses == (0.0,) * 5
    assert (result.mean, result.se, result.won) == (0.0, 0.0, 0)
    assert result.verdict == "no difference detected"


def test_a_constant_shift_changes_no_auc():
    rng, signal, labels, users = _data(seed=1)
    scores = {s: signal + rng.normal(size=signal.size) for s in range(5)}
    result = compare("a", "b", labels, users, {s: v + 2.5 for s, v in scores.items()}, scores)
    assert result.mean == 0.0 and result.se == 0.0


def test_a_better_model_is_better_and_the_reverse_is_worse():
    rng, signal, labels, users = _data(seed=2)
    sharp = {s: signal + 0.5 * rng.normal(size=signal.size) for s in range(5)}
    blunt = {s: signal + 1.5 * rng.normal(size=signal.size) for s in range(5)}
    better = compare("sharp", "blunt", labels, users, sharp, blunt)
    assert better.verdict == "better" and better.won == 5 and better.low > 0
    worse = compare("blunt", "sharp", labels, users, blunt, sharp)
    assert worse.verdict == "worse" and worse.high < 0 and worse.mean == pytest.approx(-better.mean)


def test_per_seed_numbers_are_delong_and_the_interval_combines_seed_and_test_noise():
    rng, signal, labels, users = _data(seed=3)
    a = {s: signal + 0.9 * rng.normal(size=signal.size) for s in range(6)}
    b = {s: signal + 1.0 * rng.normal(size=signal.size) for s in range(6)}
    result = compare("a", "b", labels, users, a, b)
    for i, seed in enumerate(result.seeds):
        want = auc_difference(labels, a[seed], b[seed], users)
        assert result.differences[i] == pytest.approx(want.difference, abs=1e-12)
        assert result.ses[i] == pytest.approx(want.se, rel=1e-9)
    assert result.se ** 2 == pytest.approx(result.seed_sd ** 2 / 6 + result.test_se ** 2)
    assert (result.low, result.high) == pytest.approx((result.mean - Z_95 * result.se, result.mean + Z_95 * result.se))


def test_test_noise_does_not_shrink_with_seeds():
    """Five copies of one seed's runs: no seed spread, and the test set's SE is that of one seed,
    not divided by the square root of five (every seed is scored on the same examples)."""
    rng, signal, labels, users = _data(seed=4)
    a, b = signal + 0.8 * rng.normal(size=signal.size), signal + rng.normal(size=signal.size)
    one = compare("a", "b", labels, users, {0: a}, {0: b})
    five = compare("a", "b", labels, users, {s: a for s in range(5)}, {s: b for s in range(5)})
    assert five.seed_sd == 0.0 and five.test_se == pytest.approx(one.test_se, rel=1e-9)
    assert five.se == pytest.approx(one.ses[0], rel=1e-9)


def test_too_few_seeds_are_not_evaluated_and_only_shared_seeds_count():
    rng, signal, labels, users = _data(seed=5)
    a = {s: signal + 0.5 * rng.normal(size=signal.size) for s in range(MIN_SEEDS)}
    b = {s: signal + 2.0 * rng.normal(size=signal.size) for s in range(1, MIN_SEEDS + 2)}
    result = compare("a", "b", labels, users, a, b)
    assert result.seeds == tuple(range(1, MIN_SEEDS))
    assert result.verdict == f"not evaluated ({MIN_SEEDS - 1} seeds, {MIN_SEEDS} needed)"
    with pytest.raises(ValueError, match=r"baseline_scores: expected a seed in common"):
        compare("a", "b", labels, users, {0: a[0]}, {9: a[0]})


def test_expected_auc_matches_enumeration_over_every_labelling():
    """Six examples: the expected AUC over the 2^6 labellings (those with both classes),
    weighted by their probability, against the Monte Carlo estimate."""
    p = np.array([0.9, 0.2, 0.6, 0.4, 0.7, 0.1])
    scores = np.array([[3.0, 1.0, 2.0, 2.0, 5.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    total, weight = np.zeros(2), 0.0
    for labels in itertools.product((0, 1), repeat=6):
        y = np.array(labels)
        if 0 < y.sum() < 6:
            w = np.prod(np.where(y == 1, p, 1 - p))
            total += w * np.array([auc(y, row) for row in scores])
            weight += w
    exact = total / weight
    estimate = expected_auc(p, scores, redraws=20_000)
    np.testing.assert_allclose(estimate, exact, atol=STATISTICAL["expected_auc"])


def test_expected_auc_with_certain_labels_is_the_auc_and_is_paired():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=(2, 300))
    np.testing.assert_allclose(expected_auc(y.astype(float), s, redraws=50), [auc(y, s[0]), auc(y, s[1])])
    # The same seed draws the same labels: repeated calls agree exactly.
    p = rng.random(300)
    assert np.array_equal(expected_auc(p, s, redraws=200), expected_auc(p, s, redraws=200))
    with pytest.raises(ValueError, match=r"probabilities: expected values in \[0, 1\]"):
        expected_auc(p + 1, s)
    with pytest.raises(ValueError, match=r"scores: expected \[K, 300\]"):
        expected_auc(p, s[:, :10])
