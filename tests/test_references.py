"""The profile's reference predictions (mos/lab/profiling/references.py): the history features by
hand, the logistic fit's optimality, and the references on generated data."""
import numpy as np
import pytest
import torch

from mos.lab.data import synthetic
from mos.lab.data.config import SyntheticConfig
from mos.lab.data.dataset import CTRDataset, split_by_user
from mos.lab.metrics import auc, logloss
from mos.lab.profiling.references import fit_logistic, history_features, references


def _dataset():
    """User 0: categories 1 1 | 2 | 1 2 2 (sessions cut at 1-h gaps); user 1: 3 3. Samples: user 0
    with target category 2 after all 6 events, user 0 with target 1 after its first 3, user 1
    with target 1 after both, user 1 with no history."""
    t = [0, 60, 3700, 7400, 7460, 7520, 0, 60]
    return CTRDataset(
        item_ids=torch.arange(1, 9), category_ids=torch.tensor([1, 1, 2, 1, 2, 2, 3, 3]),
        timestamps=torch.tensor(t), user_offsets=torch.tensor([0, 6, 8]),
        sample_user=torch.tensor([0, 0, 1, 1]), hist_end=torch.tensor([6, 3, 8, 6]),
        target_item=torch.tensor([1, 2, 3, 4]), target_category=torch.tensor([2, 1, 1, 3]),
        label=torch.tensor([1.0, 0.0, 1.0, 0.0]), num_items=9, num_categories=4)


def test_history_features_by_hand():
    features = history_features(_dataset(), gap_seconds=1800)
    # Sample 0: 3 of 6 events in category 2; sessions [1 1] [2] [1 2 2] have majorities 1, 2, 2:
    # 2 of 3 on the target, the newest one too. Sample 1: 2 of 3 events in category 1; sessions
    # [1 1] [2]: 1 of 2, the newest not. Sample 2: none. Sample 3: an empty history.
    np.testing.assert_allclose(features, [[3 / 6, 2 / 3, 1.0], [2 / 3, 1 / 2, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    capped = history_features(_dataset(), gap_seconds=1800, max_history=2)     # the newest two events only
    np.testing.assert_allclose(capped[0], [1.0, 1.0, 1.0])


def test_the_logistic_fit_is_the_likelihood_optimum():
    rng = np.random.default_rng(0)
    x = rng.random((5000, 2))
    y = (rng.random(5000) < 1 / (1 + np.exp(-(3 * x[:, 0] - 1 * x[:, 1] - 1)))).astype(float)
    w = fit_logistic(x, y)
    design = np.c_[x, np.ones(5000)]
    p = 1 / (1 + np.exp(-(design @ w)))
    np.testing.assert_allclose(design.T @ (p - y), -1e-6 * w, atol=1e-8)     # the gradient vanishes
    assert np.abs(w - [3.0, -1.0, -1.0]).max() < 0.3                        # and it is near the truth


def test_references_on_generated_data():
    data, truth = synthetic.generate(SyntheticConfig(num_users=300, num_items=100), 0, return_truth=True)
    splits = split_by_user(data, 0.2, 0.2, 0)
    labels = [split.label.numpy() for split in splits]
    refs = references(splits, 1800.0, truth_logits={"valid": np.zeros(len(splits[1])), "test": np.zeros(len(splits[2]))})
    assert list(refs) == ["Bayes", "share LR", "sessions LR", "constant"]
    assert refs["share LR"].parameters == 2 and refs["sessions LR"].parameters == 3
    # The share of the history in the target's category is what the label rewards most.
    assert auc(labels[2], refs["share LR"].test) > 0.65
    rate = labels[0].mean()
    assert logloss(labels[2], refs["constant"].test) == pytest.approx(
        -np.mean(labels[2] * np.log(rate) + (1 - labels[2]) * np.log(1 - rate)))
    assert "Bayes" not in references(splits, 1800.0)
