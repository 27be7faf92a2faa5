"""Boosted training: how to train a model with `MoSLayer` inside so that it is never worse than
its backbone, in your own model.

The layer with `fusion="residual"` returns `global_output` (the global expert: the backbone
encoder over the whole sequence) and `extras_output` (the other experts' term, zero at
initialisation); `MoSConfig.extras_detach_inputs=True` makes the other experts read the inputs
detached. A model with a head `head(target, user) -> logits [B]` then has two candidate
predictions per example (`candidates`):

    backbone  = head(target, global_output)
    corrected = head_frozen(target.detach(), global_output.detach() + extras_output)

`head_frozen` is the same head with its parameters detached. `boosted_loss` is the sum of the two
candidates' BCE (plus the layer's auxiliary loss): the backbone candidate's BCE alone trains the
embeddings, the global expert and the head, exactly as if the backbone were trained alone; the
corrected candidate's BCE trains only the correction (the other experts, the router, the fusion).

Train with early stopping on the backbone candidate's validation AUC. With the weights of its
best epoch, `choose_correction` decides once which candidate to serve: the corrected one only
when its validation AUC exceeds the backbone's by more than the DeLong standard error of the
paired difference (`mos.delong`). So the served model is the backbone unless the correction's
gain is larger than its noise on validation.

The rule [ours] comes from a measurement (docs/history/mos-quality-2026-12-01.md): trained
jointly, a MoS layer with more parameters than its backbone overfit earlier and fell below it;
stacked this way its backbone part is the backbone, step for step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .delong import auc_difference


class Candidates(NamedTuple):
    backbone: torch.Tensor      # [B] logits of the backbone alone
    corrected: torch.Tensor     # [B] logits with the correction added


def candidates(head: nn.Module, target: torch.Tensor, global_output: torch.Tensor,
               extras_output: torch.Tensor) -> Candidates:
    """Both candidate predictions. `head(target, user)` returns logits [B]; target [B, d_t],
    global_output and extras_output [B, d] as `MoSOutput` gives them (any float dtype). The
    corrected candidate reaches the head's parameters and buffers detached, the target and the
    global output detached, so its gradient flows into `extras_output` only. Raises ValueError
    when either part is None (a layer without the residual fusion over a global expert)."""
    if extras_output is None or global_output is None:
        raise ValueError("extras_output: expected the residual fusion's two parts (MoSConfig.fusion='residual' with "
                         "a global expert and at least one other), got None")
    backbone = head(target, global_output)
    corrected_input = (target.detach(), global_output.detach() + extras_output)
    if torch.jit.is_tracing():
        # The tracer (FLOP counters trace the model) refuses functional_call; it computes no
        # gradients, so the head itself is the same computation.
        return Candidates(backbone, head(*corrected_input))
    frozen = {name: t.detach() for name, t in [*head.named_parameters(), *head.named_buffers()]}
    corrected = functional_call(head, frozen, corrected_input)
    return Candidates(backbone, corrected)


def boosted_loss(cands: Candidates, label: torch.Tensor, aux_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE of each candidate against `label` [B] in {0, 1} (float), summed, plus `aux_loss`
    (the layer's weighted auxiliary loss) when given. A scalar."""
    loss = (F.binary_cross_entropy_with_logits(cands.backbone, label)
            + F.binary_cross_entropy_with_logits(cands.corrected, label))
    return loss if aux_loss is None else loss + aux_loss


@dataclass(frozen=True)
class Choice:
    """Which candidate to serve, and the validation numbers it was decided on.

    Attributes:
        serve_correction: serve the corrected candidate (gain > se).
        backbone_auc, corrected_auc: the two candidates' validation AUC.
        gain: corrected_auc - backbone_auc.
        se: the DeLong standard error of the gain (user-clustered when groups were given).
    """

    serve_correction: bool
    backbone_auc: float
    corrected_auc: float
    gain: float             # corrected_auc - backbone_auc
    se: float               # DeLong standard error of the gain (user-clustered when groups were given)


def choose_correction(labels, backbone_scores, corrected_scores, groups=None) -> Choice:
    """Serve the corrected candidate iff its validation AUC gain over the backbone candidate
    exceeds the gain's DeLong standard error. `labels` [N] in {0, 1}, the two candidates'
    scores [N] (logits or probabilities: AUC reads ranks), `groups` [N] (the users, whose
    examples are correlated) for the cluster-robust standard error. Raises ValueError (naming
    the argument) where AUC is undefined: fewer than two examples of either class."""
    d = auc_difference(labels, corrected_scores, backbone_scores, groups)
    return Choice(d.difference > d.se, d.auc_b, d.auc_a, d.difference, d.se)
