"""Sequence encoders ("backbones") over jagged segments, one parameter set per expert: the
built-in experts of `MoSLayer` (`mos.encoder_protocol` says what any expert must be).

An encoder with E experts reads a layout of E*B segments (segment e*B + b is example b's
sequence for expert e) and returns one vector per segment, [E, B, d]. The global and
short-term experts and the plain backbone are the same modules with E = 1 over a one-expert
layout; the theme experts use E = K over the theme-major dispatch. Empty segments give zeros.
"""
from __future__ import annotations

import dataclasses
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
    """DIN/TWIN-style multi-head attention with the target as query, per expert.

    `attention_mass`: the softmax makes the attended vector an average, blind to how much of the
    segment matches the target (DIN drops the softmax for that reason). With it, each head's
    c = log(1 + sum_r exp(k_r . q / sqrt(d_h))) over the segment's rows r (0 for an empty
    segment) enters the output through a per-expert [H, d] weight, zero at initialisation."""

    reads_gather_index = True     # the fused kernels gather the rows (mos.encoder_protocol)

    def __init__(self, dim: int, num_heads: int, num_experts: int = 1, backend: str = "auto",
                 attention_mass: bool = False):
        super().__init__()
        self.dim, self.num_heads, self.num_experts = dim, num_heads, num_experts
        self.backends = op_backends(backend)
        for name in ("query", "key", "value", "out"):
            setattr(self, f"w_{name}", _expert_weight(num_experts, dim, dim))
            setattr(self, f"b_{name}", _expert_bias(num_experts, dim, dim))
        # torch.zeros draws nothing: the other weights are those of an encoder without it.
        self.w_mass = nn.Parameter(torch.zeros(num_experts, num_heads, dim)) if attention_mass else None

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
        if self.w_mass is not None:
            mass = attention_mass(tokens, query.reshape(-1, self.dim), self.w_key, self.b_key, segment_offsets,
                                  self.num_heads, gather_index=gather_index, row_gate=row_gate,
                                  backend=self.backends["grouped_linear"])
            out = out + torch.einsum("ebh,ehf->ebf", mass.view(num_experts, -1, self.num_heads), self.w_mass)
        return out * _nonempty(segment_offsets, num_experts)


def attention_mass(tokens: torch.Tensor, query: torch.Tensor, w_key: torch.Tensor, b_key: torch.Tensor,
                   segment_offsets: torch.Tensor, num_heads: int, *, gather_index: Optional[torch.Tensor] = None,
                   row_gate: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """[S, H] c_{s,h} = log(1 + sum over segment s's rows r of exp(k_{r,h} . q_{s,h} / sqrt(d_h))).

    Rows are tokens[gather_index] * row_gate (or tokens); keys k_r = row_r W_key[e] + b_key[e]
    with e the expert of the row's segment (segments expert-major, as the encoders take them);
    query [S, d]. Zero for an empty segment; log-sum-exp with the 1 inside, so it never overflows.

    Plain PyTorch beside the fused attention kernel (which keeps no key it could share): it
    projects the keys again (one [N, d] x [d, d] product per row, kept for backward) and sums
    per segment with index_add, whose CUDA backward is deterministic only under
    torch.use_deterministic_algorithms(True)."""
    num_segments, dim = query.shape
    num_experts = w_key.shape[0]
    rows = tokens if gather_index is None else tokens[gather_index]
    if row_gate is not None:
        rows = rows * row_gate[:, None].to(rows.dtype)
    keys = mk.grouped_linear(rows, w_key, b_key, jagged_expert_offsets(segment_offsets, num_experts),
                             backend=backend)
    segment = segment_ids(segment_offsets, rows.shape[0], check=False)
    head_dim = dim // num_heads
    scores = (keys.view(-1, num_heads, head_dim) * query[segment].view(-1, num_heads, head_dim)).sum(-1)
    # At least float32: fp16/bf16 exponentials would round the sums a model reads.
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) / math.sqrt(head_dim)   # [N, H]
    # max(0, max_r s_r) per segment: the 1 inside the sum is exp(0).
    top = torch.zeros(num_segments, num_heads, dtype=scores.dtype, device=query.device).scatter_reduce_(
        0, segment[:, None].expand(-1, num_heads), scores.detach(), "amax", include_self=True)
    total = torch.exp(-top).index_add(0, segment, torch.exp(scores - top[segment]))
    return (top + torch.log(total)).to(query.dtype)


class TransformerEncoder(nn.Module):
    """TransAct/BST/SASRec-style causal pre-LN transformer layers per expert, then target
    attention over the encoded rows as the readout (so the vector depends on the candidate, as
    in TransAct and BST)."""

    reads_gather_index = True     # the fused kernels gather the rows (mos.encoder_protocol)

    def __init__(self, dim: int, num_heads: int, num_experts: int = 1, num_layers: int = 1,
                 dropout: float = 0.0, backend: str = "auto", attention_mass: bool = False):
        super().__init__()
        self.dim, self.num_heads, self.num_experts = dim, num_heads, num_experts
        self.backends = op_backends(backend)
        self.dropout = dropout
        self.layers = nn.ModuleList(_ExpertBlock(dim, num_experts) for _ in range(num_layers))
        self.target_readout = TargetAttentionEncoder(dim, num_heads, num_experts, backend, attention_mass)

    def forward(self, tokens, target, segment_offsets, *, gather_index=None, row_gate=None, inverse_index=None,
                max_len=None):
        if row_gate is not None and gather_index is None:
            raise ValueError("row_gate: expected None when gather_index is None (a gate scales gathered rows)")
        rows = tokens if gather_index is None else mk.theme_gather(
            tokens, gather_index, row_gate, inverse_index=inverse_index,
            backend=self.backends["theme_gather"])
        expert_offsets = jagged_expert_offsets(segment_offsets, self.num_experts)
        expert = segment_ids(expert_offsets, rows.shape[0], check=False)
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


ENCODERS = ("target_attention", "transformer", "sdim", "mamba4rec")


def make_encoder(kind: str, dim: int, num_heads: int, num_experts: int = 1, *, num_layers: int = 1,
                 dropout: float = 0.0, backend: str = "auto", attention_mass: bool = False,
                 sdim_rounds: int = 16, sdim_bits: int = 3, mamba_state: int = 16) -> nn.Module:
    """A built-in encoder of `kind` (one of ENCODERS) with `num_experts` parameter sets. Raises
    ValueError naming `encoder` for another kind, or `attention_mass` for an encoder without a
    softmax target attention (SDIM samples instead)."""
    if kind == "target_attention":
        return TargetAttentionEncoder(dim, num_heads, num_experts, backend, attention_mass)
    if kind == "transformer":
        return TransformerEncoder(dim, num_heads, num_experts, num_layers, dropout, backend, attention_mass)
    if kind == "sdim":
        if attention_mass:
            raise ValueError("attention_mass: expected False with encoder='sdim' (it samples by hashing: no "
                             "softmax whose mass to add), got True")
        from .sdim import SDIMEncoder
        return SDIMEncoder(dim, num_experts, sdim_rounds, sdim_bits, backend)
    if kind == "mamba4rec":
        from .mamba4rec import Mamba4RecEncoder
        return Mamba4RecEncoder(
            dim, num_experts, lambda: TargetAttentionEncoder(dim, num_heads, num_experts, backend, attention_mass),
            num_layers, mamba_state, dropout, backend)
    raise ValueError(f"encoder: expected one of {list(ENCODERS)}, got {kind!r}")


def encoder_options(config) -> dict:
    """The keyword options of `make_encoder` that a `MoSConfig` sets (after kind, dim, num_heads,
    num_experts)."""
    return dict(num_layers=config.num_layers, dropout=config.dropout, backend=config.backend,
                attention_mass=config.attention_mass, sdim_rounds=config.sdim_rounds, sdim_bits=config.sdim_bits,
                mamba_state=config.mamba_state)


# The MoSConfig fields that configure only the built-in encoders: a user's encoder ignores them.
BUILT_IN_ONLY = ("encoder", "num_heads", "num_layers", "attention_mass", "sdim_rounds", "sdim_bits", "mamba_state")


def check_built_in_options_unset(config) -> None:
    """With a user's encoder (`MoSLayer(encoder=...)`) the fields in BUILT_IN_ONLY would have no
    effect: raise ValueError naming each one set away from its default, rather than ignore it."""
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    ignored = set(BUILT_IN_ONLY)
    if config.dim % defaults["num_heads"]:
        ignored.discard("num_heads")     # the config needs dim % num_heads == 0: a width the default does not divide
    changed = [f"config.{name}={getattr(config, name)!r} (default {defaults[name]!r})"
               for name in BUILT_IN_ONLY if name in ignored and getattr(config, name) != defaults[name]]
    if changed:
        raise ValueError(f"encoder: a user's encoder ignores the built-in encoders' options, expected them at their "
                         f"defaults, got {', '.join(changed)}: leave them unset or drop encoder=")
