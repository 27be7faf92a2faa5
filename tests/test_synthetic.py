"""The session-hopping generator: determinism, ranges, session structure, timing, labels."""
import math

import numpy as np
import pytest
import torch

from mos.lab.data.config import SyntheticConfig
from mos.lab.data.stats import session_statistics
from mos.lab.data.synthetic import generate
from mos.lab.metrics import auc, session_majority

SMALL = SyntheticConfig(num_users=150, num_items=200, num_interests=6)
SEED = 3


@pytest.fixture(scope="module")
def small():
    return generate(SMALL, SEED, return_truth=True)


@pytest.fixture(scope="module")
def default():
    return generate(SyntheticConfig(), return_truth=True)


def _tensors(ds):
    return {name: value for name, value in vars(ds).items() if isinstance(value, torch.Tensor)}


def test_same_seed_same_data_other_seed_other_data(small):
    again = generate(SMALL, SEED)
    for name, value in _tensors(small[0]).items():
        assert torch.equal(value, getattr(again, name)), name
    other = generate(SMALL, 4)
    assert not torch.equal(other.label, small[0].label)
    assert not torch.equal(other.timestamps[:100], small[0].timestamps[:100])


def test_shapes_and_ranges(small):
    ds, truth = small
    assert len(ds) == SMALL.num_users * SMALL.targets_per_user
    assert ds.num_users == SMALL.num_users
    assert ds.num_items == SMALL.num_items + 1 and ds.num_categories == SMALL.num_interests + 1
    assert ds.item_ids.min() >= 1 and ds.item_ids.max() <= SMALL.num_items
    # The category is the item's interest + 1, for noise events too.
    assert torch.equal(ds.category_ids, truth.item_interest[ds.item_ids] + 1)
    assert torch.equal(ds.target_category, truth.item_interest[ds.target_item] + 1)
    real = ds.true_interest >= 0
    assert torch.equal(ds.true_interest[real], ds.category_ids[real] - 1)
    assert torch.equal(ds.hist_end, ds.user_offsets[ds.sample_user + 1])
    noise_rate = float((~real).float().mean())
    assert abs(noise_rate - SMALL.noise) < 0.03


def test_users_hold_interests_in_range(small):
    _, truth = small
    held = (truth.user_interests >= 0).sum(1)
    assert held.min() >= SMALL.interests_per_user[0] and held.max() <= SMALL.interests_per_user[1]
    assert torch.allclose(truth.user_weights.sum(1), torch.ones(SMALL.num_users, dtype=torch.float64))
    for interests, count in zip(truth.user_interests.tolist(), held.tolist()):
        assert len(set(interests[:count])) == count


def test_sessions_hop_and_keep_their_interest(small):
    ds, truth = small
    per_user = torch.bincount(truth.session_user, minlength=SMALL.num_users)
    assert per_user.min() >= SMALL.sessions_per_user[0] and per_user.max() <= SMALL.sessions_per_user[1]
    lengths = truth.session_offsets.diff()
    assert lengths.min() >= SMALL.session_length[0] and lengths.max() <= SMALL.session_length[1]
    same_user = truth.session_user[1:] == truth.session_user[:-1]
    repeated = truth.session_interest[1:] == truth.session_interest[:-1]
    assert not bool((same_user & repeated).any()), "two consecutive sessions of a user share an interest"
    for user, interest in zip(truth.session_user.tolist(), truth.session_interest.tolist()):
        assert interest in truth.user_interests[user].tolist()
    # Every non-noise event carries its session's interest.
    session_of_event = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    real = ds.true_interest >= 0
    assert torch.equal(ds.true_interest[real], truth.session_interest[session_of_event][real])
    majority = session_majority(ds.true_interest, truth.session_offsets)
    assert torch.equal(majority[majority >= 0], truth.session_interest[majority >= 0])


def test_gaps_separate_sessions(small):
    ds, truth = small
    gaps = ds.timestamps.diff()
    first_of_session = torch.zeros(len(ds.timestamps), dtype=torch.bool)
    first_of_session[truth.session_offsets[:-1]] = True
    first_of_user = torch.zeros_like(first_of_session)
    first_of_user[ds.user_offsets[:-1]] = True
    inside = ~first_of_session[1:]
    between = first_of_session[1:] & ~first_of_user[1:]
    assert gaps[inside].min() >= 0 and gaps[inside].max() < 1800
    assert gaps[between].min() > 1800


def test_positive_rate_in_documented_band(default):
    ds, _ = default
    assert 0.25 <= float(ds.label.mean()) <= 0.45


def _documented_score(cfg, ds, truth, sample):
    """The label logit of the synthetic module's docstring, one sample at a time."""
    user = int(ds.sample_user[sample])
    target = int(ds.target_item[sample])
    interest = int(truth.item_interest[target])
    start, end = int(ds.user_offsets[user]), int(ds.user_offsets[user + 1])
    on_interest = [e for e in range(start, end) if int(ds.true_interest[e]) == interest]
    sim = 0.0
    if on_interest:
        sim = float(np.mean([float(truth.item_taste[target] @ truth.item_taste[int(ds.item_ids[e])])
                             for e in on_interest]))
    sessions = truth.session_interest[truth.session_user == user].tolist()
    share = sessions.count(interest) / len(sessions)
    recent = float(sessions[-1] == interest)
    return cfg.label_taste * sim + cfg.label_share * share + cfg.label_recent * recent - cfg.label_bias


def test_score_follows_the_documented_rule(small):
    ds, truth = small
    rng = np.random.default_rng(0)
    for sample in rng.choice(len(ds), size=60, replace=False).tolist():
        assert math.isclose(_documented_score(SMALL, ds, truth, sample), float(truth.score[sample]),
                            rel_tol=1e-9, abs_tol=1e-9)


def test_labels_depend_on_the_history(default):
    ds, truth = default
    cfg = SyntheticConfig()
    assert auc(ds.label, truth.score) > 0.75
    # The session-level terms (share, recent) from the session record, without the item tastes.
    num_users = ds.num_users
    sessions_on = torch.zeros(num_users, cfg.num_interests, dtype=torch.float64)
    sessions_on.index_put_((truth.session_user, truth.session_interest),
                           torch.ones(len(truth.session_user), dtype=torch.float64), accumulate=True)
    user, interest = ds.sample_user, ds.target_category - 1
    share = sessions_on[user, interest] / sessions_on.sum(1)[user]
    last = truth.session_interest[torch.cumsum(torch.bincount(truth.session_user), 0) - 1]
    recent = (last[user] == interest).double()
    sessions_only = cfg.label_share * share + cfg.label_recent * recent
    # Item-level detail of the right sessions matters: without it the oracle is clearly worse,
    # and on its own it beats chance by far.
    assert auc(ds.label, sessions_only) < auc(ds.label, truth.score) - 0.05
    assert auc(ds.label, truth.score - sessions_only) > 0.65


def test_statistics_show_session_hopping(default):
    ds, truth = default
    stats = session_statistics(ds, max_back=4)
    assert stats["sessions"] == len(truth.session_user)
    assert stats["interest_within"] == 1.0
    assert stats["interest_back"][0] == 0.0
    assert stats["category_within"] > 0.7
    assert stats["category_back"][0] < 0.1
    assert min(stats["category_back"][1], stats["category_back"][3]) > 0.5


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.synthetic.interests_per_user"):
        SyntheticConfig(interests_per_user=(1, 3))
    with pytest.raises(ValueError, match="data.synthetic.session_length"):
        SyntheticConfig(session_length=(5, 2))
    with pytest.raises(ValueError, match="data.synthetic.noise"):
        SyntheticConfig(noise=1.5)
