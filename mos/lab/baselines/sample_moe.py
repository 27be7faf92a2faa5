"""`SampleMoE`: what the sample-level MoE baselines share.

An example's representation for gating is [target ; mean of its history]. The gate (a subclass)
returns, for every example, a weight per expert, zero for experts it does not use. Only the
(expert, example) pairs with a non-zero weight are computed: the layout puts example b's whole
sequence into expert e's segment when used, and leaves it empty otherwise, so the experts'
cost is what the gating chose (and what the FLOP counter sees). Output = Σ_e weight · expert_e.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn

import mos_kernels as mk
from mos.lab.config import ModelConfig
from mos.encoder_protocol import run_encoder
from mos.encoders import encoder_options, make_encoder
from mos_kernels.backend import op_backends
from mos_kernels.jagged import offsets_from_lengths, positions_in_segment, segment_ids


@dataclass
class EncoderOutput:
    output: torch.Tensor                                   # [B, d]
    aux_loss: torch.Tensor                                 # scalar, already weighted
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)


class SampleMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        mos_cfg, self.moe = config.mos, config.moe
        self.backends = op_backends(mos_cfg.backend)
        self.experts = make_encoder(mos_cfg.encoder, mos_cfg.dim, mos_cfg.num_heads, self.moe.num_experts,
                                    **encoder_options(mos_cfg))
        self.gate_input = nn.Linear(2 * mos_cfg.dim, mos_cfg.dim)

    def gate(self, features: torch.Tensor):
        """features [B, d] -> (weights [B, E], zero where unused; aux_loss; aux dict)."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, offsets: torch.Tensor,
                max_len: int) -> EncoderOutput:
        history = mk.session_pool(tokens, offsets, backend=self.backends["session_pool"])
        features = torch.tanh(self.gate_input(torch.cat([target, history], dim=1)))
        weights, aux_loss, aux = self.gate(features)
        used = (weights > 0).t()                                          # [E, B]
        segment_offsets, gather_index, inverse_index = _expert_layout(used, offsets, tokens.shape[0])
        out = run_encoder(self.experts, tokens, target, segment_offsets, gather_index=gather_index,
                          inverse_index=inverse_index, max_len=max_len,
                          gather_backend=self.backends["theme_gather"])  # [E, B, d]
        return EncoderOutput(torch.einsum("be,ebd->bd", weights.to(out.dtype), out), aux_loss, aux)


def mean_or_zero(x: torch.Tensor, dim=None) -> torch.Tensor:
    """x.mean(dim) (over all of x when dim is None), or zeros where there is nothing to average:
    on an empty batch torch's mean is 0/0 = NaN, and a NaN auxiliary loss poisons training."""
    if x.numel():
        return x.mean() if dim is None else x.mean(dim)
    return x.sum() if dim is None else x.sum(dim)   # sums over nothing: zeros, still in the graph


def _expert_layout(used: torch.Tensor, offsets: torch.Tensor, num_tokens: int):
    """Segment e*B+b holds example b's tokens when expert e is used for it, else nothing.

    Returns segment_offsets [E*B+1], gather_index [rows] and inverse_index [T, E] (the row of
    each token in each expert, -1 where unused), built without reading sizes back."""
    num_experts, num_examples = used.shape
    lengths = (offsets[1:] - offsets[:-1])[None, :] * used                  # [E, B]
    segment_offsets = offsets_from_lengths(lengths.reshape(-1), check=False)
    starts = offsets[:-1].expand_as(lengths).reshape(-1)
    pos = positions_in_segment(segment_offsets, check=False)
    gather_index = torch.repeat_interleave(starts, lengths.reshape(-1), output_size=pos.numel()) + pos
    example = segment_ids(offsets, num_tokens, check=False)                            # [T]
    in_example = torch.arange(num_tokens, device=offsets.device) - offsets[example]
    segment = torch.arange(num_experts, device=offsets.device)[None, :] * num_examples + example[:, None]
    row = segment_offsets[segment] + in_example[:, None]                     # [T, E]
    inverse_index = torch.where(used.t()[example], row, torch.full_like(row, -1))
    return segment_offsets, gather_index, inverse_index
