"""Boosted training: how to train a model with `MoSLayer` inside so that its backbone part trains
exactly as the backbone alone and the MoS correction is served only where validation supports it,
in your own model.

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
when its validation AUC exceeds the backbone's by more than `z` DeLong standard errors of the
paired difference (`mos.delong`; z = 1 by default). So the served model is the backbone unless the
correction's gain is larger than its noise on validation. It is a one-sided test, not a
guarantee: where the correction gains nothing, it passes with probability about 16 % at z = 1
(5 % at z = 1.645), and the same validation split chose the epoch; the test split is what says
whether the served model is better.

The rule [ours] comes from a measurement (docs/history/mos-quality-2026-12-01.md): trained
jointly, a MoS layer with more parameters than its backbone overfit earlier and fell below it;
stacked this way its backbone part is the backbone, step for step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mos_kernels.checks import reads_data

from .delong import auc_difference
from .outputs import MoSOutput


class Candidates(NamedTuple):
    backbone: torch.Tensor      # [B] logits of the backbone alone
    corrected: torch.Tensor     # [B] logits with the correction added


def candidates(head: nn.Module, target: torch.Tensor, global_output: Union[torch.Tensor, MoSOutput],
               extras_output: Optional[torch.Tensor] = None) -> Candidates:
    """Both candidate predictions. `head(target, user)` returns logits [B]; target [B, d_t];
    `global_output` the layer's `MoSOutput` (`candidates(head, target, out)`: its two parts are
    used, and the layer is checked to read the correction's inputs detached, without which the
    correction's loss would train the embeddings too), or the parts themselves, global_output and
    extras_output [B, d] as `MoSOutput` gives them (float dtypes, on one device; under autocast
    they differ; unchecked: set `MoSConfig.extras_detach_inputs=True` yourself). The corrected candidate reaches the head's parameters
    detached and a copy of its buffers (a BatchNorm's running statistics move with the backbone
    candidate's call only), the target and the global output detached, so its gradient flows into
    `extras_output` only. Raises ValueError naming the argument when either part is None (a layer
    without the residual fusion over a global expert), when the parts' shapes or devices differ,
    when target has another batch size, or when the head returns anything but logits [B]; and
    naming `MoSConfig.extras_detach_inputs` for a `MoSOutput` of a layer built without it."""
    if isinstance(global_output, MoSOutput):
        out = global_output
        if extras_output is not None:
            raise ValueError("extras_output: expected None when the layer's MoSOutput is given (its parts are "
                             "used), got a tensor")
        if not out.extras_detached:
            raise ValueError("MoSConfig.extras_detach_inputs: expected True for boosted training (the correction's "
                             "loss must not reach the embeddings and the target, or the backbone part no longer "
                             "trains as the backbone alone), got False")
        global_output, extras_output = out.global_output, out.extras_output
    for name, part in (("global_output", global_output), ("extras_output", extras_output)):
        if part is None:
            raise ValueError(f"{name}: expected the residual fusion's two parts (MoSConfig.fusion='residual' with "
                             f"a global expert and at least one other), got None")
        if not isinstance(part, torch.Tensor) or part.dim() != 2 or not part.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor [B, d], got "
                             f"{tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__}"
                             f"{f' {part.dtype}' if isinstance(part, torch.Tensor) else ''}")
    # Dtypes may differ: under autocast the global expert's output is float32, the extras' bf16.
    got = (tuple(extras_output.shape), str(extras_output.device))
    if got != (tuple(global_output.shape), str(global_output.device)):
        raise ValueError(f"extras_output: expected global_output's shape and device "
                         f"{(tuple(global_output.shape), str(global_output.device))}, got {got}")
    if not isinstance(target, torch.Tensor) or target.dim() < 1 or target.shape[0] != global_output.shape[0]:
        raise ValueError(f"target: expected [B = {global_output.shape[0]}, ...] (one row per example), got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    backbone = _logits(head(target, global_output), global_output.shape[0])
    corrected_input = (target.detach(), global_output.detach() + extras_output)
    if torch.jit.is_tracing():
        # The tracer (FLOP counters trace the model) refuses functional_call; it computes no
        # gradients, so the head itself is the same computation.
        return Candidates(backbone, head(*corrected_input))
    # Buffers are copied, not only detached: a detached tensor shares storage, so a BatchNorm's
    # in-place running-statistics update in this call would move the backbone's own statistics.
    frozen = {name: t.detach() for name, t in head.named_parameters()}
    frozen.update({name: t.detach().clone() for name, t in head.named_buffers()})
    corrected = _logits(functional_call(head, frozen, corrected_input), global_output.shape[0])
    return Candidates(backbone, corrected)


def _logits(out, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch,) or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"head: expected it to return float logits [B = {batch}], got {shape}")
    return out


def boosted_loss(cands: Candidates, label: torch.Tensor, aux_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE of each candidate against `label` [B] in {0, 1} (float), summed, plus `aux_loss`
    (the layer's weighted auxiliary loss, a scalar) when given. A scalar. Raises ValueError naming
    `label` for another shape, a non-float dtype or (while data checks run, `mos_kernels.checks`)
    values outside {0, 1}, and naming `aux_loss` when it is not a scalar."""
    if not isinstance(label, torch.Tensor) or tuple(label.shape) != tuple(cands.backbone.shape):
        raise ValueError(f"label: expected [B] = {tuple(cands.backbone.shape)}, got "
                         f"{tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__}")
    if not label.is_floating_point():
        raise ValueError(f"label: expected a float tensor of 0s and 1s, got {label.dtype}")
    if reads_data() and not bool(((label == 0) | (label == 1)).all()):
        raise ValueError("label: expected values in {0, 1}, got others (NaN, or a soft label)")
    if aux_loss is not None and (not isinstance(aux_loss, torch.Tensor) or aux_loss.dim() != 0):
        raise ValueError(f"aux_loss: expected a scalar tensor, got "
                         f"{tuple(aux_loss.shape) if isinstance(aux_loss, torch.Tensor) else type(aux_loss).__name__}")
    loss = (F.binary_cross_entropy_with_logits(cands.backbone, label)
            + F.binary_cross_entropy_with_logits(cands.corrected, label))
    return loss if aux_loss is None else loss + aux_loss


@dataclass(frozen=True)
class Choice:
    """Which candidate to serve, and the validation numbers it was decided on.

    Attributes:
        serve_correction: serve the corrected candidate (gain > z * se).
        backbone_auc, corrected_auc: the two candidates' validation AUC.
        gain: corrected_auc - backbone_auc.
        se: the DeLong standard error of the gain (user-clustered when groups were given).
    """

    serve_correction: bool
    backbone_auc: float
    corrected_auc: float
    gain: float             # corrected_auc - backbone_auc
    se: float               # DeLong standard error of the gain (user-clustered when groups were given)


def choose_correction(labels, backbone_scores, corrected_scores, groups=None, *, z: float = 1.0) -> Choice:
    """Serve the corrected candidate iff its validation AUC gain over the backbone candidate
    exceeds `z` times the gain's DeLong standard error (a one-sided test: under no gain it passes
    with probability about 16 % at z = 1, 5 % at z = 1.645). `labels` [N] in {0, 1}, the two
    candidates' scores [N] (logits or probabilities: AUC reads ranks), `groups` [N] (the users,
    whose examples are correlated) for the cluster-robust standard error. Raises ValueError
    naming the argument for scores of another shape or not finite, a z that is not a finite
    number >= 0, and where AUC is undefined: fewer than two examples of either class."""
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 <= z < float("inf"):
        raise ValueError(f"z: expected a finite number >= 0 (standard errors), got {z!r}")
    try:
        d = auc_difference(labels, corrected_scores, backbone_scores, groups)
    except (ValueError, TypeError) as err:       # auc_difference names its own arguments
        text = str(err)
        for inner, outer in (("scores_a", "corrected_scores"), ("scores_b", "backbone_scores")):
            if text.startswith(inner):
                raise type(err)(outer + text[len(inner):]) from None
        raise
    return Choice(d.difference > z * d.se, d.auc_b, d.auc_a, d.difference, d.se)
