"""Metrics against hand-computed cases and brute force."""
import math

import numpy as np
import pytest
import torch

from mos.lab.metrics import (auc, gauc, logloss, purity_cap, routing_nmi, routing_purity, routing_table,
                             session_majority)


def _pair_auc(labels, scores):
    """AUC by counting every (positive, negative) pair, ties worth 1/2."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_auc_hand_case_with_ties():
    # Positives 0.9, 0.3, 0.5; negatives 0.9, 0.1: pairs 0.5 + 1 + 0 + 1 + 0 + 1 = 3.5 of 6.
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.9, 0.3, 0.1, 0.5]
    assert math.isclose(auc(labels, scores), 3.5 / 6)
    assert math.isclose(auc(torch.tensor(labels, dtype=torch.float32), torch.tensor(scores)), 3.5 / 6)
    assert auc([0, 1], [0.2, 0.2]) == 0.5


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_pair_count(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(size=500) + labels, 1)   # rounding makes many ties
    assert math.isclose(auc(labels, scores), _pair_auc(labels, scores), rel_tol=1e-12)


def test_auc_errors_name_the_argument():
    with pytest.raises(ValueError, match="labels"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels"):
        auc([1, 0, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores"):
        auc([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores"):
        auc([1, 0], [0.1, float("nan")])


def test_gauc_hand_case():
    # user 10: labels 1 0 0, scores .8 .2 .9 -> 1/2 over 3 impressions
    # user 3:  labels 1 0,   scores .6 .3    -> 1 over 2
    # user 7:  labels 1 1                    -> one class: skipped
    # user 42: labels 0 1 0 1, scores .4 .4 .1 .9 -> (0.5 + 1 + 1 + 1) / 4 over 4
    rows = [(10, 1, .8), (3, 1, .6), (42, 0, .4), (7, 1, .5), (10, 0, .2), (42, 1, .4),
            (3, 0, .3), (42, 0, .1), (10, 0, .9), (7, 1, .1), (42, 1, .9)]
    users, labels, scores = map(list, zip(*rows))
    value, used, skipped = gauc(labels, scores, users)
    assert math.isclose(value, (3 * 0.5 + 2 * 1.0 + 4 * 0.875) / 9)
    assert (used, skipped) == (3, 1)
    value_t, *_ = gauc(torch.tensor(labels), torch.tensor(scores), torch.tensor(users))
    assert math.isclose(value_t, value, rel_tol=1e-6)


def test_gauc_matches_a_loop_over_users():
    rng = np.random.default_rng(0)
    n = 3000
    users = rng.integers(0, 300, n)
    labels = rng.random(n) < 0.4
    scores = np.round(rng.normal(size=n) + labels, 1)
    total = weight = skipped = 0
    for user in np.unique(users):
        mine = users == user
        if labels[mine].all() or not labels[mine].any():
            skipped += 1
            continue
        total += mine.sum() * _pair_auc(labels[mine], scores[mine])
        weight += mine.sum()
    value, used, skipped_got = gauc(labels, scores, users)
    assert math.isclose(value, total / weight, rel_tol=1e-12)
    assert (used, skipped_got) == (len(np.unique(users)) - skipped, skipped)


def test_gauc_without_a_user_of_both_classes_is_undefined_and_counts_them():
    # One sample per user, or every label 1: no user has a positive and a negative to rank.
    assert gauc([1, 0, 1], [0.1, 0.2, 0.3], [0, 1, 2]) == (None, 0, 3)
    assert gauc([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == (None, 0, 2)


def test_gauc_errors():
    with pytest.raises(ValueError, match="labels"):
        gauc([1, 2, 1], [0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="users"):
        gauc([1, 0, 1], [0.1, 0.2, 0.3], [0, 1])


def test_logloss_matches_the_formula():
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.5
    logits = rng.normal(scale=3, size=200)
    p = 1 / (1 + np.exp(-logits))
    direct = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert math.isclose(logloss(labels, logits), direct, rel_tol=1e-10)
    assert math.isclose(logloss(torch.tensor(labels), torch.tensor(logits)), direct, rel_tol=1e-10)
    # Large logits stay finite: log(1 + e^-100) ~ 0 and log(1 + e^100) ~ 100.
    assert math.isclose(logloss([1, 0], [100.0, 100.0]), 50.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="logits"):
        logloss([1, 0], [0.0])


def test_session_majority():
    truth = torch.tensor([2, 2, 1, -1, -1, -1, 3, 1, 5])
    offsets = torch.tensor([0, 4, 6, 8, 8, 9])
    # Majority 2; all noise -> -1; tie 3 vs 1 -> smaller id; empty -> -1; single event.
    assert session_majority(truth, offsets).tolist() == [2, -1, 1, -1, 5]
    assert session_majority(np.array([-1, -1]), np.array([0, 2])).tolist() == [-1]
    with pytest.raises(ValueError, match="session_offsets"):
        session_majority(truth, torch.tensor([0, 4, 8]))


def test_purity_and_nmi_hand_cases():
    truth = [0, 0, 1, 1, 1, 2]
    assert routing_purity([0, 0, 0, 1, 1, 1], truth) == 4 / 6
    # Perfect routing up to a relabelling of the themes.
    assert routing_purity([5, 5, 3, 3, 3, 9], truth) == 1.0
    assert math.isclose(routing_nmi([5, 5, 3, 3, 3, 9], truth), 1.0)
    # One theme for everything: purity is the largest interest's share, no information.
    assert routing_purity([0] * 6, truth) == 3 / 6
    assert math.isclose(routing_nmi([0] * 6, truth), 0.0, abs_tol=1e-12)
    assert routing_nmi([1, 1], [4, 4]) == 1.0
    # Sessions whose truth is -1 do not count.
    assert routing_purity([0, 1, 1], [0, 1, -1]) == 1.0


def test_purity_cap_is_the_best_purity_k_themes_reach():
    """Interests with 3, 2 and 1 sessions: one theme can hold the largest (3/6), two themes the two
    largest (5/6), three or more all of them; a brute force over every assignment agrees."""
    import itertools
    truth = [0, 0, 1, 1, 1, 2, -1]
    assert purity_cap(truth, 1) == 3 / 6 and purity_cap(truth, 2) == 5 / 6
    assert purity_cap(truth, 3) == 1.0 and purity_cap(truth, 8) == 1.0
    for k in (1, 2, 3):
        best = max(routing_purity(assigned + (0,), truth) for assigned in itertools.product(range(k), repeat=6))
        assert math.isclose(best, purity_cap(truth, k))
    assert purity_cap([-1, -1], 2) == 1.0


def test_routing_table_counts_sessions_by_theme_and_interest():
    table = routing_table([0, 0, 2, 2, 2, 1, 3], [0, 0, 1, 1, 2, -1, 2], num_themes=4)
    assert table.tolist() == [[2, 0, 0], [0, 0, 0], [0, 2, 1], [0, 0, 1]]
    assert table.max(axis=1).sum() / table.sum() == routing_purity([0, 0, 2, 2, 2, 1, 3], [0, 0, 1, 1, 2, -1, 2])


def test_nmi_by_hand():
    # Joint p: (0,0)=1/2, (1,0)=1/4, (1,1)=1/4; marginals (1/2, 1/2) and (3/4, 1/4).
    mutual = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) \
        + 0.25 * math.log(0.25 / (0.5 * 0.25))
    entropy_theme = math.log(2)
    entropy_truth = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual / ((entropy_theme + entropy_truth) / 2)
    assert math.isclose(routing_nmi(torch.tensor([0, 0, 1, 1]), np.array([0, 0, 0, 1])), expected)


def test_routing_errors_name_the_argument():
    with pytest.raises(ValueError, match="truth"):
        routing_purity([0, 1], [0])
    with pytest.raises(ValueError, match="truth"):
        routing_nmi([0, 1], [-1, -1])
    with pytest.raises(TypeError, match="assigned"):
        routing_purity([0.5, 1.0], [0, 1])
