"""The parts of MoS's theme path a caller can swap: the router and the routing unit.

`MoSLayer(router=..., routing_unit=...)` takes them; the defaults are the layer itself (learned
prototypes routing whole sessions). Other parts exist to measure what the defaults add: the
CTR lab's ablations (`mos.lab.variants`) hand the layer `RandomRouter()` or `route_tokens`, so
the layer's forward runs whatever it was given and never branches on an ablation.

A router is any callable `router(values, units, prototypes, *, temperature, top_k, backends,
training) -> (pooled, routing, aux)`:
    values: [T, d] the tokens it routes (jagged rows of the batch);
    units: `mos_kernels.Sessions`, the routing units (rows of `values` per unit);
    prototypes: [K, d] the layer's theme prototypes (a router may ignore them);
    returns pooled [S, d] (the units' mean vectors, or None), a `mos_kernels.Routing` over the
    S units, and the auxiliary losses {"commitment", "codebook", "load_balance"} as float32
    scalars (zeros where the router has none; a missing one counts as zero), plus
    "consistency" from a router that has a session-consistency loss.
A routing unit is any callable `routing_unit(offsets, sessions, num_tokens) -> Sessions`.
The layer checks what a caller's router or routing unit returns (`check_router_result`,
`check_units`): shapes always, values too while `MoSConfig.validate_inputs` is on; the built-in
ones make valid results by construction and pay no sync for the check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

import mos_kernels as mk
from mos_kernels.checks import FLOAT_DTYPES, check_finite, check_offsets, check_tensor, reads_data
from mos_kernels.jagged import segment_ids, counts_of
from mos_kernels.routing import normalized
from mos_kernels.theme_dispatch import check_example_session_offsets, check_session_examples, check_themes

AUX_LOSSES = ("commitment", "codebook", "load_balance")
RouterResult = Tuple[Optional[torch.Tensor], mk.Routing, Dict[str, torch.Tensor]]


def no_aux(like: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every auxiliary loss as a float32 zero on `like`'s device."""
    return {name: like.new_zeros((), dtype=torch.float32) for name in AUX_LOSSES}


@dataclass(frozen=True)
class LearnedRouter:
    """The MoS router: each unit's mean vector scored against the K prototypes by cosine / tau,
    top-k themes with a straight-through gate (`mos_kernels.session_pool_route`, pooling and
    routing fused); in training, the VQ commitment and codebook losses and the Switch load
    balance (docs/design.md, step 3).

    Attributes:
        vq_detach_tokens: the auxiliary losses see the pooled units detached, so they move the
            prototypes and never the item embeddings the target, the global expert and the head
            share (True). The task loss still reaches the embeddings through the gate.
        session_consistency: in training, also return `session_consistency_loss` ("consistency"):
            the tokens of one unit should fall in one theme, the themes be used evenly. It reaches
            the tokens the router reads whatever `vq_detach_tokens` says: its job is to shape a
            representation (give the layer `routing_values` of their own, so that it is not the
            one the backbone reads) (False).
    """

    vq_detach_tokens: bool = True
    session_consistency: bool = False

    def __call__(self, values, units, prototypes, *, temperature, top_k, backends, training) -> RouterResult:
        pooled, routing = mk.session_pool_route(values, units.session_offsets, prototypes, temperature=temperature,
                                                top_k=top_k, backend=backends["session_pool_route"])
        # The auxiliary losses only train: an evaluating layer does not spend work on them.
        if not training:
            return pooled, routing, no_aux(values)
        aux = aux_losses(pooled, prototypes, routing, temperature, self.vq_detach_tokens)
        if self.session_consistency:
            aux["consistency"] = session_consistency_loss(values, units.session_offsets, prototypes, temperature)
        return pooled, routing, aux


@dataclass(frozen=True)
class RandomRouter:
    """Uniformly random distinct themes per unit, drawn anew every call from torch's generator:
    the control that shows what learning the routing adds. A constant gate of 1, uniform
    probabilities, no auxiliary loss; the prototypes are not read."""

    def __call__(self, values, units, prototypes, *, temperature, top_k, backends, training) -> RouterResult:
        num_units, num_themes = units.num_sessions, prototypes.shape[0]
        device = values.device
        themes = torch.rand(num_units, num_themes, device=device).argsort(dim=1)[:, :top_k]
        probs = torch.full((num_units, num_themes), 1.0 / num_themes, device=device)
        gate = torch.ones((num_units, top_k), dtype=values.dtype, device=device)
        routing = mk.Routing(themes=themes, gate=gate, probs=probs, scores=torch.zeros_like(probs))
        return None, routing, no_aux(values)


def check_units(units, offsets: torch.Tensor, num_tokens: int, *, data: bool) -> mk.Sessions:
    """A routing unit's result, checked: `mos_kernels.Sessions` over the batch's num_tokens rows and
    its examples (offsets [B+1]), in example order. Shapes and dtypes always; with `data` the
    values too (a sync each), as `theme_dispatch` checks them, and each unit's rows inside its
    example's. Raises TypeError / ValueError naming `routing_unit` and the field."""
    if not isinstance(units, mk.Sessions):
        raise TypeError(f"routing_unit: expected it to return mos_kernels.Sessions, got {type(units).__name__}")
    num_examples = offsets.numel() - 1
    with mk.data_checks(data):
        try:
            check_offsets("session_offsets", units.session_offsets, total=num_tokens)
            num_units = units.session_offsets.numel() - 1
            check_tensor("session_example", units.session_example, ndim=1, dtypes=(torch.int64,),
                         device=units.session_offsets.device)
            if units.session_example.numel() != num_units:
                raise ValueError(f"session_example: expected {num_units} entries (one per unit), "
                                 f"got {units.session_example.numel()}")
            if reads_data() and num_units:
                check_session_examples(units.session_example, num_examples)
                _check_units_inside_examples(units, offsets)
            check_example_session_offsets(units.example_session_offsets, units.session_example, num_examples)
        except (TypeError, ValueError) as err:
            raise type(err)(f"routing_unit: returned Sessions whose {err}") from err
    return units


def _check_units_inside_examples(units: mk.Sessions, offsets: torch.Tensor) -> None:
    """A unit spanning two examples would send one example's tokens into the other's segments."""
    example = units.session_example
    starts, ends = units.session_offsets[:-1], units.session_offsets[1:]
    outside = (starts < offsets[example]) | (ends > offsets[example + 1])
    if bool(outside.any()):
        unit = int(outside.nonzero()[0, 0])
        raise ValueError(f"session_offsets: expected each unit's rows inside its example's, got unit {unit} "
                         f"(rows {int(starts[unit])}:{int(ends[unit])}) outside example {int(example[unit])} "
                         f"(rows {int(offsets[example[unit]])}:{int(offsets[example[unit] + 1])})")


def check_router_result(result, num_units: int, num_themes: int, top_k: int, *, data: bool) -> RouterResult:
    """A router's result, checked: (pooled or None, `mos_kernels.Routing`, dict of losses) with
    themes [S, top_k] int64 and gate [S, top_k] float for the S units. With `data` also the
    themes as `theme_dispatch` checks them and a finite gate (a sync each). Raises TypeError /
    ValueError naming `router` and the field."""
    if not isinstance(result, tuple) or len(result) != 3:
        got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise TypeError(f"router: expected it to return (pooled or None, mos_kernels.Routing, aux losses), got {got}")
    _, routing, aux = result
    if not isinstance(routing, mk.Routing):
        raise TypeError(f"router: expected a mos_kernels.Routing second, got {type(routing).__name__}")
    if not isinstance(aux, dict):
        raise TypeError(f"router: expected a dict of auxiliary losses third, got {type(aux).__name__}")
    themes, gate = routing.themes, routing.gate
    check_tensor("router: themes", themes, ndim=2, dtypes=(torch.int64,))
    check_tensor("router: gate", gate, ndim=2, dtypes=FLOAT_DTYPES, device=themes.device)
    for name, tensor in (("themes", themes), ("gate", gate)):
        if tuple(tensor.shape) != (num_units, top_k):
            raise ValueError(f"router: {name}: expected shape {[num_units, top_k]} (one row per routing unit, "
                             f"top_k choices), got {list(tensor.shape)}")
    with mk.data_checks(data):
        if reads_data() and num_units:
            try:
                check_themes(themes, num_themes)
            except ValueError as err:
                raise ValueError(f"router: {err}") from err
            check_finite("router: gate", gate)
    return result


def route_sessions(offsets: torch.Tensor, sessions: mk.Sessions, num_tokens: int) -> mk.Sessions:
    """The MoS routing unit: whole sessions (the layer's `sessions` as they are)."""
    return sessions


def route_tokens(offsets: torch.Tensor, sessions: mk.Sessions, num_tokens: int) -> mk.Sessions:
    """Every token its own unit: what routing whole sessions adds over routing items."""
    example = segment_ids(offsets, num_tokens, check=False)
    return mk.Sessions(torch.arange(num_tokens + 1, device=offsets.device), example, offsets)


def aux_losses(pooled, prototypes, routing, temperature: float, detach_tokens: bool) -> Dict[str, torch.Tensor]:
    """VQ commitment and codebook losses on the unit sphere (routing is cosine), Switch load balance
    (Fedus et al. 2021: K * sum_k fraction_k * mean prob_k).

    `detach_tokens`: the pooled units enter detached, so the losses move the prototypes only
    (the load balance then reads probabilities recomputed from the detached units)."""
    num_units, num_themes = routing.probs.shape
    h = normalized(pooled.detach() if detach_tokens else pooled)
    units = normalized(prototypes)
    c = units[routing.themes[:, 0]]
    denom = max(num_units, 1)
    commitment = ((h - c.detach()) ** 2).sum() / denom
    codebook = ((h.detach() - c) ** 2).sum() / denom
    chosen = counts_of(routing.themes.reshape(-1), num_themes).float()
    fraction = chosen / max(routing.themes.numel(), 1)
    probs = torch.softmax((h @ units.t()).float() / temperature, dim=1) if detach_tokens else routing.probs
    load_balance = num_themes * (fraction * probs.sum(0) / denom).sum()
    return {"commitment": commitment, "codebook": codebook, "load_balance": load_balance}


def session_consistency_loss(values: torch.Tensor, unit_offsets: torch.Tensor, prototypes: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """log K - I(z; z'): how far the theme of a token and the theme of the other tokens of its
    unit (session) are from sharing log K nats of information. A float32 scalar in [0, log K].

    The mutual-information objective of Invariant Information Clustering (Ji et al., ICCV 2019),
    with a token and its session-mates as the two views [ours: the pairing]: sessions hold one
    interest, so co-occurrence in a session is the evidence of a theme that item IDs alone do not
    give. I = H(z) - H(z | z') rewards themes used evenly (no collapse to one theme) and tokens of
    one session agreeing; it reaches `values` and `prototypes`.

    values [T, d] (any float dtype), unit_offsets [U+1] int64 over values' rows, prototypes [K, d].
    p_t = softmax(cos(values_t, prototypes) / temperature) [T, K]; q_t is the mean p of the other
    tokens of t's unit; P = sym(mean_t p_t q_t^T) over tokens whose unit has >= 2 tokens (0 if none).
    """
    # In fp32 whatever autocast says: in fp16 the clamp below rounds to 0 and 0 * log 0 is NaN.
    with torch.autocast(values.device.type, enabled=False):
        return _session_consistency(values, unit_offsets, prototypes, temperature)


def _session_consistency(values, unit_offsets, prototypes, temperature) -> torch.Tensor:
    num_tokens, num_themes = values.shape[0], prototypes.shape[0]
    p = torch.softmax(normalized(values) @ normalized(prototypes).t() / temperature, dim=1)      # [T, K] fp32
    unit = segment_ids(unit_offsets, num_tokens, check=False)
    size = (unit_offsets[1:] - unit_offsets[:-1])[unit]                                          # [T]
    sums = p.new_zeros(unit_offsets.numel() - 1, num_themes).index_add_(0, unit, p)
    paired = size >= 2
    p, q = p[paired], (sums[unit][paired] - p[paired]) / (size[paired, None] - 1).float()
    if p.shape[0] == 0:
        return (p.sum() + q.sum()) * 0.0      # a zero that keeps the graph (reaches the prototypes)
    joint = p.t() @ q / p.shape[0]
    joint = ((joint + joint.t()) / 2).clamp_min(1e-12)
    marginal = joint.sum(dim=1)
    information = (joint * (joint.log() - marginal.log()[:, None] - marginal.log()[None, :])).sum()
    return math.log(num_themes) - information
