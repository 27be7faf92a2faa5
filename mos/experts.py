"""The layer's experts and fusions: what each expert kind builds on the layer, its path in the
forward, and the fusion of their vectors. `MoSLayer` picks the functions once, at construction,
from its config and the expert set it is handed, so its forward runs them without branching.
Internal to the layer package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.jagged import counts_of, offsets_from_lengths, positions_in_segment
from mos_kernels.theme_gather import inverse_of_unique

from .config import EXPERT_KINDS, THEME_RECENCY_BUCKETS, MoSConfig
from .encoder_protocol import build_encoder, run_encoder
from .outputs import MoSOutput, RoutingInfo
from .routing import check_router_result, check_units

if TYPE_CHECKING:     # annotations only: the layer imports this module
    from .layer import MoSLayer


@dataclass
class Batch:
    """One forward's checked inputs, and what the theme path leaves for the output.

    Attributes:
        values, target: [T, d] jagged tokens and [B, d] targets, as the global expert reads them.
        extras_values, extras_target: the same as the other experts read them (detached under
            boosted training).
        routing_values, routing_target: what the router and the theme summary's query read:
            the caller's `routing_values`/`routing_target`, else extras_values/extras_target.
        offsets: [B+1] the examples' rows; sessions: `mos_kernels.Sessions` of the batch.
        max_len: the longest history in tokens.
        aux: the router's auxiliary losses (zeros until the theme path runs).
        routing: the `RoutingInfo` the theme path leaves (None without theme experts).
    """

    values: torch.Tensor
    target: torch.Tensor
    extras_values: torch.Tensor
    extras_target: torch.Tensor
    routing_values: torch.Tensor
    routing_target: torch.Tensor
    offsets: torch.Tensor
    sessions: mk.Sessions
    max_len: int
    aux: Dict[str, torch.Tensor]
    routing: Optional[RoutingInfo] = None


def check_experts(experts) -> tuple:
    """The expert kinds in EXPERT_KINDS order, whatever order they were named in (the fusion's
    weight columns follow it, so a state dict means one thing)."""
    kinds = tuple(experts) if isinstance(experts, (tuple, list)) else None
    if not kinds or len(set(kinds)) != len(kinds) or any(kind not in EXPERT_KINDS for kind in kinds):
        raise ValueError(f"experts: expected a non-empty list of distinct kinds from {list(EXPERT_KINDS)}, "
                         f"got {experts!r}")
    return tuple(kind for kind in EXPERT_KINDS if kind in kinds)


def as_given(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself: how the other experts read the inputs under joint training."""
    return tensor


# ---- the experts: what each kind builds, and its path in the forward ---------------------------

def _build_global(layer: "MoSLayer", cfg: MoSConfig, encoder) -> None:
    layer.global_expert = build_encoder(encoder, 1)


def _build_themes(layer: "MoSLayer", cfg: MoSConfig, encoder) -> None:
    layer.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.num_themes, cfg.dim), dim=-1))
    layer.theme_experts = build_encoder(encoder, cfg.num_themes)
    layer.theme_query = nn.Linear(cfg.dim, cfg.dim)
    if cfg.theme_mass:
        # Zero at initialisation: the layer starts as the one without theme mass.
        layer.mass_logit = nn.Parameter(torch.zeros(()))
        layer.mass_value = nn.Parameter(torch.zeros(cfg.num_themes, cfg.dim))
    if cfg.theme_recency:
        # Zero at initialisation and drawn from no random stream: the layer starts as the one
        # without, with the same initial weights everywhere else.
        layer.theme_recency_embedding = nn.Parameter(torch.zeros(THEME_RECENCY_BUCKETS, cfg.dim))


def _build_short(layer: "MoSLayer", cfg: MoSConfig, encoder) -> None:
    layer.short_expert = build_encoder(encoder, 1)


def _global_path(layer: "MoSLayer", batch: Batch) -> torch.Tensor:
    """The global expert over the whole history's tokens."""
    return run_encoder(layer.global_expert, batch.values, batch.target, batch.offsets, max_len=batch.max_len,
                       validate=layer.config.validate_inputs, num_experts=1)[0]


def _global_sessions_path(layer: "MoSLayer", batch: Batch) -> torch.Tensor:
    """`global_scope="sessions"`: the global expert over the history's session vectors."""
    sessions = batch.sessions
    pooled = mk.session_pool(batch.values, sessions.session_offsets, backend=layer.backends["session_pool"])
    return run_encoder(layer.global_expert, pooled, batch.target, sessions.example_session_offsets,
                       validate=layer.config.validate_inputs, num_experts=1)[0]


def _short_path(layer: "MoSLayer", batch: Batch) -> torch.Tensor:
    """The short-term expert over the tokens of each example's last `short_sessions` sessions."""
    short_index, short_offsets = _recent_sessions(batch.offsets, batch.sessions, layer.config.short_sessions)
    num_tokens = batch.values.shape[0]
    return run_encoder(layer.short_expert, batch.extras_values, batch.extras_target, short_offsets,
                       gather_index=short_index, inverse_index=inverse_of_unique(short_index, num_tokens),
                       max_len=batch.max_len, gather_backend=layer.backends["theme_gather"],
                       validate=layer.config.validate_inputs, num_experts=1)[0]


def _theme_path(layer: "MoSLayer", batch: Batch) -> torch.Tensor:
    """Steps 2-4 and the theme half of 5-6: route, dispatch, run the K experts, summarise. Leaves
    the router's auxiliary losses and the `RoutingInfo` on `batch`."""
    cfg = layer.config
    values, target, offsets = batch.extras_values, batch.extras_target, batch.offsets
    num_examples, num_tokens = offsets.numel() - 1, values.shape[0]
    # A caller's router or routing unit gets its result's data checked too (the built-in ones
    # make valid results by construction: no sync on their path).
    check_data = cfg.validate_inputs and layer.custom_routing
    units = check_units(layer.routing_unit(offsets, batch.sessions, num_tokens), offsets, num_tokens, data=check_data)
    _, routing, batch.aux = check_router_result(
        layer.router(batch.routing_values, units, layer.prototypes, temperature=cfg.temperature, top_k=cfg.top_k,
                     backends=layer.backends, training=layer.training),
        units.session_offsets.numel() - 1, cfg.num_themes, cfg.top_k, data=check_data)
    values = layer._theme_recency(layer, values, routing.themes[:, 0], units)
    dispatch = mk.theme_dispatch(routing.themes, routing.gate, units.session_offsets, units.session_example,
                                 num_examples=num_examples, num_themes=cfg.num_themes,
                                 max_theme_tokens=cfg.max_theme_tokens, num_tokens=num_tokens,
                                 example_session_offsets=units.example_session_offsets,
                                 backend=layer.backends["theme_dispatch"])
    # A theme subsequence is never longer than its example.
    theme_len = batch.max_len if cfg.max_theme_tokens is None else min(batch.max_len, cfg.max_theme_tokens)
    e_theme = run_encoder(layer.theme_experts, values, target, dispatch.theme_offsets,
                          gather_index=dispatch.gather_index, row_gate=dispatch.row_gate,
                          inverse_index=dispatch.inverse_index, max_len=theme_len,
                          gather_backend=layer.backends["theme_gather"], validate=cfg.validate_inputs,
                          num_experts=cfg.num_themes)
    segment_lengths = dispatch.segment_lengths
    batch.routing = RoutingInfo(units.session_offsets, units.session_example, routing.themes[:, 0], routing.themes,
                                routing.probs.detach(), segment_lengths)
    return layer._theme_summary(e_theme, batch.routing_target, segment_lengths)


def without_theme_recency(layer: "MoSLayer", values, themes, units):
    """The theme experts' tokens unchanged (`theme_recency=False`)."""
    return values


def with_theme_recency(layer: "MoSLayer", values, themes, units):
    """`theme_recency`: each token plus the embedding of its routing unit's rank among the units
    its example sent to the same theme, counted from the latest (clipped to the last bucket).
    A unit is a session (`route_sessions`), or a token under `route_tokens`. Every token gets
    it, also one that `max_theme_tokens` later drops (which keeps the newest, so the ranks the
    expert sees still start at 0).

    values: [T, d]; themes: [S] int64, each unit's theme (top_k = 1); units: the
    `mos_kernels.Sessions` that routed. Returns [T, d] in values' dtype."""
    num_examples = units.example_session_offsets.numel() - 1
    rank = sessions_after_on_theme(themes, units.session_example, layer.config.num_themes, num_examples)
    lengths = units.session_offsets[1:] - units.session_offsets[:-1]
    per_token = torch.repeat_interleave(rank.clamp(max=THEME_RECENCY_BUCKETS - 1), lengths,
                                        output_size=values.shape[0])
    return values + layer.theme_recency_embedding[per_token].to(values.dtype)


def sessions_after_on_theme(themes: torch.Tensor, session_example: torch.Tensor, num_themes: int,
                            num_examples: int) -> torch.Tensor:
    """[S] int64: for each routing unit (in example order, oldest first within an example, as
    `mos_kernels.sessionize` lists them), how many later units of the same example went to the
    same theme. themes and session_example: [S] int64, in [0, num_themes) and [0, num_examples)."""
    group = session_example * num_themes + themes
    order = torch.argsort(group, stable=True)          # stable: time order within each group
    counts = counts_of(group, num_examples * num_themes)   # no data-dependent size, no device sync
    first = torch.cumsum(counts, 0) - counts           # where each group starts in `order`
    sorted_group = group[order]
    position = torch.arange(group.numel(), device=group.device) - first[sorted_group]
    rank = torch.empty_like(group)
    rank[order] = counts[sorted_group] - 1 - position
    return rank


def without_theme_mass(layer: "MoSLayer", e_theme, logits, segment_lengths):
    """The theme summary's inputs unchanged (`theme_mass=False`)."""
    return e_theme, logits


def with_theme_mass(layer: "MoSLayer", e_theme, logits, segment_lengths):
    """`theme_mass`: how much of the history a theme holds, m = log(1 + tokens of (theme, example)),
    enters the summary twice: as a logit term a * m (the heavier themes weigh more) and as a value
    term m * v_k added to each theme expert's vector (so the softmax average, scale-free by
    itself, carries the mass). a and v start at zero."""
    mass = torch.log1p(segment_lengths.to(e_theme.dtype))                 # [K, B]
    e_theme = e_theme + mass[:, :, None] * layer.mass_value[:, None, :].to(e_theme.dtype)
    return e_theme, logits + layer.mass_logit.to(logits.dtype) * mass.t()


BUILD = {"global": _build_global, "short": _build_short, "themes": _build_themes}
PATHS = {"global": _global_path, "short": _short_path, "themes": _theme_path}
GLOBAL_PATHS = {"tokens": _global_path, "sessions": _global_sessions_path}
# Fixed orders, whatever order a caller names the experts in: parameters are drawn from the
# random stream in BUILD_ORDER (the global expert first, as a backbone's encoder would be) and
# the paths run in RUN_ORDER (the random router's draws come before any dropout's).
BUILD_ORDER = ("global", "themes", "short")
RUN_ORDER = ("themes", "global", "short")


# ---- fusion -------------------------------------------------------------------------------------

def _residual_fusion(layer: "MoSLayer", outputs, aux_loss, aux, routing) -> MoSOutput:
    """output = e_global + dropout(W_x [e_short; e_themes]), W_x zero at initialisation."""
    base, extras = outputs["global"], _extras_term(layer, outputs)
    return MoSOutput(base + extras, aux_loss, aux, routing, base, extras, layer.config.extras_detach_inputs)


def _global_only_fusion(layer: "MoSLayer", outputs, aux_loss, aux, routing) -> MoSOutput:
    """The residual fusion with no other expert: the global expert's vector."""
    return MoSOutput(outputs["global"], aux_loss, aux, routing, outputs["global"], None,
                     layer.config.extras_detach_inputs)


def _extras_only_fusion(layer: "MoSLayer", outputs, aux_loss, aux, routing) -> MoSOutput:
    """The residual fusion without a global expert: the other experts' term alone."""
    extras = _extras_term(layer, outputs)
    return MoSOutput(extras, aux_loss, aux, routing, None, extras, layer.config.extras_detach_inputs)


def _extras_term(layer: "MoSLayer", outputs) -> torch.Tensor:
    extras = torch.cat([outputs[kind] for kind in layer.experts if kind != "global"], dim=1)
    return F.dropout(layer.extras_out(extras), layer.config.dropout, layer.training)


def _concat_fusion(layer: "MoSLayer", outputs, aux_loss, aux, routing) -> MoSOutput:
    """output = dropout(W_o [e_global; e_short; e_themes])."""
    fused = layer.out(torch.cat([outputs[kind] for kind in layer.experts], dim=1))
    return MoSOutput(F.dropout(fused, layer.config.dropout, layer.training), aux_loss, aux, routing,
                     extras_detached=layer.config.extras_detach_inputs)


def fusion_for(fusion: str, experts: tuple):
    """The fusion function of `fusion` for this expert set (chosen once, at construction)."""
    if fusion == "concat":
        return _concat_fusion
    has_global, has_extras = "global" in experts, len(experts) > ("global" in experts)
    return {(True, True): _residual_fusion, (True, False): _global_only_fusion,
            (False, True): _extras_only_fusion}[has_global, has_extras]


def _recent_sessions(offsets: torch.Tensor, sessions: mk.Sessions, count: int):
    """Gather index and offsets of the tokens in each example's last `count` sessions."""
    eso = sessions.example_session_offsets
    first = torch.maximum(eso[1:] - count, eso[:-1])
    start = sessions.session_offsets[first]
    short_offsets = offsets_from_lengths(offsets[1:] - start, check=False)
    pos = positions_in_segment(short_offsets, check=False)
    index = torch.repeat_interleave(start, short_offsets[1:] - short_offsets[:-1], output_size=pos.numel()) + pos
    return index, short_offsets
