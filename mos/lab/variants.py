"""Named model variants: the baselines, MoS and its ablations, as overrides of one ModelConfig.

`models: [backbone, mos, gshard, ...]` in a config names these; every variant shares the
embeddings, the head, the encoder (`model.mos.encoder`, width, heads) and the training loop,
so runs differ only in what the name says. (`mos.lab.config` imports this table to check
`models`, so this module names its ModelConfig in annotations only, without importing it.)
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:    # for type checkers only: at run time mos.lab.config imports this module
    from mos.lab.config import ModelConfig

VARIANTS: Dict[str, dict] = {
    "backbone": {"kind": "backbone"},
    "gshard": {"kind": "gshard"},
    "dselect_k": {"kind": "dselect_k"},
    "expert_choice": {"kind": "expert_choice"},
    # The stacking control: a second plain encoder as the correction (what stacking alone gives).
    "stacked_backbone": {"kind": "stacked_backbone"},
    "mos": {"kind": "mos"},
    "mos_no_global": {"kind": "mos", "training": "joint", "ablation": {"experts": ("short", "themes")}},
    "mos_no_short": {"kind": "mos", "ablation": {"experts": ("global", "themes")}},
    "mos_no_themes": {"kind": "mos", "ablation": {"experts": ("global", "short")}},
    "mos_random_routing": {"kind": "mos", "ablation": {"router": "random"}},
    "mos_token_routing": {"kind": "mos", "ablation": {"routing_unit": "token"}},
    "mos_global_sessions": {"kind": "mos", "mos": {"global_scope": "sessions"}},
    # The theme summary sees how much of the history each theme holds (MoSConfig.theme_mass).
    "mos_theme_mass": {"kind": "mos", "mos": {"theme_mass": True}},
    # Each theme expert's tokens carry "sessions ago on this theme" (MoSConfig.theme_recency), and
    # its matched random-routing control (the same embedding on random themes).
    "mos_theme_recency": {"kind": "mos", "mos": {"theme_recency": True}},
    "mos_random_routing_theme_recency": {"kind": "mos", "mos": {"theme_recency": True},
                                         "ablation": {"router": "random"}},
    # The router learns its themes on an item embedding of its own, from which items share
    # sessions (model.routing_embedding, MoSAblation.session_consistency).
    "mos_session_router": {"kind": "mos", "routing_embedding": True, "ablation": {"session_consistency": True}},
    # Its controls: the same routing embedding with random themes (the matched random-routing
    # control: the embedding's capacity without learned routing), and learned routing on it
    # without the session-consistency loss (what the loss adds).
    "mos_random_routing_embedding": {"kind": "mos", "routing_embedding": True, "ablation": {"router": "random"}},
    "mos_routing_embedding": {"kind": "mos", "routing_embedding": True},
    # The design choices that keep MoS at least as good as its backbone, each undone alone.
    "mos_joint": {"kind": "mos", "training": "joint"},
    "mos_concat_fusion": {"kind": "mos", "training": "joint", "mos": {"fusion": "concat"}},
    "mos_vq_to_embeddings": {"kind": "mos", "training": "joint",
                             "ablation": {"vq_detach_tokens": False}},
    "mos_no_aux_losses": {"kind": "mos", "mos": {"commitment_weight": 0.0, "codebook_weight": 0.0,
                                                 "load_balance_weight": 0.0}},
    "mos_joint_extras_dropout": {"kind": "mos", "training": "joint", "mos": {"dropout": 0.2}},
    # The session router and its matched control trained end to end the same way (one loss, the
    # other experts' term dropped at rate 0.2), so the head can learn to read the theme path.
    "mos_session_router_joint": {"kind": "mos", "training": "joint", "routing_embedding": True,
                                 "mos": {"dropout": 0.2}, "ablation": {"session_consistency": True}},
    "mos_random_routing_embedding_joint": {"kind": "mos", "training": "joint", "routing_embedding": True,
                                           "mos": {"dropout": 0.2}, "ablation": {"router": "random"}},
    # All undone: the layer as it was first reconstructed.
    "mos_concat_vq_to_embeddings": {"kind": "mos", "training": "joint",
                                    "mos": {"fusion": "concat"}, "ablation": {"vq_detach_tokens": False}},
}


def random_routing_control(name: str) -> Optional[str]:
    """The variant that differs from `name` only in routing at random (so without the learned
    router's own options), or None: the matched control of a learned router."""
    overrides = VARIANTS[name]
    ablation = dict(overrides.get("ablation", {}))
    if ablation.get("router") == "random" or "themes" not in ablation.get("experts", ("themes",)):
        return None
    ablation = {key: value for key, value in ablation.items() if key not in LEARNED_ROUTER_OPTIONS}
    want = {**overrides, "ablation": {**ablation, "router": "random"}}
    return next((other for other, candidate in VARIANTS.items() if candidate == want), None)


def boosted_twin(name: str) -> Optional[str]:
    """The boosted variant that jointly trained `name` retests, or None: the variant whose overrides
    are `name`'s without `training: joint` and without the extras dropout (`mos.dropout`) that joint
    training adds against overfitting. It is what `name` would replace if validation preferred it."""
    overrides = VARIANTS.get(name, {})
    if overrides.get("training") != "joint":
        return None
    want = _plain_boosted(overrides)
    return next((other for other, candidate in VARIANTS.items()
                 if candidate.get("training", "boosted") == "boosted" and _plain_boosted(candidate) == want), None)


def _plain_boosted(overrides: dict) -> dict:
    """`overrides` without the training mode and the extras dropout (an empty `mos` dropped)."""
    layer = {key: value for key, value in overrides.get("mos", {}).items() if key != "dropout"}
    kept = {key: value for key, value in overrides.items() if key not in ("training", "mos")}
    return kept | ({"mos": layer} if layer else {})


# Options of the learned router alone, which a random router does without.
LEARNED_ROUTER_OPTIONS = ("session_consistency", "vq_detach_tokens")


def variant_config(base: "ModelConfig", name: str) -> "ModelConfig":
    """`base` with variant `name`'s overrides (the dataclass checks run again)."""
    if name not in VARIANTS:
        raise ValueError(f"models[]: expected one of {list(VARIANTS)}, got {name!r}")
    return _overridden(base, VARIANTS[name])


def _overridden(section, overrides: dict):
    """`section` with `overrides`; a dict value overrides the nested section of that name."""
    changes = {name: _overridden(getattr(section, name), value) if isinstance(value, dict) else value
               for name, value in overrides.items()}
    return replace(section, **changes)
