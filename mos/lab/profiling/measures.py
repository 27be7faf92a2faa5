"""What the profile measures besides accuracy: FLOPs per example at given history lengths (on
synthetic batches of exactly that length) and the session-similarity matrices of a few users."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from mos.lab import metrics
from mos.lab.data.batch import Batch
from mos.lab.flops import count_flops


def synthetic_batch(num_items: int, num_categories: int, examples: int, length: int, seed: int = 0) -> Batch:
    """`examples` histories of exactly `length` events, sessions of 8 (1-h gaps): for FLOPs only."""
    gen = torch.Generator().manual_seed(seed)
    total = examples * length
    position = torch.arange(total) % length
    gaps = torch.where(position % 8 == 0, 3600, 60)
    timestamps = torch.cumsum(gaps, 0)
    return Batch(item_ids=torch.randint(1, num_items, (total,), generator=gen),
                 category_ids=torch.randint(1, num_categories, (total,), generator=gen),
                 timestamps=timestamps, offsets=torch.arange(examples + 1) * length, max_len=length,
                 target_item=torch.randint(1, num_items, (examples,), generator=gen),
                 target_category=torch.randint(1, num_categories, (examples,), generator=gen),
                 label=torch.zeros(examples), user=torch.arange(examples))


def flops_by_length(model, profile_cfg, train_set) -> List[float]:
    """Forward GFLOPs per example of a trained `model` at each of `profile_cfg.lengths` (the
    router's choices decide the theme experts' segment lengths, so the trained model counts)."""
    device = next(model.parameters()).device
    return [count_flops(model, synthetic_batch(train_set.num_items, train_set.num_categories,
                                               profile_cfg.length_examples, length).to(device)
                        ).forward_per_example / 1e9 for length in profile_cfg.lengths]


def session_heatmaps(data, users: int, gap_seconds: float, max_sessions: int = 12):
    """Category-histogram cosine between the sessions of the first users with >= 6 sessions:
    (matrices, each session's true interest or number, the users)."""
    matrices, labels, shown = [], [], []
    offsets = data.user_offsets.tolist()
    for user in range(len(offsets) - 1):
        start, end = offsets[user], offsets[user + 1]
        times = data.timestamps[start:end]
        cuts = torch.nonzero(times[1:] - times[:-1] > gap_seconds).squeeze(1) + 1
        bounds = [0] + cuts.tolist() + [end - start]
        if len(bounds) - 1 < 6:
            continue
        bounds = bounds[:max_sessions + 1]
        hist = np.zeros((len(bounds) - 1, data.num_categories))
        for i in range(len(bounds) - 1):
            np.add.at(hist[i], data.category_ids[start + bounds[i]:start + bounds[i + 1]].numpy(), 1)
        unit = hist / np.linalg.norm(hist, axis=1, keepdims=True)
        matrices.append(unit @ unit.T)
        shown.append(user)
        if data.true_interest is not None:
            truth = data.true_interest[start:start + bounds[-1]]
            labels.append(metrics.session_majority(truth, torch.tensor(bounds)).tolist())
        else:
            labels.append(list(range(len(bounds) - 1)))
        if len(matrices) == users:
            break
    return matrices, labels, shown
