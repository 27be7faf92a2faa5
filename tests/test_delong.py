"""DeLong's covariance of correlated AUCs: a hand-worked case, a pair-counting oracle, invariances,
and calibration against simulation (plain and user-clustered)."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from mos.delong import auc_difference, delong_covariance, midranks, paired_variances, placements
from tolerances import STATISTICAL


def test_hand_worked_case():
    """Positives 0.9, 0.6, 0.4; negatives 0.7, 0.4, 0.2, 0.1. Placements by hand: V10 = 1, 3/4,
    5/8 (0.4 ties one negative: 1/2); V01 = 1/3, 5/6, 1, 1. AUC = 19/24. S10 = 7/192,
    S01 = 43/432, so Var = S10/3 + S01/4 = 7/576 + 43/1728 = 1/27."""
    labels = [1, 1, 1, 0, 0, 0, 0]
    scores = [0.9, 0.6, 0.4, 0.7, 0.4, 0.2, 0.1]
    v10, v01 = placements(np.array(labels, bool), np.array([scores]))
    np.testing.assert_array_equal(v10[0], [1.0, 0.75, 0.625])
    np.testing.assert_allclose(v01[0], [1 / 3, 5 / 6, 1.0, 1.0], rtol=0, atol=1e-15)
    aucs, cov = delong_covariance(labels, scores)
    assert aucs[0] == pytest.approx(float(Fraction(19, 24)), abs=1e-15)
    assert cov[0, 0] == pytest.approx(float(Fraction(1, 27)), abs=1e-15)


def test_hanley_mcneil_ratings():
    """Hanley & McNeil (Radiology 1982), Table I: 109 CT images rated 1-5; 58 normal
    (33, 6, 6, 11, 2 per rating), 51 abnormal (3, 2, 2, 11, 33). Their AUC is 0.893 (ties count
    1/2) with SE 0.032 from their exponential approximation; DeLong's SE is the nonparametric
    one of the same quantity, so it must land near it."""
    normal = np.repeat(np.arange(1, 6), [33, 6, 6, 11, 2])
    abnormal = np.repeat(np.arange(1, 6), [3, 2, 2, 11, 33])
    labels = np.r_[np.zeros(normal.size), np.ones(abnormal.size)]
    aucs, cov = delong_covariance(labels, np.r_[normal, abnormal].astype(float))
    assert round(aucs[0], 3) == 0.893
    assert abs(np.sqrt(cov[0, 0]) - 0.032) < 0.004


def _pair_count_covariance(y, s):
    """DeLong's definitions written as loops over pairs: the oracle."""
    pos, neg = s[:, y == 1], s[:, y == 0]
    psi = lambda a, b: 1.0 if a > b else 0.5 if a == b else 0.0
    k, m, n = s.shape[0], pos.shape[1], neg.shape[1]
    v10 = np.array([[sum(psi(pos[r, i], neg[r, j]) for j in range(n)) / n for i in range(m)] for r in range(k)])
    v01 = np.array([[sum(psi(pos[r, i], neg[r, j]) for i in range(m)) / m for j in range(n)] for r in range(k)])
    s10 = np.array([[np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1) for b in range(k)]
                    for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1) for b in range(k)]
                    for a in range(k)])
    return v10.mean(axis=1), s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_pair_count_oracle_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 41)
    y[:2], y[2:4] = 0, 1
    scores = rng.integers(0, 6, (3, 41)).astype(float)      # many ties
    aucs, cov = delong_covariance(y, scores)
    want_aucs, want_cov = _pair_count_covariance(y, scores)
    np.testing.assert_allclose(aucs, want_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, want_cov, rtol=0, atol=1e-12)


def test_identical_scores_differ_by_zero_with_zero_error():
    rng = np.random.default_rng(3)
    y, s = rng.integers(0, 2, 300), rng.normal(size=300)
    for groups in (None, rng.integers(0, 40, 300)):
        result = auc_difference(y, s, s.copy(), groups)
        assert result.difference == 0.0 and result.se == 0.0


def test_a_monotone_transform_changes_nothing():
    """AUC is a rank statistic: a constant shift or any increasing map leaves every placement."""
    rng = np.random.default_rng(4)
    y, s = rng.integers(0, 2, 200), rng.normal(size=200)
    other = s + rng.normal(size=200)
    base = auc_difference(y, s, other)
    for shifted in (s + 3.0, np.exp(s), 1 / (1 + np.exp(-s))):
        moved = auc_difference(y, shifted, other)
        assert moved.auc_a == base.auc_a and moved.difference == base.difference
        assert moved.se == pytest.approx(base.se, abs=1e-15)
    assert auc_difference(y, s + 0.5, s).se == 0.0


def test_singleton_groups_are_plain_delong():
    """Every example its own group: the sandwich form equals DeLong's up to its (m-1)/m, (n-1)/n
    and G/(G-1) factors, which vanish with the sample size."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 4000)
    s = np.stack([y + rng.normal(size=4000), y + rng.normal(size=4000)])
    _, plain = delong_covariance(y, s)
    _, clustered = delong_covariance(y, s, groups=np.arange(4000))
    np.testing.assert_allclose(clustered, plain, rtol=2e-3)


def _simulate(rng, users, per_user, shared):
    """Labels and two correlated scores. `shared` weighs a per-user error of each model (as a
    model misreading a user's history misjudges all of that user's targets) and a user's
    propensity in the labels: the examples of one user are then correlated, in the difference of
    the two AUCs too."""
    n = users * per_user
    group = np.repeat(np.arange(users), per_user)
    latent = rng.normal(size=n) + shared * rng.normal(size=users)[group]
    y = (latent + rng.normal(size=n) > 0).astype(int)
    a = latent + 0.8 * rng.normal(size=n) + shared * rng.normal(size=users)[group]
    b = latent + 1.0 * rng.normal(size=n) + shared * rng.normal(size=users)[group]
    return y, a, b, group


@pytest.mark.parametrize("shared", [0.0, 1.5])
def test_standard_error_is_calibrated(shared):
    """Over 200 simulated test sets the SD of the realised AUC difference matches the mean
    DeLong SE: the plain form when examples are independent, the user-clustered form when a
    user effect ties examples together (where the plain form is too small)."""
    rng = np.random.default_rng(6)
    differences, plain, clustered = [], [], []
    for _ in range(200):
        y, a, b, group = _simulate(rng, users=60, per_user=6, shared=shared)
        differences.append(auc_difference(y, a, b).difference)
        plain.append(auc_difference(y, a, b).se)
        clustered.append(auc_difference(y, a, b, group).se)
    spread = np.std(differences, ddof=1)
    tolerance = STATISTICAL["se_calibration"]
    assert abs(np.mean(clustered) / spread - 1) < tolerance
    if shared == 0.0:
        assert abs(np.mean(plain) / spread - 1) < tolerance
    else:
        assert np.mean(plain) / spread < 1 - tolerance


def test_midranks_and_tensors():
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    y = torch.tensor([1, 0, 1, 0, 1, 0])
    s = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.2, 0.4], dtype=torch.bfloat16)
    assert delong_covariance(y, s)[0][0] == pytest.approx(7 / 9)


@pytest.mark.parametrize("call, match", [
    (lambda: delong_covariance([1, 0, 1, 0], [0.1, 0.2, 0.3]), r"scores: expected \[K, 4\] with K >= 1 or \[4\]"),
    (lambda: delong_covariance([1, 0, 1, 0], np.empty((0, 4))), r"scores: expected \[K, 4\] with K >= 1 .* got shape \(0, 4\)"),
    (lambda: delong_covariance([1, 0, 1, 0], ["a", "b", "c", "d"]), r"scores: expected numbers, got dtype <U1"),
    (lambda: delong_covariance([1, 0, 2, 0], [0.1, 0.2, 0.3, 0.4]), r"labels: expected values in \{0, 1\}, got 2"),
    (lambda: delong_covariance([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]), r"labels: expected at least two examples of "
                                                                     r"each class, got 1 positives and 3 negatives"),
    (lambda: delong_covariance([1, 0, 1, 0], [0.1, float("nan"), 0.3, 0.4]), r"scores: expected finite values"),
    (lambda: delong_covariance([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], groups=[1, 1, 1]), r"groups: expected \[4\]"),
    (lambda: delong_covariance([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], groups=[1, 1, 1, 1]),
     r"groups: expected at least two distinct groups, got 1"),
    (lambda: auc_difference([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2]), r"scores_b: expected \[K, 4\]"),
    (lambda: auc_difference([1, 0, 1, 0], [0.1, 0.2, 0.3, float("inf")], [0.1, 0.2, 0.3, 0.4]),
     r"scores_a: expected finite values"),
    (lambda: auc_difference([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, float("nan")]),
     r"scores_b: expected finite values"),
    (lambda: auc_difference([1, 0, 1, 0], [[0.1, 0.2, 0.3, 0.4]] * 2, [[0.1, 0.2, 0.3, 0.4]] * 2),
     r"scores_a: expected one score per label \[N\], got shape \(2, 4\)"),
    (lambda: paired_variances([1, 0, 1, 0], [[0.1, 0.2, 0.3, 0.4]] * 2, [[0.1, 0.2, 0.3, 0.4]]),
     r"scores_b: expected the shape of scores_a \(2, 4\), got \(1, 4\)"),
    # np.unique would count every NaN as one value: those examples would silently form one group.
    (lambda: delong_covariance([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], groups=[1.0, float("nan"), 2.0, float("nan")]),
     r"groups: expected finite group ids, got NaN or inf"),
    (lambda: delong_covariance([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], groups=np.array([1, None, 2, 3], dtype=object)),
     r"groups: expected ids of one comparable kind"),
    (lambda: placements(np.array([0, 2, 1, 0]), np.ones((1, 4))), r"labels: expected bool or values in \{0, 1\}"),
    (lambda: placements(np.zeros(4, bool), np.ones((1, 4))), r"labels: expected examples of both classes, got 0"),
    (lambda: midranks(np.array([1.0, float("nan"), float("nan"), 0.0])), r"x: expected values that can be ranked, got NaN"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):     # TypeError: not numbers, ids not comparable
        call()
