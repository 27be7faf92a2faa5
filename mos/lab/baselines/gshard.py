"""GShard-style gating: softmax over E experts, the top-2 kept and renormalised, plus the
load-balance loss E · Σ_e f_e · P_e (f_e: share of the top-k assignments that go to e, P_e: its
mean probability). With top_k = 1 the renormalised weight is always 1, so the router learns
from the balance loss alone: use top_k >= 2, as GShard does."""
from __future__ import annotations

import torch
from torch import nn

from .sample_moe import SampleMoE, mean_or_zero


class GShard(SampleMoE):
    def __init__(self, config):
        super().__init__(config)
        self.router = nn.Linear(config.mos.dim, self.moe.num_experts)

    def gate(self, features):
        probs = torch.softmax(self.router(features).float(), dim=1)           # [B, E]
        top = torch.topk(probs, self.moe.top_k, dim=1)
        weights = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        num_experts = probs.shape[1]
        chosen = torch.zeros_like(probs).scatter(1, top.indices, 1.0)
        balance = num_experts * (mean_or_zero(chosen, 0) / self.moe.top_k * mean_or_zero(probs, 0)).sum()
        return weights, self.moe.load_balance_weight * balance, {"load_balance": balance.detach()}
