"""The generator's options for the theme-routing settings: at their defaults the data is what it
was before they existed, and each does what mos/lab/data/synthetic.py documents."""
import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mos.lab.data.config import SyntheticConfig
from mos.lab.data.synthetic import generate

SMALL = SyntheticConfig(num_users=150, num_items=200, num_interests=6)


def _digest(cfg, seed):
    ds, truth = generate(cfg, seed, return_truth=True)
    h = hashlib.sha256()
    for obj in (ds, truth):
        for name, value in sorted(vars(obj).items()):
            if isinstance(value, torch.Tensor):
                h.update(name.encode())
                h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.skipif(np.__version__.rsplit(".", 1)[0] != "2.3", reason="digests taken with numpy 2.3 (CI's pin)")
@pytest.mark.parametrize("cfg,seed,digest", [(SMALL, 3, "cdb711570cac83b1"),
                                             (SyntheticConfig(num_users=400), 0, "d7ce96f4ff922f55")])
def test_the_defaults_draw_the_data_of_before(cfg, seed, digest):
    """Digests of every tensor of the dataset and its truth, taken on the generator before these
    options existed: the settings already studied keep their data draw for draw."""
    assert _digest(cfg, seed) == digest


def test_category_group_coarsens_the_category_only():
    base, _ = generate(SMALL, 3, return_truth=True)
    for group in (2, 6, 7):
        ds, truth = generate(replace(SMALL, category_group=group), 3, return_truth=True)
        interest = truth.item_interest
        assert torch.equal(ds.category_ids, interest[ds.item_ids] // group + 1)
        assert torch.equal(ds.target_category, interest[ds.target_item] // group + 1)
        assert ds.num_categories == (6 - 1) // group + 2 and int(ds.category_ids.max()) < ds.num_categories
        assert torch.equal(ds.item_ids, base.item_ids) and torch.equal(ds.label, base.label)


def test_item_effect_alone_decides_the_null_label():
    """label_item with every history weight 0: equal targets get equal scores whatever the user."""
    cfg = replace(SMALL, label_taste=0.0, label_share=0.0, label_recent=0.0, label_item=1.8, label_bias=1.1)
    ds, truth = generate(cfg, 3, return_truth=True)
    by_item = {}
    for item, score in zip(ds.target_item.tolist(), truth.score.tolist()):
        assert math.isclose(by_item.setdefault(item, score), score, abs_tol=1e-12)
    assert len(set(by_item.values())) > 10
    base = generate(SMALL, 3)
    assert torch.equal(ds.item_ids, base.item_ids)    # the histories are the default ones


def _latest_score(cfg, ds, truth, sample):
    """The label logit with `sim` over the latest session on the target's interest, by loops."""
    user, target = int(ds.sample_user[sample]), int(ds.target_item[sample])
    interest = int(truth.item_interest[target])
    sessions = [s for s in range(len(truth.session_user)) if int(truth.session_user[s]) == user]
    on = [s for s in sessions if int(truth.session_interest[s]) == interest]
    sim = 0.0
    if on:
        lo, hi = int(truth.session_offsets[on[-1]]), int(truth.session_offsets[on[-1] + 1])
        events = [e for e in range(lo, hi) if int(ds.true_interest[e]) == interest]
        if events:
            sim = float(np.mean([float(truth.item_taste[target] @ truth.item_taste[int(ds.item_ids[e])])
                                 for e in events]))
    share = len(on) / len(sessions)
    recent = float(int(truth.session_interest[sessions[-1]]) == interest)
    return cfg.label_taste * sim + cfg.label_share * share + cfg.label_recent * recent - cfg.label_bias


def test_latest_taste_score_follows_the_documented_rule():
    cfg = replace(SMALL, taste_drift=0.7, label_taste_from="latest")
    ds, truth = generate(cfg, 3, return_truth=True)
    rng = np.random.default_rng(0)
    for sample in rng.choice(len(ds), size=60, replace=False).tolist():
        assert math.isclose(_latest_score(cfg, ds, truth, sample), float(truth.score[sample]), abs_tol=1e-9)


def _consecutive_visit_cosine(ds, truth):
    """Mean cosine between the mean item tastes of consecutive sessions of a user on one interest."""
    means, keys = [], []
    for s in range(len(truth.session_user)):
        lo, hi = int(truth.session_offsets[s]), int(truth.session_offsets[s + 1])
        rows = [e for e in range(lo, hi) if int(ds.true_interest[e]) >= 0]
        if rows:
            means.append(truth.item_taste[ds.item_ids[rows]].mean(0))
            keys.append((int(truth.session_user[s]), int(truth.session_interest[s])))
    last, cosines = {}, []
    for key, mean in zip(keys, means):
        if key in last:
            cosines.append(float(torch.nn.functional.cosine_similarity(mean, last[key], dim=0)))
        last[key] = mean
    return float(np.mean(cosines))


def test_taste_drift_moves_the_items_between_returns_to_an_interest():
    """Without drift, returns to an interest pick items of one taste; with drift 0.9 they differ
    more, and the label draw count is unchanged (same positives rate band)."""
    cfg = replace(SMALL, num_users=300)
    still = _consecutive_visit_cosine(*generate(cfg, 3, return_truth=True))
    drifting = _consecutive_visit_cosine(*generate(replace(cfg, taste_drift=0.9), 3, return_truth=True))
    assert drifting < still - 0.1, (still, drifting)


@pytest.mark.parametrize("field,value", [("category_group", 0), ("taste_drift", 1.5), ("taste_drift", -0.1),
                                         ("label_taste_from", "newest")])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"data\.synthetic\.{field}: expected"):
        SyntheticConfig(**{field: value})


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from mos.lab.config_io import load_run_config
    assert load_run_config(str(path), []).models


@pytest.mark.slow
def test_the_settings_rules_hold_on_their_data():
    """The numbers the routing settings' configs were fixed by, from the data alone: the recency
    setting's order-free oracle loses >= 0.04 AUC (and 0.5 drift would not), the null setting's
    Bayes AUC and positive rate match the default setting's, the hidden one has one category."""
    from mos.lab.config_io import load_run_config
    from mos.lab.metrics import auc

    def setting(name):
        cfg = load_run_config(str(ROOT / "configs" / f"profile_{name}.yaml"), []).data
        return cfg.synthetic, cfg.seed

    synth, seed = setting("recency")
    for drift, gap_at_least in ((0.5, None), (synth.taste_drift, 0.04)):
        ds, truth = generate(replace(synth, taste_drift=drift), seed, return_truth=True)
        _, order_free = generate(replace(synth, taste_drift=drift, label_taste_from="all"), seed, return_truth=True)
        gap = auc(ds.label, truth.score) - auc(ds.label, order_free.score)
        assert (gap >= gap_at_least) if gap_at_least else (gap < 0.04), (drift, gap)
    default, _ = generate(SyntheticConfig(num_users=8000), 0, return_truth=True)
    synth, seed = setting("null")
    ds, truth = generate(synth, seed, return_truth=True)
    assert abs(auc(ds.label, truth.score) - 0.829) < 0.002 and abs(float(ds.label.mean()) - 0.334) < 0.002
    assert abs(float(default.label.mean()) - 0.328) < 0.002
    synth, seed = setting("hidden")
    assert generate(synth, seed).num_categories == 2
