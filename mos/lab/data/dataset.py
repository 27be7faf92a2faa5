"""`CTRDataset`: impressions over per-user event logs, its batching and its user split.

Every user's history is stored once, chronological, users contiguous; an impression (sample)
points at its user and at the end of the history it saw. Batching cuts each sample's history
out of the shared event arrays with one vectorised gather, so many impressions of one user cost
no copies. The layout is not specific to the synthetic generator: real logs load into it too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from mos.lab.data.batch import Batch
from mos_kernels.checks import check_offsets, check_positive, check_tensor

_EVENT_FIELDS = ("item_ids", "category_ids", "timestamps")
_SAMPLE_FIELDS = ("sample_user", "hist_end", "target_item", "target_category", "label")


@dataclass
class CTRDataset:
    # Events: every user's history stored once, chronological, users contiguous.
    item_ids: torch.Tensor        # [E] int64, ids >= 1 (0 is padding)
    category_ids: torch.Tensor    # [E] int64, ids >= 1 (0 is padding)
    timestamps: torch.Tensor      # [E] int64 seconds, non-decreasing inside each user
    user_offsets: torch.Tensor    # [U+1] int64, user u owns events user_offsets[u]:user_offsets[u+1]
    # Samples (impressions): history = events[user_offsets[u] : hist_end], newest max_history kept.
    sample_user: torch.Tensor     # [N] int64
    hist_end: torch.Tensor        # [N] int64, exclusive event index inside the user's range
    target_item: torch.Tensor     # [N] int64
    target_category: torch.Tensor # [N] int64
    label: torch.Tensor           # [N] float32 in {0, 1}
    num_items: int                # embedding table size (max id + 1)
    num_categories: int           # embedding table size (max id + 1)
    true_interest: Optional[torch.Tensor] = None  # [E] int64 latent interest, -1 = noise (synthetic only)

    def __post_init__(self):
        for name in _EVENT_FIELDS + _SAMPLE_FIELDS:
            dtype = torch.float32 if name == "label" else torch.int64
            check_tensor(f"CTRDataset.{name}", getattr(self, name), ndim=1, dtypes=(dtype,))
        num_events = self.item_ids.numel()
        num_samples = self.sample_user.numel()
        _check_length("CTRDataset.category_ids", self.category_ids, num_events, "item_ids")
        _check_length("CTRDataset.timestamps", self.timestamps, num_events, "item_ids")
        for name in _SAMPLE_FIELDS[1:]:
            _check_length(f"CTRDataset.{name}", getattr(self, name), num_samples, "sample_user")
        check_offsets("CTRDataset.user_offsets", self.user_offsets, total=num_events)
        check_positive("CTRDataset.num_items", self.num_items)
        check_positive("CTRDataset.num_categories", self.num_categories)
        _check_range("CTRDataset.item_ids", self.item_ids, 1, self.num_items)
        _check_range("CTRDataset.target_item", self.target_item, 1, self.num_items)
        _check_range("CTRDataset.category_ids", self.category_ids, 1, self.num_categories)
        _check_range("CTRDataset.target_category", self.target_category, 1, self.num_categories)
        num_users = self.user_offsets.numel() - 1
        _check_range("CTRDataset.sample_user", self.sample_user, 0, num_users)
        self._check_hist_end()
        self._check_time_order()
        bad = (self.label != 0) & (self.label != 1)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"CTRDataset.label: expected values in {{0, 1}}, got label[{i}]={float(self.label[i])}")
        if self.true_interest is not None:
            check_tensor("CTRDataset.true_interest", self.true_interest, ndim=1, dtypes=(torch.int64,))
            _check_length("CTRDataset.true_interest", self.true_interest, num_events, "item_ids")
            _check_range("CTRDataset.true_interest", self.true_interest, -1, None)

    def _check_hist_end(self):
        start = self.user_offsets[self.sample_user]
        stop = self.user_offsets[self.sample_user + 1]
        bad = (self.hist_end < start) | (self.hist_end > stop)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"CTRDataset.hist_end: expected an index inside user {int(self.sample_user[i])}'s events "
                f"[{int(start[i])}, {int(stop[i])}], got hist_end[{i}]={int(self.hist_end[i])}")

    def _check_time_order(self):
        if self.timestamps.numel() < 2:
            return
        backwards = self.timestamps[1:] < self.timestamps[:-1]
        # A step back in time is fine where a new user starts (step b-1 -> b for a user starting at b).
        starts = self.user_offsets[1:-1]
        backwards[starts[(starts > 0) & (starts < self.timestamps.numel())] - 1] = False
        if bool(backwards.any()):
            i = int(torch.nonzero(backwards)[0])
            raise ValueError(
                f"CTRDataset.timestamps: expected non-decreasing times inside each user, got "
                f"timestamps[{i}]={int(self.timestamps[i])} > timestamps[{i + 1}]={int(self.timestamps[i + 1])}")

    @property
    def num_users(self) -> int:
        return self.user_offsets.numel() - 1

    def __len__(self) -> int:
        return self.sample_user.numel()

    def subset(self, sample_index) -> "CTRDataset":
        """The same events (shared, not copied) with only the samples at `sample_index`."""
        index = torch.as_tensor(sample_index)
        if index.dtype == torch.bool:
            _check_length("subset.sample_index", index, len(self), "the samples, for a boolean mask")
            index = torch.nonzero(index).flatten()
        check_tensor("subset.sample_index", index, ndim=1, dtypes=(torch.int64, torch.int32))
        _check_range("subset.sample_index", index, 0, len(self))
        picked = {name: getattr(self, name)[index] for name in _SAMPLE_FIELDS}
        return dataclasses.replace(self, **picked)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        check_positive("batch_size", batch_size)
        if drop_last:
            return len(self) // batch_size
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                max_history: Optional[int] = None, drop_last: bool = False) -> Iterator[Batch]:
        """`Batch`es of `batch_size` samples, each history cut to its newest `max_history` events.

        Arguments are checked and the order drawn at the call, not at the first batch."""
        check_positive("batch_size", batch_size)
        if max_history is not None:
            check_positive("max_history", max_history)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        starts = range(0, self.num_batches(batch_size, drop_last) * batch_size, batch_size)
        return (self._batch(order[first:first + batch_size], max_history) for first in starts)

    def _batch(self, index: torch.Tensor, max_history: Optional[int]) -> Batch:
        user = self.sample_user[index]
        end = self.hist_end[index]
        start = self.user_offsets[user]
        if max_history is not None:
            start = torch.maximum(start, end - max_history)
        lengths = end - start
        offsets = torch.zeros(index.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        # Row r of sample b reads event start[b] + (r - offsets[b]).
        gather = torch.repeat_interleave(start - offsets[:-1], lengths) + torch.arange(int(offsets[-1]))
        return Batch(
            item_ids=self.item_ids[gather],
            category_ids=self.category_ids[gather],
            timestamps=self.timestamps[gather],
            offsets=offsets,
            max_len=int(lengths.max()) if lengths.numel() else 0,
            target_item=self.target_item[index],
            target_category=self.target_category[index],
            label=self.label[index],
            user=user,
            true_interest=None if self.true_interest is None else self.true_interest[gather],
        )


def split_by_user(ds: CTRDataset, valid_fraction: float, test_fraction: float,
                  seed: int) -> tuple[CTRDataset, CTRDataset, CTRDataset]:
    """(train, valid, test): disjoint sets of the users that have samples, drawn by `seed`."""
    return tuple(ds.subset(index) for index in split_indices(ds, valid_fraction, test_fraction, seed))


def split_indices(ds: CTRDataset, valid_fraction: float, test_fraction: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sample indices [N_part] int64 of `split_by_user`'s (train, valid, test), each in the
    dataset's order (the order batches read them in)."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"split_by_user.{name}: expected a number in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError(f"split_by_user: expected valid_fraction + test_fraction < 1 (train must keep users), "
                         f"got {valid_fraction} + {test_fraction}")
    users = np.random.default_rng(seed).permutation(torch.unique(ds.sample_user).numpy())
    num_test = round(len(users) * test_fraction)
    num_valid = round(len(users) * valid_fraction)
    part = np.zeros(ds.num_users, dtype=np.int64)   # 0 train, 1 valid, 2 test
    part[users[:num_test]] = 2
    part[users[num_test:num_test + num_valid]] = 1
    sample_part = torch.from_numpy(part)[ds.sample_user]
    return tuple(torch.nonzero(sample_part == p).flatten() for p in (0, 1, 2))


def _check_length(name: str, t: torch.Tensor, expected: int, of: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{name}: expected {expected} entries (as many as {of}), got {t.numel()}")


def _check_range(name: str, t: torch.Tensor, low: int, high: Optional[int]) -> None:
    """Every value in [low, high); high None means unbounded."""
    bad = t < low
    expected = f">= {low}"
    if high is not None:
        bad |= t >= high
        expected = f"in [{low}, {high})"
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name}: expected values {expected}, got {name.split('.')[-1]}[{i}]={int(t[i])}")
