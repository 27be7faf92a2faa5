"""Sequence encoders ("backbones") over jagged segments, one parameter set per expert.

An encoder with E experts reads a layout of E*B segments (segment e*B + b is example b's
sequence for expert e) and returns one vector per segment, [E, B, d]. The global and
short-term experts and the plain backbone are the same modules with E = 1 over a one-expert
layout; the theme experts use E = K over the theme-major dispatch. Empty segments give zeros.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.backend import op_backends
from mos_kernels.jagged import expert_offsets as jagged_expert_offsets, segment_ids


def _expert_weight(num_experts: int, d_in: int, d_out: int) -> nn.Parameter:
    # nn.Linear's default init, per expert.
    bound = 1.0 / math.sqrt(d_in)
    return nn.Parameter(torch.empty(num_experts, d_in, d_out).uniform_(-bound, bound))


def _expert_bias(num_experts: int, d_in: int, d_out: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(d_in)
    return nn.Parameter(torch.empty(num_experts, d_out).uniform_(-bound, bound))


def _nonempty(segment_offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, B, 1] mask of segments that hold at least one row."""
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    return (lengths > 0).view(num_experts, -1, 1)


class TargetAttentionEncoder(nn.Module):
    """DIN/TWIN-style multi-head attention with the target as query, per expert."""

    def __init__(self, dim: int, num_heads: int, num_experts: int = 1, backend: str = "auto"):
        super().__init__()
        self.dim, self.num_heads, self.num_experts = dim, num_heads, num_experts
        self.backends = op_backends(backend)
        for name in ("query", "key", "value", "out"):
            setattr(self, f"w_{name}", _expert_weight(num_experts, dim, dim))
            setattr(self, f"b_{name}", _expert_bias(num_experts, dim, dim))

    def forward(self, tokens: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                gather_index: Optional[torch.Tensor] = None, row_gate: Optional[torch.Tensor] = None,
                inverse_index: Optional[torch.Tensor] = None, max_len: Optional[int] = None) -> torch.Tensor:
        """Segments are rows tokens[gather_index] * row_gate (see `mos_kernels.theme_gather`), or
        tokens themselves without gather_index. Returns [E, B, d]."""
        num_experts = self.num_experts
        query = torch.einsum("bd,edf->ebf", target, self.w_query) + self.b_query[:, None]
        attended = mk.expert_target_attention(
            tokens, query.reshape(-1, self.dim), self.w_key, self.b_key, self.w_value, self.b_value,
            segment_offsets, num_heads=self.num_heads, gather_index=gather_index, row_gate=row_gate,
            inverse_index=inverse_index, backend=self.backends["expert_target_attention"])
        out = torch.einsum("ebd,edf->ebf", attended.view(num_experts, -1, self.dim), self.w_out)
        out = out + self.b_out[:, None]
        return out * _nonempty(segment_offsets, num_experts)


class TransformerEncoder(nn.Module):
    """TransAct/BST/SASRec-style causal pre-LN transformer layers per expert, then target
    attention over the encoded rows as the readout (so the vector depends on the candidate, as
    in TransAct and BST)."""

    def __init__(self, dim: int, num_heads: int, num_experts: int = 1, num_layers: int = 1,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.dim, self.num_heads, self.num_experts = dim, num_heads, num_experts
        self.backends = op_backends(backend)
        self.dropout = dropout
        self.layers = nn.ModuleList(_ExpertBlock(dim, num_experts) for _ in range(num_layers))
        self.target_readout = TargetAttentionEncoder(dim, num_heads, num_experts, backend)

    def forward(self, tokens, target, segment_offsets, *, gather_index=None, row_gate=None, inverse_index=None,
                max_len=None):
        if row_gate is not None and gather_index is None:
            raise ValueError("row_gate: expected None when gather_index is None (a gate scales gathered rows)")
        rows = tokens if gather_index is None else mk.theme_gather(
            tokens, gather_index, row_gate, inverse_index=inverse_index,
            backend=self.backends["theme_gather"])
        expert_offsets = jagged_expert_offsets(segment_offsets, self.num_experts)
        expert = segment_ids(expert_offsets, rows.shape[0])
        for block in self.layers:
            rows = block(rows, expert, expert_offsets, segment_offsets, self.num_heads, max_len,
                         self.dropout if self.training else 0.0, self.backends)
        return self.target_readout(rows, target, segment_offsets, max_len=max_len)


class _ExpertBlock(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.ln1_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.ln1_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.ln2_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.ln2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.w_qkv = _expert_weight(num_experts, dim, 3 * dim)
        self.b_qkv = _expert_bias(num_experts, dim, 3 * dim)
        self.w_out = _expert_weight(num_experts, dim, dim)
        self.b_out = _expert_bias(num_experts, dim, dim)
        self.w_ff1 = _expert_weight(num_experts, dim, 2 * dim)
        self.b_ff1 = _expert_bias(num_experts, dim, 2 * dim)
        self.w_ff2 = _expert_weight(num_experts, 2 * dim, dim)
        self.b_ff2 = _expert_bias(num_experts, 2 * dim, dim)

    def forward(self, rows, expert, expert_offsets, segment_offsets, num_heads, max_len, dropout, backends):
        dim = rows.shape[1]
        linear = backends["grouped_linear"]
        h = F.layer_norm(rows, (dim,)) * self.ln1_weight[expert] + self.ln1_bias[expert]
        q, k, v = mk.grouped_linear(h, self.w_qkv, self.b_qkv, expert_offsets, backend=linear).split(dim, dim=1)
        attn = mk.jagged_self_attention(q, k, v, segment_offsets, num_heads=num_heads, max_len=max_len,
                                        backend=backends["jagged_self_attention"])
        rows = rows + F.dropout(mk.grouped_linear(attn, self.w_out, self.b_out, expert_offsets, backend=linear),
                                dropout)
        h = F.layer_norm(rows, (dim,)) * self.ln2_weight[expert] + self.ln2_bias[expert]
        h = F.gelu(mk.grouped_linear(h, self.w_ff1, self.b_ff1, expert_offsets, backend=linear))
        return rows + F.dropout(mk.grouped_linear(h, self.w_ff2, self.b_ff2, expert_offsets, backend=linear), dropout)


def make_encoder(kind: str, dim: int, num_heads: int, num_experts: int = 1, *, num_layers: int = 1,
                 dropout: float = 0.0, backend: str = "auto") -> nn.Module:
    """An encoder of `kind` ("target_attention" or "transformer") with `num_experts` parameter
    sets. Raises ValueError naming `encoder` for another kind."""
    if kind == "target_attention":
        return TargetAttentionEncoder(dim, num_heads, num_experts, backend)
    if kind == "transformer":
        return TransformerEncoder(dim, num_heads, num_experts, num_layers, dropout, backend)
    raise ValueError(f"encoder: expected one of ['target_attention', 'transformer'], got {kind!r}")
