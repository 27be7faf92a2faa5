"""Reference predictions that say what a data set lets a model learn, scored beside the models.

- "Bayes" (synthetic data only): the generator's true label logit. Its AUC is the ceiling.
- "share LR": a logistic regression on one feature, the share of the history's events in the
  target's category (2 parameters), fitted on the training split. Every neural model should at
  least match it.
- "sessions LR": a logistic regression on the share of the history's sessions whose most common
  category is the target's, and on whether the newest session's is (3 parameters).
- "constant": the training split's click rate for every example: the LogLoss to beat.

Sessions are cut at pauses longer than `gap_seconds`, as the models cut them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from mos.lab.metrics import session_majority

REFERENCES = ("Bayes", "share LR", "sessions LR", "constant")


@dataclass
class Reference:
    name: str
    parameters: int                 # fitted on the training split (0: none)
    valid: np.ndarray               # [N_valid] logits
    test: np.ndarray                # [N_test] logits


def history_features(dataset, gap_seconds: float, max_history: Optional[int] = None) -> np.ndarray:
    """[N, 3] per example of `dataset` (a CTRDataset): share of history events in the target's
    category; share of history sessions whose most common category is the target's; 1.0 if the
    newest session's is. An empty history gives zeros."""
    user_offsets = dataset.user_offsets.numpy()
    end = dataset.hist_end.numpy()
    start = user_offsets[dataset.sample_user.numpy()]
    if max_history is not None:
        start = np.maximum(start, end - max_history)
    lengths = end - start
    sample = np.repeat(np.arange(len(lengths)), lengths)
    offsets = np.r_[0, np.cumsum(lengths)]
    event = np.arange(offsets[-1]) - offsets[sample] + start[sample]
    category = dataset.category_ids.numpy()[event]
    target = dataset.target_category.numpy()
    events_on = np.bincount(sample, weights=category == target[sample], minlength=len(lengths))
    features = np.zeros((len(lengths), 3))
    features[:, 0] = events_on / np.maximum(lengths, 1)
    times = dataset.timestamps.numpy()[event]
    first = np.zeros(len(event), dtype=bool)
    first[offsets[:-1][lengths > 0]] = True
    first[1:] |= np.diff(times) > gap_seconds
    session_offsets = np.r_[np.flatnonzero(first), len(event)]
    session_sample = sample[session_offsets[:-1]]
    majority = session_majority(category, session_offsets).numpy()
    on_target = majority == target[session_sample]
    sessions = np.bincount(session_sample, minlength=len(lengths))
    features[:, 1] = np.bincount(session_sample, weights=on_target, minlength=len(lengths)) / np.maximum(sessions, 1)
    newest = np.r_[session_sample[1:] != session_sample[:-1], True] if len(session_sample) else np.zeros(0, bool)
    features[session_sample[newest], 2] = on_target[newest]
    return features


def fit_logistic(features: np.ndarray, labels: np.ndarray, ridge: float = 1e-6, iterations: int = 100) -> np.ndarray:
    """Weights [F + 1] (intercept last) of a logistic regression by Newton's method, with a tiny
    ridge penalty so that a separable or constant feature stays finite."""
    x = np.c_[features, np.ones(len(features))]
    y = np.asarray(labels, dtype=np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) + ridge * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def references(splits, gap_seconds: float, max_history: Optional[int] = None,
               truth_logits: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Reference]:
    """The reference predictions on the validation and test splits of `splits` (train, valid,
    test); `truth_logits` {"valid": [N], "test": [N]} (synthetic data) adds "Bayes"."""
    train, valid, test = splits
    features = {name: history_features(split, gap_seconds, max_history)
                for name, split in (("train", train), ("valid", valid), ("test", test))}
    labels = train.label.numpy()
    out: Dict[str, Reference] = {}
    if truth_logits is not None:
        out["Bayes"] = Reference("Bayes", 0, truth_logits["valid"], truth_logits["test"])
    for name, columns in (("share LR", [0]), ("sessions LR", [1, 2])):
        w = fit_logistic(features["train"][:, columns], labels)
        logits = {split: np.c_[features[split][:, columns], np.ones(len(features[split]))] @ w
                  for split in ("valid", "test")}
        out[name] = Reference(name, len(w), logits["valid"], logits["test"])
    rate = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6))
    constant = np.log(rate / (1 - rate))
    out["constant"] = Reference("constant", 1, np.full(len(valid), constant), np.full(len(test), constant))
    return out
