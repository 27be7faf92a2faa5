"""`StackedEncoder`: the backbone encoder plus a correction, the shape every stacked kind shares.

    u = e_backbone + W_x c,   W_x zero at initialisation

where e_backbone is the backbone encoder over the whole sequence and c the correction's vector:
a sample-level MoE over copies of the encoder (gshard, dselect_k, expert_choice; the backbone is
then their always-on shared expert, as in DeepSeekMoE) or a second plain encoder
("stacked_backbone", the control that shows what stacking alone adds). It is the MoS layer's own
residual fusion, with another correction, so MoS and its baselines are trained and selected the
same way (`mos.boosting`): under boosted training the correction reads the tokens and the target
detached and the output carries both parts. The backbone encoder is built first, so it starts
from the same weights as the backbone model's encoder built from the same seed.
"""
from __future__ import annotations

import torch
from torch import nn

from mos.lab.config import ModelConfig
from mos.encoders import encoder_options, make_encoder
from mos.layer import MoSOutput

from .dselect_k import DSelectK
from .expert_choice import ExpertChoice
from .gshard import GShard
from .sample_moe import EncoderOutput

SAMPLE_MOE = {"gshard": GShard, "dselect_k": DSelectK, "expert_choice": ExpertChoice}


def backbone_encoder(config: ModelConfig, num_experts: int = 1) -> nn.Module:
    """The encoder every kind is built around (`model.mos.encoder`, its width and heads)."""
    cfg = config.mos
    return make_encoder(cfg.encoder, cfg.dim, cfg.num_heads, num_experts, **encoder_options(cfg))


class PlainCorrection(nn.Module):
    """A second backbone encoder as the correction, with no auxiliary loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.encoder = backbone_encoder(config)

    def forward(self, tokens, target, offsets, max_len) -> EncoderOutput:
        return EncoderOutput(self.encoder(tokens, target, offsets, max_len=max_len)[0], tokens.new_zeros(()))


class StackedEncoder(nn.Module):
    """(tokens [T, d], target [B, d], offsets [B+1]) -> `MoSOutput` with output = global_output +
    extras_output, [B, d] each; aux_loss and aux are the correction's (the MoE's balance terms)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind not in (*SAMPLE_MOE, "stacked_backbone"):
            raise ValueError(f"model.kind: expected one of {[*SAMPLE_MOE, 'stacked_backbone']} for a stacked encoder, "
                             f"got {config.kind!r}")
        dim = config.mos.dim
        self.global_encoder = backbone_encoder(config)
        self.correction = (PlainCorrection(config) if config.kind == "stacked_backbone"
                           else SAMPLE_MOE[config.kind](config))
        self.extras_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.extras_out.weight)
        nn.init.zeros_(self.extras_out.bias)
        self.detach_inputs = config.boosted

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, offsets: torch.Tensor, *,
                max_len: int) -> MoSOutput:
        base = self.global_encoder(tokens, target, offsets, max_len=max_len)[0]
        x_tokens, x_target = (tokens.detach(), target.detach()) if self.detach_inputs else (tokens, target)
        correction = self.correction(x_tokens, x_target, offsets, max_len)
        extras = self.extras_out(correction.output)
        return MoSOutput(base + extras, correction.aux_loss, correction.aux, None, base, extras)
