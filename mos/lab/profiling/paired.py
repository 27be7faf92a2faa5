"""Paired comparisons of models trained on one data set, and the decision rule.

Two models' runs with the same seed are scored on the same test examples, so their AUC
difference is paired: most of the test set's noise cancels in it. For a comparison of model A
with model B over seeds s = 1..S:

- per seed: d_s = AUC(A_s) - AUC(B_s), with its DeLong standard error, user-clustered
  (`mos.delong`): the examples of one user share a history.
- over seeds: the mean d, and its standard error from two sources of noise that add up:
  training (the seed-to-seed spread of d_s, sd / sqrt(S)) and the test set (DeLong's variance of
  the mean difference itself: every seed is scored on the same examples, so this part does not
  shrink with S, and a spread over seeds alone understates the error).
- the 95 % interval d +- 1.96 SE (normal approximation), the seeds in which A won (d_s > 0),
  and on synthetic data the expected-AUC difference: the mean over redraws of every test
  label from its true probability (`expected_auc`), which removes the labels' noise.

The rule, fixed before any run it judges: with at least `MIN_SEEDS` seeds, A is "better" than B
when the interval lies above zero, "worse" when it lies below, and otherwise "no difference
detected". With fewer seeds it is "not evaluated".
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from mos.delong import midranks, paired_variances

Z_95 = 1.959963984540054
MIN_SEEDS = 5
EXPECTED_AUC_REDRAWS = 1000


@dataclass(frozen=True)
class Comparison:
    """Model `model` against `baseline` over the seeds both ran (see the module docstring)."""

    model: str
    baseline: str
    seeds: tuple
    differences: tuple           # per seed: AUC(model) - AUC(baseline)
    ses: tuple                   # per seed: DeLong SE of that difference (user-clustered)
    mean: float
    seed_sd: float               # sample SD of the differences over seeds (0 for one seed)
    test_se: float               # DeLong SE of the mean difference (the shared test set's noise)
    se: float                    # sqrt(seed_sd^2 / S + test_se^2)
    low: float
    high: float
    won: int                     # seeds with a positive difference
    expected: Optional[float] = None      # mean expected-AUC difference (synthetic data)
    expected_se: Optional[float] = None   # its seed-to-seed SD / sqrt(S)

    @property
    def verdict(self) -> str:
        if len(self.seeds) < MIN_SEEDS:
            return f"not evaluated ({len(self.seeds)} seeds, {MIN_SEEDS} needed)"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference detected"


def compare(model: str, baseline: str, labels, users, model_scores: Dict[int, np.ndarray],
            baseline_scores: Dict[int, np.ndarray], probabilities: Optional[np.ndarray] = None) -> Comparison:
    """`model` against `baseline` on one test split: `labels` [N] in {0, 1}, `users` [N], each
    model's scores [N] by seed (a model without seeds, such as a regression, gives the same
    array for every seed). Only the seeds both have are compared. `probabilities` [N], the true
    click probabilities (synthetic data), add the expected-AUC difference. Raises ValueError
    when no seed is shared or AUC is undefined on `labels`."""
    seeds = tuple(sorted(set(model_scores) & set(baseline_scores)))
    if not seeds:
        raise ValueError(f"baseline_scores: expected a seed in common with {model}'s {sorted(model_scores)}, got "
                         f"{sorted(baseline_scores)}")
    count = len(seeds)
    a = np.stack([model_scores[s] for s in seeds])
    b = np.stack([baseline_scores[s] for s in seeds])
    auc_a, auc_b, per_seed, test_var = paired_variances(labels, a, b, groups=users)
    differences = auc_a - auc_b
    test_var = max(test_var, 0.0)
    seed_sd = statistics.stdev(differences) if count > 1 else 0.0
    se = float(np.sqrt(seed_sd ** 2 / count + test_var))
    mean = float(differences.mean())
    expected = expected_se = None
    if probabilities is not None:
        expected_aucs = expected_auc(probabilities, np.concatenate([a, b]))
        gaps = expected_aucs[:count] - expected_aucs[count:]
        expected = float(gaps.mean())
        expected_se = float(statistics.stdev(gaps) / np.sqrt(count)) if count > 1 else 0.0
    return Comparison(model, baseline, seeds, tuple(float(d) for d in differences),
                      tuple(float(np.sqrt(max(v, 0.0))) for v in per_seed), mean, float(seed_sd),
                      float(np.sqrt(test_var)), se, mean - Z_95 * se, mean + Z_95 * se,
                      int((differences > 0).sum()), expected, expected_se)


def expected_auc(probabilities, scores, redraws: int = EXPECTED_AUC_REDRAWS, seed: int = 0) -> np.ndarray:
    """[K] the AUC of each score vector in `scores` [K, N] (or [N]) averaged over `redraws`
    draws of every label y_i ~ Bernoulli(p_i), `probabilities` [N]: the AUC a model is worth on
    these examples once the labels' own noise is averaged out. Every score vector is scored on
    the same draws (seeded), so differences between them are paired. Draws with one class only
    (no AUC) are skipped. Raises ValueError for probabilities outside [0, 1] or a shape mismatch."""
    p = np.asarray(probabilities, dtype=np.float64)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if p.ndim != 1 or s.shape[1] != p.size:
        raise ValueError(f"scores: expected [K, {p.size}] (one score per probability), got {s.shape}")
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("probabilities: expected values in [0, 1]")
    rng = np.random.default_rng(seed)
    ranks = np.stack([midranks(row) for row in s], axis=1)                  # [N, K]
    totals = np.zeros(s.shape[0])
    used = 0
    # In chunks of redraws, so that memory stays ~ chunk x N.
    for start in range(0, redraws, 100):
        draws = rng.random((min(100, redraws - start), p.size)) < p          # [R, N]
        positives = draws.sum(axis=1).astype(np.float64)
        negatives = p.size - positives
        both = (positives > 0) & (negatives > 0)
        rank_sums = draws[both].astype(np.float64) @ ranks                   # [R', K]
        pos = positives[both, None]
        totals += ((rank_sums - pos * (pos + 1) / 2) / (pos * negatives[both, None])).sum(axis=0)
        used += int(both.sum())
    if used == 0:
        raise ValueError("probabilities: every redraw had one class only; expected AUC is undefined")
    return totals / used
