"""CTRDataset: batching against a plain loop, shuffling, subsets, the user split, input checks,
and the session statistics on a hand-made log."""
import dataclasses
import math

import pytest
import torch

from mos.lab.data.config import SyntheticConfig
from mos.lab.data.batch import Batch
from mos.lab.data.dataset import CTRDataset, split_by_user
from mos.lab.data.stats import format_statistics, session_statistics
from mos.lab.data.synthetic import generate


def _hand_dataset() -> CTRDataset:
    """Three users with 4, 0 and 5 events; samples include an empty history and a partial one."""
    return CTRDataset(
        item_ids=torch.tensor([5, 6, 7, 8, 1, 2, 3, 4, 9]),
        category_ids=torch.tensor([1, 1, 2, 2, 3, 3, 1, 2, 3]),
        timestamps=torch.tensor([10, 20, 20, 5000, 0, 1, 2, 9000, 9001]),
        user_offsets=torch.tensor([0, 4, 4, 9]),
        sample_user=torch.tensor([0, 2, 1, 0, 2, 2, 0]),
        hist_end=torch.tensor([4, 9, 4, 2, 6, 4, 0]),
        target_item=torch.tensor([1, 2, 3, 4, 5, 6, 7]),
        target_category=torch.tensor([1, 2, 3, 1, 2, 3, 1]),
        label=torch.tensor([1, 0, 0, 1, 1, 0, 1], dtype=torch.float32),
        num_items=10,
        num_categories=4,
        true_interest=torch.tensor([0, 0, 1, -1, 2, 2, 0, 1, 2]),
    )


@pytest.fixture(scope="module")
def synthetic():
    return generate(SyntheticConfig(num_users=80, num_items=120, num_interests=5), seed=1)


def _loop_histories(ds, order, max_history):
    """Each sample's history, newest `max_history` kept, by a plain loop."""
    rows = []
    for i in order:
        user, end = int(ds.sample_user[i]), int(ds.hist_end[i])
        start = int(ds.user_offsets[user])
        if max_history is not None:
            start = max(start, end - max_history)
        rows.append(list(range(start, end)))
    return rows


def _check_batches(ds, batches, order, max_history, batch_size):
    expected = _loop_histories(ds, order, max_history)
    seen = 0
    for batch in batches:
        assert isinstance(batch, Batch)
        size = batch.size
        assert size <= batch_size
        for b in range(size):
            rows = expected[seen + b]
            lo, hi = int(batch.offsets[b]), int(batch.offsets[b + 1])
            assert batch.item_ids[lo:hi].tolist() == ds.item_ids[rows].tolist()
            assert batch.category_ids[lo:hi].tolist() == ds.category_ids[rows].tolist()
            assert batch.timestamps[lo:hi].tolist() == ds.timestamps[rows].tolist()
            assert batch.true_interest[lo:hi].tolist() == ds.true_interest[rows].tolist()
        index = torch.tensor(order[seen:seen + size], dtype=torch.int64)
        assert torch.equal(batch.target_item, ds.target_item[index])
        assert torch.equal(batch.target_category, ds.target_category[index])
        assert torch.equal(batch.label, ds.label[index])
        assert torch.equal(batch.user, ds.sample_user[index])
        assert isinstance(batch.max_len, int)
        assert batch.max_len == max((len(r) for r in expected[seen:seen + size]), default=0)
        assert int(batch.offsets[0]) == 0 and int(batch.offsets[-1]) == batch.item_ids.numel()
        seen += size
    assert seen == len(order)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 100])
@pytest.mark.parametrize("max_history", [None, 1, 2])
def test_batches_match_a_plain_loop(batch_size, max_history):
    ds = _hand_dataset()
    _check_batches(ds, ds.batches(batch_size, max_history=max_history), list(range(len(ds))),
                   max_history, batch_size)


@pytest.mark.parametrize("max_history", [None, 5, 30])
def test_synthetic_batches_match_a_plain_loop(synthetic, max_history):
    _check_batches(synthetic, synthetic.batches(64, max_history=max_history), list(range(len(synthetic))),
                   max_history, 64)


def test_truncation_keeps_the_newest_events():
    ds = _hand_dataset()
    batch = next(ds.batches(2, max_history=2))
    # Sample 0: user 0's events 0..3 -> newest two; sample 1: user 2's events 4..8 -> 7, 8.
    assert batch.item_ids.tolist() == [7, 8, 4, 9]
    assert batch.offsets.tolist() == [0, 2, 4]


def test_shuffle_is_deterministic_and_complete(synthetic):
    def keys(batches):
        return torch.cat([torch.stack([b.user, b.target_item, b.offsets.diff()], 1) for b in batches])

    def shuffled(seed):
        return synthetic.batches(50, shuffle=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(keys(shuffled(5)), keys(shuffled(5)))
    assert not torch.equal(keys(shuffled(5)), keys(shuffled(6)))
    assert not torch.equal(keys(shuffled(5)), keys(synthetic.batches(50)))
    # The shuffled batches hold every sample once, each with its own history.
    order = torch.randperm(len(synthetic), generator=torch.Generator().manual_seed(5)).tolist()
    assert sorted(order) == list(range(len(synthetic)))
    _check_batches(synthetic, shuffled(5), order, None, 50)


@pytest.mark.parametrize("drop_last", [False, True])
def test_num_batches(synthetic, drop_last):
    for batch_size in (1, 7, 64, len(synthetic), len(synthetic) + 1):
        batches = list(synthetic.batches(batch_size, drop_last=drop_last))
        assert len(batches) == synthetic.num_batches(batch_size, drop_last=drop_last)
        if drop_last:
            assert all(b.size == batch_size for b in batches)


def test_subset_shares_events():
    ds = _hand_dataset()
    sub = ds.subset(torch.tensor([4, 0]))
    assert sub.item_ids is ds.item_ids and sub.user_offsets is ds.user_offsets
    assert sub.sample_user.tolist() == [2, 0] and sub.hist_end.tolist() == [6, 4]
    assert len(sub) == 2
    masked = ds.subset(ds.label == 1)
    assert masked.target_item.tolist() == [1, 4, 5, 7]


def test_split_by_user_is_disjoint_complete_and_deterministic(synthetic):
    train, valid, test = split_by_user(synthetic, 0.2, 0.1, seed=7)
    users = [set(part.sample_user.tolist()) for part in (train, valid, test)]
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert len(train) + len(valid) + len(test) == len(synthetic)
    assert (len(users[1]), len(users[2])) == (16, 8)
    again = split_by_user(synthetic, 0.2, 0.1, seed=7)
    assert all(torch.equal(a.sample_user, b.sample_user) for a, b in zip((train, valid, test), again))
    other = split_by_user(synthetic, 0.2, 0.1, seed=8)
    assert not torch.equal(other[2].sample_user, test.sample_user)
    with pytest.raises(ValueError, match="valid_fraction"):
        split_by_user(synthetic, 1.2, 0.1, seed=0)
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_user(synthetic, 0.5, 0.5, seed=0)


def test_time_may_go_back_between_users():
    _hand_dataset()   # user 0 ends at t=5000, user 2 starts at t=0: valid


BAD_INPUTS = [
    ("item_ids", dict(item_ids=torch.tensor([5, 6, 7, 8, 1, 2, 3, 4, 9.0])), TypeError),
    ("item_ids", dict(item_ids=torch.tensor([5, 6, 0, 8, 1, 2, 3, 4, 9])), ValueError),
    ("item_ids", dict(item_ids=torch.tensor([5, 6, 7, 8, 1, 2, 3, 4, 10])), ValueError),
    ("category_ids", dict(category_ids=torch.tensor([1, 1, 2])), ValueError),
    ("category_ids", dict(category_ids=torch.tensor([1, 1, 2, 2, 3, 3, 1, 2, 4])), ValueError),
    ("timestamps", dict(timestamps=torch.tensor([10, 20, 19, 5000, 0, 1, 2, 9000, 9001])), ValueError),
    ("timestamps", dict(timestamps=torch.tensor([[10, 20, 20, 5000, 0, 1, 2, 9000, 9001]])), ValueError),
    ("user_offsets", dict(user_offsets=torch.tensor([0, 4, 4, 8])), ValueError),
    ("user_offsets", dict(user_offsets=torch.tensor([1, 4, 4, 9])), ValueError),
    ("user_offsets", dict(user_offsets=torch.tensor([0, 5, 4, 9])), ValueError),
    ("sample_user", dict(sample_user=torch.tensor([0, 2, 1, 0, 2, 3, 0])), ValueError),
    ("hist_end", dict(hist_end=torch.tensor([5, 9, 4, 2, 6, 4, 0])), ValueError),
    ("hist_end", dict(hist_end=torch.tensor([4, 3, 4, 2, 6, 4, 0])), ValueError),
    ("hist_end", dict(hist_end=torch.tensor([4, 9, 4])), ValueError),
    ("target_item", dict(target_item=torch.tensor([1, 2, 3, 4, 5, 6, 10])), ValueError),
    ("target_category", dict(target_category=torch.tensor([1, 2, 3, 0, 2, 3, 1])), ValueError),
    ("label", dict(label=torch.tensor([1, 0, 0, 1, 1, 0, 2], dtype=torch.float32)), ValueError),
    ("label", dict(label=torch.tensor([1, 0, 0, 1, 1, 0, 1])), TypeError),
    ("true_interest", dict(true_interest=torch.tensor([0, 0, 1, -2, 2, 2, 0, 1, 2])), ValueError),
    ("true_interest", dict(true_interest=torch.tensor([0, 0, 1])), ValueError),
    ("num_items", dict(num_items=0), ValueError),
]


@pytest.mark.parametrize("field, change, error", BAD_INPUTS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_field(field, change, error):
    with pytest.raises(error, match=f"CTRDataset.{field}"):
        dataclasses.replace(_hand_dataset(), **change)


def test_bad_call_arguments_name_the_argument():
    ds = _hand_dataset()
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.batches(0))
    with pytest.raises(ValueError, match="max_history"):
        next(ds.batches(2, max_history=0))
    with pytest.raises(ValueError, match="sample_index"):
        ds.subset(torch.tensor([7]))
    with pytest.raises(ValueError, match="sample_index"):
        ds.subset(torch.tensor([True, False]))


def test_session_statistics_by_hand():
    # User 0: sessions {1, 1, 2} then {2} (gap 4980 s); user 2: {3, 3, 1} then {2, 3}.
    ds = _hand_dataset()
    stats = session_statistics(ds, gap_seconds=1800, max_back=2)
    assert (stats["users"], stats["events"], stats["sessions"]) == (2, 9, 4)
    assert stats["sessions_per_user"] == 2.0 and stats["items_per_session"] == 9 / 4
    # Within: same-category pair rates 1/3, 1/3 and 0 (the one-event session has no pair).
    assert math.isclose(stats["category_within"], (1 / 3 + 1 / 3 + 0) / 3)
    # Back 1: cos([2,1,0], [0,1,0]) = 1/sqrt(5); cos([1,0,2], [0,1,1]) = 2/(sqrt(5) sqrt(2)).
    assert math.isclose(stats["category_back"][0], (1 / math.sqrt(5) + 2 / math.sqrt(10)) / 2)
    assert math.isnan(stats["category_back"][1])   # no user has three sessions
    # True interests drop the noise event (-1): user 0's second session has none, so its pair is skipped.
    assert math.isclose(stats["interest_within"], (1 / 3 + 1 / 3 + 0) / 3)
    assert math.isclose(stats["interest_back"][0], 2 / math.sqrt(10))
    table = format_statistics(stats)
    assert "back 2" in table and "true interest" in table
