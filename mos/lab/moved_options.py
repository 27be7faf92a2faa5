"""Options that moved to another section: an old key is refused with the key it moved to.

A config file, a `--set` or a keyword written for an earlier layout must not be silently
ignored, nor fail with a bare "unknown key": the error names where the option lives now.
Checkpoints written before a move still load (`migrate` moves their keys).
"""
from __future__ import annotations

import functools

from mos.config import REMOVED, RENAMED

_ABLATION = ("router", "routing_unit", "experts", "vq_detach_tokens")

_SYNTHETIC = ("num_users", "num_items", "num_interests", "interests_per_user", "sessions_per_user",
              "session_length", "targets_per_user", "noise", "taste_dim", "taste_concentration",
              "popularity_exponent", "event_gap_mean", "session_gap_mean", "target_own_interest",
              "label_taste", "label_share", "label_recent", "label_bias")
_LOGS = ("user_column", "item_column", "time_column", "label_column", "rating_column", "category_column",
         "label_source", "rating_threshold", "negatives", "history", "min_history", "drop_duplicates")
# Old dotted key -> the dotted key it moved to. The layer's renamed keywords (`mos.config.RENAMED`:
# "capacity", the MoE baselines' word, now max_theme_tokens) sit under model.mos in a config
# file; the ablation options were first at model.mos, then at model.mos.ablation, and are the
# lab's model.ablation now (they choose the parts handed to the layer).
MOVED = {
    **{f"data.{name}": f"data.synthetic.{name}" for name in _SYNTHETIC},
    **{f"data.{name}": f"data.logs.{name}" for name in _LOGS},
    **{f"model.mos.{old}": f"model.mos.{new}" for old, new in RENAMED.items()},
    **{f"model.mos.{name}": f"model.ablation.{name}" for name in _ABLATION},
    **{f"model.mos.ablation.{name}": f"model.ablation.{name}" for name in _ABLATION},
    "model.mos.ablation.extras_detach_inputs": "model.mos.extras_detach_inputs",
    # Boosted training now applies to every stacked kind, not to MoS alone.
    "model.mos_training": "model.training",
}


# Options that are gone, with why, and the one value of each that meant what the code does now
# (a checkpoint written with it still loads; one written with another value cannot be rebuilt).
REMOVED_KEYS = {f"model.mos.{name}": why for name, why in REMOVED.items()}
REMOVED_AS_NOW = {"model.mos.readout": "target"}

# Options added later, with the value that gives the behaviour of a tree written before they
# existed (an earlier checkpoint's model had no recency embedding).
ADDED = {"model.recency": "none"}
# Options added after the first routing-setting studies had finished runs: at these values a run
# computes what it computed before they existed, so they stay out of its fingerprint
# (`mos.lab.profiling.runs.fingerprint`) and a finished run still counts.
LATER_AT_DEFAULT = {"model.routing_embedding": False, "model.ablation.session_consistency": False,
                    "model.mos.consistency_weight": 1.0, "model.mos.theme_recency": False,
                    "model.mos.sdim_rounds": 16, "model.mos.sdim_bits": 3, "model.mos.mamba_state": 16}
# Options added later whose defaults are the behaviour of before (the generator's routing-setting
# options draw the old data at their defaults; the layer without theme mass is the old layer):
# a tree without them gets them at those values.
ADDED_AT_DEFAULT = {"data.synthetic.category_group": 1, "data.synthetic.taste_drift": 0.0,
                    "data.synthetic.label_taste_from": "all", "data.synthetic.label_item": 0.0,
                    "model.mos.theme_mass": False, "model.mos.attention_mass": False,
                    **LATER_AT_DEFAULT}

# State-dict keys of an earlier model layout -> their names now (prefix renames).
RENAMED_STATE = {"head.": "head.mlp.", "serve_extras": "serve_correction"}


def moved_key(key: str):
    """The key `key` moved to, or None."""
    return MOVED.get(key)


def removed_key(key: str):
    """Why the option `key` is gone, or None."""
    return REMOVED_KEYS.get(key)


def refuse_moved(section: str):
    """Class decorator for a config dataclass at dotted `section` ("data", "model.mos"): a keyword
    naming a field that moved out of it raises a TypeError naming the new key."""
    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for name in kwargs:
                new = MOVED.get(f"{section}.{name}")
                if new is not None:
                    raise TypeError(f"{cls.__name__}.{name}: {_where_now(section, new)}")
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls
    return decorate


def _where_now(section: str, new: str) -> str:
    parent, _, leaf = new.rpartition(".")
    if parent == section:
        return f"renamed {leaf} ({new})"
    sub = parent[len(section) + 1:]
    return f"moved to {new} (a keyword: {sub}={{{leaf!r}: ...}})"


def migrate(tree: dict) -> dict:
    """A config tree written before the moves (a checkpoint's) with every moved key at its new
    place and every option added since at the value of the time; `tree` is changed in place and
    returned."""
    for key, value in ADDED.items():
        *path, leaf = key.split(".")
        node = tree
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node and _written_before(node):
            node[leaf] = value
    for old, new in MOVED.items():
        *path, leaf = old.split(".")
        node = tree
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_path, new_leaf = new.split(".")
        target = tree
        for name in new_path:
            target = target.setdefault(name, {})
        target[new_leaf] = value
    for key, value in REMOVED_AS_NOW.items():
        *path, leaf = key.split(".")
        node = _node(tree, path)
        if isinstance(node, dict) and node.get(leaf) == value:
            del node[leaf]
    # A section whose keys all moved out (model.mos.ablation) goes with them.
    for old in {key.rpartition(".")[0] for key in MOVED}:
        *path, leaf = old.split(".")
        node = _node(tree, path)
        if isinstance(node, dict) and node.get(leaf) == {}:
            del node[leaf]
    for key, value in ADDED_AT_DEFAULT.items():
        *path, leaf = key.split(".")
        node = tree
        for name in path:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return tree


def drop_later_options(tree: dict, *, only_at_default: bool = False) -> dict:
    """Remove the options of `LATER_AT_DEFAULT` from a run's config tree, in place (and return it):
    every one (a tree as an earlier layout wrote it), or only those at their default value (what a
    run's fingerprint leaves out). An option the tree lacks is skipped."""
    for option, default in LATER_AT_DEFAULT.items():
        *path, leaf = option.split(".")
        node = _node(tree, path)
        if isinstance(node, dict) and leaf in node and (not only_at_default or node[leaf] == default):
            del node[leaf]
    return tree


def _node(tree: dict, path: list):
    node = tree
    for name in path:
        node = node.get(name) if isinstance(node, dict) else None
    return node


def _written_before(model_section: dict) -> bool:
    """A model section written before the options of `ADDED` existed: it still says mos_training."""
    return "mos_training" in model_section


def migrate_state_dict(state: dict) -> dict:
    """A model state dict of an earlier layout with its keys renamed as they are now (a new dict)."""
    out = {}
    for key, value in state.items():
        for old, new in RENAMED_STATE.items():
            if key.startswith(old) and not key.startswith(new):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
