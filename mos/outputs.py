"""What `MoSLayer.forward` returns: `MoSOutput`, with the router's `RoutingInfo`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass
class RoutingInfo:
    """What the router did, for inspection and diagnostics (nothing here needs gradients).

    S sessions over the batch, K themes, B examples; int64 unless said.

    Attributes:
        session_offsets: [S+1] the token rows (of the jagged `values`) of each session.
        session_example: [S] the example each session belongs to.
        session_theme: [S] each session's top-1 theme.
        themes: [S, top_k] the themes each session joins, best first.
        probs: [S, K] float, the router's softmax over the themes.
        segment_lengths: [K, B] tokens of example b in theme k's subsequence (after
            `max_theme_tokens`).
        tokens_per_theme: [K] (property) tokens each theme expert read over the batch.
    """

    session_offsets: torch.Tensor   # [S+1] token rows of each session
    session_example: torch.Tensor   # [S]
    session_theme: torch.Tensor     # [S] top-1 theme
    themes: torch.Tensor            # [S, top_k]
    probs: torch.Tensor             # [S, K]
    segment_lengths: torch.Tensor   # [K, B] tokens of example b in theme k's subsequence

    @property
    def tokens_per_theme(self) -> torch.Tensor:
        return self.segment_lengths.sum(1)


@dataclass
class MoSOutput:
    """What `MoSLayer.forward` returns. B examples, d = `MoSConfig.dim`; the vectors in the inputs'
    dtype (under autocast: `output` and `global_output` float32, `extras_output` the autocast
    dtype), the auxiliary losses in float32 (they are computed in float32 under any input dtype).

    Attributes:
        output: [B, d] the fused user-interest vector: feed it to the CTR head.
        aux_loss: scalar, the weighted sum of `aux`; add it to the training loss.
        aux: the unweighted auxiliary losses by name (commitment, codebook, load_balance; and
            consistency from a router with a session-consistency loss), scalars. In eval mode
            the router computes none of them: every one is 0 there (monitor them in training).
        routing: `RoutingInfo`, or None when the layer runs no theme experts.
        global_output, extras_output: [B, d] with `fusion="residual"` (else None): the global
            expert's vector and the other experts' term, output = global_output + extras_output,
            for a model that trains the two with different losses (`mos.boosting`).
        extras_detached: the layer's other experts and router read the inputs detached
            (`MoSConfig.extras_detach_inputs`), as `mos.boosting` needs.
    """

    output: torch.Tensor             # [B, d] fused user-interest vector
    aux_loss: torch.Tensor           # scalar, the weighted sum of `aux`
    aux: Dict[str, torch.Tensor]     # unweighted auxiliary losses: commitment, codebook, load_balance(, consistency)
    routing: Optional[RoutingInfo]   # None when the layer runs no theme experts
    # fusion="residual": output = global_output + extras_output (the global expert's vector and the
    # other experts' term), for a model that trains the two parts with different losses.
    global_output: Optional[torch.Tensor] = None
    extras_output: Optional[torch.Tensor] = None
    extras_detached: bool = False    # MoSConfig.extras_detach_inputs: what mos.boosting.candidates checks
