"""DSelect-k gating (Hazimeh et al., 2021), per example.

E = 2^m experts. Each of k selectors has m logits z; selector i picks expert e with weight
r_i(e) = Π_j (S(z_ij) if bit j of e is 1 else 1 - S(z_ij)), where S is the cubic smooth step
that is exactly 0 below -γ/2 and exactly 1 above γ/2. The gate is Σ_i softmax(α)_i · r_i(e).
Once the smooth steps saturate each selector picks one expert, so at most k experts run; an
entropy penalty on each r_i pushes them there. Weights are exactly 0 for experts no selector
reaches, and SampleMoE then skips them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .sample_moe import SampleMoE, mean_or_zero


def smooth_step(x: torch.Tensor, gamma: float) -> torch.Tensor:
    cubic = -2.0 / gamma ** 3 * x ** 3 + 1.5 / gamma * x + 0.5
    return torch.where(x <= -gamma / 2, torch.zeros_like(x), torch.where(x >= gamma / 2, torch.ones_like(x), cubic))


class DSelectK(SampleMoE):
    def __init__(self, config):
        super().__init__(config)
        num_experts = self.moe.num_experts
        self.bits = int(round(math.log2(num_experts)))
        if 2 ** self.bits != num_experts or num_experts < 2:
            raise ValueError(f"model.moe.num_experts: expected a power of two >= 2 for dselect_k, got {num_experts}")
        self.selector_logits = nn.Linear(config.mos.dim, self.moe.top_k * self.bits)
        self.selector_weights = nn.Linear(config.mos.dim, self.moe.top_k)
        codes = torch.arange(num_experts)[:, None].bitwise_right_shift(torch.arange(self.bits)).bitwise_and(1)
        self.register_buffer("codes", codes.float(), persistent=False)        # [E, m]

    def selector_probs(self, features):
        """r [B, k, E]: each selector's distribution over experts (sums to 1)."""
        z = self.selector_logits(features).float().view(-1, self.moe.top_k, 1, self.bits)
        s = smooth_step(z, self.moe.smooth_step_gamma)                        # [B, k, 1, m]
        return torch.where(self.codes.bool(), s, 1.0 - s).prod(dim=-1)       # [B, k, E]

    def gate(self, features):
        r = self.selector_probs(features)
        alpha = torch.softmax(self.selector_weights(features).float(), dim=1)  # [B, k]
        weights = (alpha[:, :, None] * r).sum(dim=1)                           # [B, E]
        entropy = mean_or_zero(-(r * torch.log(r.clamp_min(1e-9))).sum(-1))
        return weights, self.moe.entropy_weight * entropy, {"selector_entropy": entropy.detach()}
