"""Expert-choice gating (Zhou et al., 2022): experts choose examples.

Scores are a softmax over experts per example; each expert takes the C examples of the batch
with its highest scores, C = ceil(capacity_factor · B · top_k / E), and weights its output by
that score. An example no expert picks gets a zero MoE output (the method's known trade-off).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .sample_moe import SampleMoE, mean_or_zero


class ExpertChoice(SampleMoE):
    def __init__(self, config):
        super().__init__(config)
        self.router = nn.Linear(config.mos.dim, self.moe.num_experts)

    def capacity(self, num_examples: int) -> int:
        return min(num_examples, math.ceil(self.moe.capacity_factor * num_examples * self.moe.top_k
                                           / self.moe.num_experts))

    def gate(self, features):
        scores = torch.softmax(self.router(features).float(), dim=1)          # [B, E]
        capacity = self.capacity(scores.shape[0])
        top = torch.topk(scores.t(), capacity, dim=1)                          # [E, C]
        weights = torch.zeros_like(scores.t()).scatter(1, top.indices, top.values).t()
        covered = mean_or_zero((weights > 0).any(dim=1).float())
        return weights, scores.new_zeros(()), {"examples_covered": covered.detach()}
