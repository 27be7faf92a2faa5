"""Evaluation metrics: CTR quality (AUC, GAUC, LogLoss) and routing quality (purity, NMI).

Every function takes torch tensors or numpy arrays (1-D), computes in float64 numpy without a
Python loop over samples or users, and returns Python numbers (or a tensor for
`session_majority`). Errors name the argument at fault.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from mos_kernels.checks import check_offsets


def auc(labels, scores) -> float:
    """ROC AUC by ranks: the probability that a positive outscores a negative, ties counting 1/2."""
    y = _as_labels("labels", labels)
    s = _as_array("scores", scores, float, len(y), "labels")
    positives = int(y.sum())
    if positives in (0, len(y)):
        raise ValueError(f"labels: expected both classes for AUC, got {len(y)} labels with {positives} positives")
    rank = _average_rank(s, np.zeros(len(s), dtype=np.int64))
    negatives = len(y) - positives
    return float((rank[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(labels, scores, users) -> tuple[Optional[float], int, int]:
    """Impression-weighted mean of the per-user AUC over users that have both classes.

    Returns (value, users_used, users_skipped); single-class users are skipped and counted. With
    no user of both classes (one sample per user, say) GAUC is undefined: the value is None.
    """
    y = _as_labels("labels", labels)
    s = _as_array("scores", scores, float, len(y), "labels")
    u = _as_array("users", users, None, len(y), "labels")
    _, group = np.unique(u, return_inverse=True)
    group = group.reshape(-1)
    rank = _average_rank(s, group)
    num_groups = int(group.max()) + 1 if len(group) else 0
    impressions = np.bincount(group, minlength=num_groups)
    positives = np.bincount(group, weights=y, minlength=num_groups)
    negatives = impressions - positives
    rank_sum = np.bincount(group, weights=np.where(y, rank, 0.0), minlength=num_groups)
    used = (positives > 0) & (negatives > 0)
    if not used.any():
        return None, 0, num_groups
    per_user = (rank_sum[used] - positives[used] * (positives[used] + 1) / 2) / (positives[used] * negatives[used])
    value = float(np.sum(per_user * impressions[used]) / impressions[used].sum())
    return value, int(used.sum()), int(num_groups - used.sum())


def logloss(labels, logits) -> float:
    """Mean binary cross-entropy of `labels` against sigmoid(`logits`), computed from the logits."""
    y = _as_labels("labels", labels).astype(np.float64)
    z = _as_array("logits", logits, float, len(y), "labels")
    if not len(y):
        raise ValueError("labels: expected at least one sample, got none")
    # log(1 + e^z) - y z, with log(1 + e^z) = max(z, 0) + log1p(e^-|z|) so no exp overflows.
    return float(np.mean(np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z))) - y * z))


def session_majority(true_interest, session_offsets) -> torch.Tensor:
    """[S] int64 majority true interest of every session; noise (-1) is ignored, ties go to the
    smallest interest id, and a session with no non-noise event gets -1."""
    truth = _as_array("true_interest", true_interest, int)
    offsets = _as_array("session_offsets", session_offsets, int)
    check_offsets("session_offsets", torch.from_numpy(offsets), total=len(truth))
    num_sessions = len(offsets) - 1
    session = np.repeat(np.arange(num_sessions), np.diff(offsets))
    real = truth >= 0
    width = int(truth.max()) + 1 if real.any() else 1
    pair, count = np.unique(session[real] * width + truth[real], return_counts=True)
    pair_session, pair_interest = pair // width, pair % width
    # Per session the largest count first, the smallest interest id among equal counts.
    order = np.lexsort((pair_interest, -count, pair_session))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_session[order][1:] != pair_session[order][:-1]
    majority = np.full(num_sessions, -1, dtype=np.int64)
    majority[pair_session[order][first]] = pair_interest[order][first]
    return torch.from_numpy(majority)


def routing_purity(assigned, truth) -> float:
    """Sum over themes of the count of the theme's most common true interest, over the sessions
    counted (those whose truth is not -1). 1 means every theme holds a single interest."""
    table = _contingency(assigned, truth)
    return float(table.max(axis=1).sum() / table.sum())


def purity_cap(truth, num_themes: int) -> float:
    """The highest `routing_purity` K themes can reach on sessions of these true interests: each
    theme holding one interest whole, the K most common ones (1.0 when K >= the interests
    present). Sessions whose truth is -1 are left out, as in the purity."""
    t = _as_array("truth", truth, int)
    counts = np.sort(np.bincount(t[t >= 0]))[::-1] if (t >= 0).any() else np.zeros(0)
    return float(counts[:num_themes].sum() / counts.sum()) if counts.sum() else 1.0


def routing_table(assigned, truth, num_themes: int) -> np.ndarray:
    """[num_themes, interests] int64 session counts by routed theme and true interest (interest
    ids 0..max), sessions whose truth is -1 left out: the routing picture's numbers."""
    a = _as_array("assigned", assigned, int)
    t = _as_array("truth", truth, int, len(a), "assigned")
    kept = t >= 0
    table = np.zeros((num_themes, int(t[kept].max()) + 1 if kept.any() else 0), dtype=np.int64)
    np.add.at(table, (a[kept], t[kept]), 1)
    return table


def routing_nmi(assigned, truth) -> float:
    """Normalised mutual information I(theme; interest) / mean(H(theme), H(interest)) over the
    sessions whose truth is not -1. Both sides constant counts as a perfect match (1.0)."""
    table = _contingency(assigned, truth)
    joint = table / table.sum()
    theme_p, truth_p = joint.sum(axis=1), joint.sum(axis=0)
    nonzero = joint > 0
    mutual = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(theme_p, truth_p)[nonzero]))
    mean_entropy = (_entropy(theme_p) + _entropy(truth_p)) / 2
    if mean_entropy == 0:
        return 1.0
    return float(max(mutual, 0.0) / mean_entropy)


def _contingency(assigned, truth) -> np.ndarray:
    """[themes, interests] session counts, sessions with truth -1 left out."""
    a = _as_array("assigned", assigned, int)
    t = _as_array("truth", truth, int, len(a), "assigned")
    kept = t >= 0
    if not kept.any():
        raise ValueError(f"truth: expected at least one session with a true interest (not -1), got {len(t)} "
                         f"sessions none of which has one")
    _, theme = np.unique(a[kept], return_inverse=True)
    _, interest = np.unique(t[kept], return_inverse=True)
    table = np.zeros((theme.max() + 1, interest.max() + 1))
    np.add.at(table, (theme.reshape(-1), interest.reshape(-1)), 1.0)
    return table


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def _average_rank(scores: np.ndarray, group: np.ndarray) -> np.ndarray:
    """1-based rank of every score inside its group, tied scores sharing their mean rank."""
    order = np.lexsort((scores, group))
    sorted_scores, sorted_group = scores[order], group[order]
    n = len(scores)
    new_tie = np.ones(n, dtype=bool)
    new_tie[1:] = (sorted_scores[1:] != sorted_scores[:-1]) | (sorted_group[1:] != sorted_group[:-1])
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = sorted_group[1:] != sorted_group[:-1]
    position = np.arange(n, dtype=np.float64)
    group_start = np.maximum.accumulate(np.where(new_group, position, 0.0))
    tie_id = np.cumsum(new_tie) - 1
    tie_size = np.bincount(tie_id)
    tie_first = np.flatnonzero(new_tie)
    # A tie spanning positions p..p+m-1 (0-based, within its group) gets rank p + (m + 1) / 2.
    tie_rank = tie_first - group_start[tie_first] + (tie_size + 1) / 2
    rank = np.empty(n)
    rank[order] = tie_rank[tie_id]
    return rank


def _as_array(name: str, x, kind=None, length: Optional[int] = None, length_of: str = "") -> np.ndarray:
    """A 1-D numpy array of a tensor, array or list, as float64 or int64 when `kind` asks; its
    length must equal `length`, that of the argument `length_of`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16; float64 holds every float dtype exactly.
        x = (x.double() if x.is_floating_point() else x).numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if length is not None and len(a) != length:
        raise ValueError(f"{name}: expected {length} entries (as many as {length_of}), got {len(a)}")
    if kind is float:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: expected finite values, got NaN or inf")
    elif kind is int:
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
    return a


def _as_labels(name: str, x) -> np.ndarray:
    """Boolean labels from 0/1 values of any numeric dtype."""
    a = _as_array(name, x)
    if a.size and not np.isin(a, (0, 1)).all():
        bad = a[~np.isin(a, (0, 1))][0]
        raise ValueError(f"{name}: expected values in {{0, 1}}, got {bad!r}")
    return a.astype(bool)
