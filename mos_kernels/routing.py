"""Routing every session to its top-k themes: the pieces that `session_pool_route` (which pools
the sessions and routes them in one op), its CUDA registration and the layer's VQ losses share.

Scores are cosine similarities to K learnable prototypes over a temperature. The forward gate
is hard (1 for each chosen theme) and the backward pass sees the softmax probabilities
(straight-through: gate = hard + p - stopgrad(p)), so the router learns from the task loss.
Routing is no op of its own: the layer only ever routes what it has just pooled, so the fused
op is the one entry (its reference routes with `session_pool._route_reference`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import FLOAT_DTYPES, check_finite, check_positive, check_tensor

NORM_EPS = 1e-6


@dataclass
class Routing:
    themes: torch.Tensor   # [S, top_k] int64, chosen themes, best first
    gate: torch.Tensor     # [S, top_k] straight-through gate: 1 in the forward pass
    probs: torch.Tensor    # [S, K] softmax of the scores (fp32)
    scores: torch.Tensor   # [S, K] cos(h, c) / temperature (fp32)


# Scores cos / temperature are at most 1e6 in magnitude: finite in fp32, and exp of their
# differences well defined; a temperature of 1e-40 made them inf and the routing NaN.
MIN_TEMPERATURE = 1e-6


def check_routing_args(rows_name: str, rows: torch.Tensor, prototypes: torch.Tensor, temperature: float,
                       top_k: int) -> None:
    """The routing arguments of `session_pool_route` (rows: what is routed)."""
    check_tensor("prototypes", prototypes, ndim=2, dtypes=FLOAT_DTYPES, device=rows.device)
    if prototypes.shape[1] != rows.shape[1]:
        raise ValueError(f"prototypes: expected {rows.shape[1]} columns (the width of {rows_name}), "
                         f"got shape {tuple(prototypes.shape)}")
    num_themes = prototypes.shape[0]
    if num_themes < 1:
        raise ValueError(f"prototypes: expected K >= 1 rows, got {num_themes}")
    # A NaN or inf prototype makes every score NaN: themes would be arbitrary (and differ by backend).
    check_finite("prototypes", prototypes)
    check_positive("temperature", temperature)
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature: expected at least {MIN_TEMPERATURE:g} (the scores cos / temperature must "
                         f"stay finite in fp32, and their softmax apart from a hard max), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_themes:
        raise ValueError(f"top_k: expected an int in [1, K={num_themes}], got {top_k!r}")


def normalized(x: torch.Tensor) -> torch.Tensor:
    """Unit rows in fp32; shared with the layer's VQ losses so both see the same geometry."""
    return F.normalize(x.float(), dim=-1, eps=NORM_EPS)


def straight_through_gate(probs: torch.Tensor, themes: torch.Tensor) -> torch.Tensor:
    """1 in the forward pass, d/dp = 1 in the backward pass, for each chosen theme."""
    chosen = probs.gather(1, themes)
    # (p - p) is exactly 0, so the forward value is exactly 1; 1 + p - p would round.
    return (chosen - chosen.detach()) + 1.0
