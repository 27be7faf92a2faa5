"""DeLong's covariance of correlated AUCs, and its user-clustered form.

Source: E. R. DeLong, D. M. DeLong, D. L. Clarke-Pearson, "Comparing the areas under two or more
correlated receiver operating characteristic curves: a nonparametric approach", Biometrics 44
(1988); placements from midranks as in X. Sun, W. Xu, "Fast implementation of DeLong's
algorithm", IEEE Signal Processing Letters 21 (2014).

For score vector k over the same N examples (m positives, n negatives) the placement of a
positive i is V10[k, i] = the share of negatives it outscores (ties 1/2), of a negative j
V01[k, j] = the share of positives that outscore it; AUC_k is the mean of either. DeLong's
covariance is Cov = S10 / m + S01 / n, S10 and S01 the sample covariances (over positives,
over negatives) of the placements. Any linear contrast c of the AUCs (a paired difference, a
difference of means over seeds) has variance c' Cov c (`paired_variances`).

Examples that share a user are not independent (one history, several targets). With `groups`
the covariance is the cluster-robust ("sandwich") form of the same linearisation: each example's
influence (V10 - AUC) / m or (V01 - AUC) / n is summed per group, and
Cov = G / (G - 1) * sum over groups of the outer products of those sums (G / (G - 1): the
small-sample factor of the sandwich). Source of the clustered form: N. A. Obuchowski,
"Nonparametric analysis of clustered ROC curve data", Biometrics 53 (1997). Without groups it is
DeLong's own estimate.

Everything is float64 numpy; inputs may be tensors or arrays. Errors name the argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AUCDifference:
    """A paired comparison of two score vectors on the same examples.

    Attributes:
        auc_a, auc_b: the AUC of each score vector.
        difference: auc_a - auc_b.
        se: the DeLong standard error of the difference (user-clustered with groups).
    """

    auc_a: float
    auc_b: float
    difference: float     # auc_a - auc_b
    se: float             # DeLong standard error of the difference (user-clustered with groups)


def delong_covariance(labels, scores, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs [K], covariance [K, K]) of the K score vectors `scores` [K, N] (or one [N]) against
    `labels` [N] in {0, 1}; `groups` [N] (user ids, say) gives the cluster-robust covariance.

    Raises ValueError naming the argument for a shape mismatch, no score vector, non-finite
    scores or group ids, labels outside {0, 1}, fewer than two examples of either class, or fewer
    than two groups; TypeError for scores that are not numbers or group ids that do not compare."""
    y = _labels(labels)
    aucs, components = _components(y, _score_matrix("scores", scores, y.size), groups)
    return aucs, _covariance(components)


def paired_variances(labels, scores_a, scores_b, groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Pairs of score vectors on the same examples: `scores_a` and `scores_b` [S, N] (row s of
    each is one pair, a seed's runs of two models, say). Returns (AUCs of a [S], AUCs of b [S],
    the variance of each pair's difference [S], the variance of the mean difference over the
    pairs). Each is c' Cov c for its contrast c, computed by differencing the placements first,
    so that equal score vectors give exactly zero. Arguments and errors as `delong_covariance`."""
    y = _labels(labels)
    a, b = _score_matrix("scores_a", scores_a, y.size), _score_matrix("scores_b", scores_b, y.size)
    if a.shape != b.shape:
        raise ValueError(f"scores_b: expected the shape of scores_a {a.shape}, got {b.shape}")
    count = a.shape[0]
    aucs, components = _components(y, np.concatenate([a, b]), groups)
    differences = [part[:count] - part[count:] for part in components]                  # [S, ...] each
    per_pair = np.array([_covariance([part[i] for part in differences])[0, 0] for i in range(count)])
    mean = _covariance([part.mean(axis=0) for part in differences])[0, 0]
    return aucs[:count], aucs[count:], per_pair, float(mean)


def _labels(labels) -> np.ndarray:
    """`labels` [N] in {0, 1} as bool, with at least two examples of each class."""
    y = _as_numpy("labels", labels)
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels: expected values in {{0, 1}}, got {y[~np.isin(y, (0, 1))][0].item()!r}")
    y = y.astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"labels: expected at least two examples of each class, got {m} positives and {n} negatives")
    return y


def _components(y: np.ndarray, s: np.ndarray, groups):
    """(AUCs, the parts of the covariance) of checked labels y [N] (bool) and scores s [K, N]:
    (V10 [K, m], V01 [K, n]) for DeLong's own form, or (per-group sums of influence [K, G],) for
    the clustered one."""
    m, n = int(y.sum()), int((~y).sum())
    v10, v01 = placements(y, s)
    aucs = v10.mean(axis=1)
    if groups is None:
        return aucs, (v10, v01)
    g = _as_numpy("groups", groups)
    if g.shape != y.shape:
        raise ValueError(f"groups: expected [{y.size}] (one group per label), got {g.shape}")
    if g.dtype.kind == "f" and not np.isfinite(g).all():
        # np.unique counts every NaN as one value: the NaN rows would silently form one group.
        raise ValueError("groups: expected finite group ids, got NaN or inf")
    try:
        _, group = np.unique(g, return_inverse=True)
    except TypeError as err:      # an object array mixing ids that do not compare (None and ints)
        raise TypeError(f"groups: expected ids of one comparable kind (ints or strings), got {err}") from None
    num_groups = int(group.max()) + 1
    if num_groups < 2:
        raise ValueError(f"groups: expected at least two distinct groups, got {num_groups}")
    influence = np.empty_like(s)
    influence[:, y] = (v10 - aucs[:, None]) / m
    influence[:, ~y] = (v01 - aucs[:, None]) / n
    per_group = np.stack([np.bincount(group.reshape(-1), weights=row, minlength=num_groups) for row in influence])
    return aucs, (per_group,)


def _covariance(components) -> np.ndarray:
    """DeLong's S10 / m + S01 / n from (V10, V01), or the sandwich G / (G - 1) sum of outer
    products from (per-group influence sums,); each part [K, ...] (K may be 1)."""
    if len(components) == 2:
        v10, v01 = (np.atleast_2d(part) for part in components)
        return np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    per_group = np.atleast_2d(components[0])
    num_groups = per_group.shape[1]
    return per_group @ per_group.T * num_groups / (num_groups - 1)


def auc_difference(labels, scores_a, scores_b, groups=None) -> AUCDifference:
    """AUC of `scores_a` minus that of `scores_b` on the same `labels`, with DeLong's standard
    error of the difference (cluster-robust by `groups` when given). See `delong_covariance`."""
    for name, scores in (("scores_a", scores_a), ("scores_b", scores_b)):
        if _as_numpy(name, scores).ndim != 1:
            raise ValueError(f"{name}: expected one score per label [N], got shape {_as_numpy(name, scores).shape}")
    auc_a, auc_b, (variance,), _ = paired_variances(labels, scores_a, scores_b, groups)
    return AUCDifference(float(auc_a[0]), float(auc_b[0]), float(auc_a[0] - auc_b[0]),
                         float(np.sqrt(max(variance, 0.0))))


def placements(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placements of `labels` [N] (bool, or 0/1) under `scores` [K, N] (finite): V10 [K, m]
    of the positives and V01 [K, n] of the negatives, from midranks (ties count 1/2). Raises
    ValueError naming `labels` for other values or a class with no example."""
    labels = np.asarray(labels)
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels: expected bool or values in {0, 1}, got other values")
    positive = labels.astype(bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError(f"labels: expected examples of both classes, got {m} positives and {n} negatives")
    v10 = np.empty((scores.shape[0], m))
    v01 = np.empty((scores.shape[0], n))
    for k, row in enumerate(scores):
        overall = midranks(row)
        # A positive's rank among all minus its rank among positives = negatives below it (ties 1/2).
        v10[k] = (overall[positive] - midranks(row[positive])) / n
        v01[k] = 1.0 - (overall[~positive] - midranks(row[~positive])) / m
    return v10, v01


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` [N], tied values sharing the mean of their ranks. Raises ValueError
    for NaN (np.unique would rank every NaN as one tied value, above everything)."""
    if np.asarray(x).dtype.kind in "fc" and np.isnan(x).any():
        raise ValueError("x: expected values that can be ranked, got NaN")
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _score_matrix(name: str, scores, size: int) -> np.ndarray:
    """`scores` as float64 [K, size] (one vector [size] is K = 1); K >= 1, finite."""
    s = _as_numpy(name, scores)
    s = s[None, :] if s.ndim == 1 else s
    if s.ndim != 2 or s.shape[1] != size or s.shape[0] < 1:
        raise ValueError(f"{name}: expected [K, {size}] with K >= 1 or [{size}] (one score per label), got shape "
                         f"{np.shape(scores)}")
    if s.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return s


def _as_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected an array or tensor, got {type(x).__name__}") from err
