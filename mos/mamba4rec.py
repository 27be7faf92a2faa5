"""Mamba4Rec: a selective state-space encoder (Liu et al., "Mamba4Rec: Towards Efficient Sequential
Recommendation with Selective State Space Models", 2024; the Mamba block of Gu and Dao, 2023), as
an encoder of the protocol in `mos.encoder_protocol` (E experts over expert-major segments).

Per expert and layer, over each segment's rows x_1..x_L in time order (pre-LN residual blocks):

    [u, z] = LN(x) W_in                                  u, z: [L, D], D = EXPAND * d
    u      = silu(causal depthwise conv_k(u))            kernel CONV_WIDTH, inside the segment only
    [r, B, C] = u W_x                                    r: [L, dt_rank]; B, C: [L, S] (input-dependent)
    delta  = softplus(r W_dt + b_dt)                     [L, D], input-dependent step
    h_t    = exp(delta_t A) * h_{t-1} + delta_t u_t B_t  [D, S]; A = -exp(A_log) diagonal, h_0 = 0
    y_t    = h_t C_t + D_skip * u_t,   x <- x + (y * silu(z)) W_out
    x      <- x + W_2 gelu(W_1 LN(x))                     the position-wise feed-forward of Mamba4Rec

then a target attention over the encoded rows reads out one vector per segment (as the
transformer encoder does; Mamba4Rec reads the last position for next-item prediction, a CTR model
scores a given candidate). The scan and its readout through C are `mos_kernels.selective_scan`:
vectorised over all segments, exact on jagged ones (an empty segment gives zeros); its Triton
kernels keep the [D, S] states in registers, as Mamba's fused kernel does. Initialisation as Mamba's: A_log = log(1..S),
delta's bias so that softplus gives steps log-uniform in [1e-3, 1e-1], D_skip = 1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.backend import op_backends
from mos_kernels.checks import check_count
from mos_kernels.jagged import expert_offsets as jagged_expert_offsets, max_segment_length, positions_in_segment
from mos_kernels.jagged import segment_ids
from mos_kernels.selective_scan import MAX_STATE


EXPAND = 2          # inner width D = EXPAND * d (Mamba's default)
CONV_WIDTH = 4      # causal depthwise convolution over the last 4 rows (Mamba's default)
DT_MIN, DT_MAX = 1e-3, 1e-1


def shift_rows(x: torch.Tensor, step: int) -> torch.Tensor:
    """Row t of the result is row t - step of x (zeros for t < step). No branch on the row count:
    under torch.compile a theme's rows are a data-dependent size, which a comparison cannot guard."""
    return F.pad(x, (0, 0) * (x.dim() - 1) + (step, 0))[:x.shape[0]]


def _uniform(*shape, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)     # nn.Linear's default init
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def mamba_layer_flops(num_rows: int, dim: int, state: int) -> int:
    """Forward FLOPs of one Mamba4Rec layer over N rows (the readout not included) as the profile's
    counter counts them: 2 per multiply-add of the in, x, dt and out projections, the feed-forward
    and the C contraction, and the scan's 2 per state element (N D S of them). Elementwise work
    (the convolution, gates, exp, the outer product delta u B^T, norms) is left out, as for every
    encoder."""
    inner, rank = EXPAND * dim, dt_rank(dim)
    products = dim * 2 * inner + inner * (rank + 2 * state) + rank * inner + inner * dim + 2 * dim * 2 * dim
    return 2 * num_rows * products + 2 * num_rows * inner * state * 2


def dt_rank(dim: int) -> int:
    """The rank of the step's projection, ceil(d / 16) (Mamba's default)."""
    return math.ceil(dim / 16)


class _MambaBlock(nn.Module):
    def __init__(self, dim: int, num_experts: int, state: int):
        super().__init__()
        inner, rank = EXPAND * dim, dt_rank(dim)
        self.inner, self.rank, self.state = inner, rank, state
        self.ln1_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.ln1_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.w_in = _uniform(num_experts, dim, 2 * inner, fan_in=dim)
        self.conv_weight = _uniform(num_experts, inner, CONV_WIDTH, fan_in=CONV_WIDTH)
        self.conv_bias = _uniform(num_experts, inner, fan_in=CONV_WIDTH)
        self.w_x = _uniform(num_experts, inner, rank + 2 * state, fan_in=inner)
        self.w_dt = _uniform(num_experts, rank, inner, fan_in=rank)
        dt = torch.exp(torch.empty(num_experts, inner).uniform_(math.log(DT_MIN), math.log(DT_MAX)))
        self.b_dt = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))          # softplus^-1(dt)
        self.a_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(
            num_experts, inner, 1))
        self.d_skip = nn.Parameter(torch.ones(num_experts, inner))
        self.w_out = _uniform(num_experts, inner, dim, fan_in=inner)
        self.ln2_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.ln2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.w_ff1 = _uniform(num_experts, dim, 2 * dim, fan_in=dim)
        self.b_ff1 = _uniform(num_experts, 2 * dim, fan_in=dim)
        self.w_ff2 = _uniform(num_experts, 2 * dim, dim, fan_in=2 * dim)
        self.b_ff2 = _uniform(num_experts, dim, fan_in=2 * dim)

    def forward(self, rows, expert, expert_offsets, segment_offsets, position, dropout, backends):
        linear = backends["grouped_linear"]
        dim, inner, rank, state = rows.shape[1], self.inner, self.rank, self.state
        h = F.layer_norm(rows, (dim,)) * self.ln1_weight[expert] + self.ln1_bias[expert]
        u, z = mk.grouped_linear(h, self.w_in, None, expert_offsets, backend=linear).split(inner, dim=1)
        conv = self.conv_bias[expert].to(u.dtype)
        for lag in range(CONV_WIDTH):        # causal: row t reads rows t - lag of its own segment
            shifted = shift_rows(u, lag) * (position >= lag)[:, None].to(u.dtype) if lag else u
            conv = conv + shifted * self.conv_weight[expert, :, CONV_WIDTH - 1 - lag].to(u.dtype)
        u = F.silu(conv)
        r, b_in, c_out = mk.grouped_linear(u, self.w_x, None, expert_offsets, backend=linear).split(
            [rank, state, state], dim=1)
        delta = F.softplus(mk.grouped_linear(r, self.w_dt, self.b_dt, expert_offsets, backend=linear))
        a = -torch.exp(self.a_log.to(delta.dtype))                       # [E, D, S]
        y = mk.selective_scan(u, delta, a, b_in, c_out, segment_offsets, backend=backends["selective_scan"])
        y = y + self.d_skip[expert].to(u.dtype) * u
        rows = rows + F.dropout(mk.grouped_linear(y * F.silu(z), self.w_out, None, expert_offsets, backend=linear),
                                dropout)
        h = F.layer_norm(rows, (dim,)) * self.ln2_weight[expert] + self.ln2_bias[expert]
        h = F.gelu(mk.grouped_linear(h, self.w_ff1, self.b_ff1, expert_offsets, backend=linear))
        return rows + F.dropout(mk.grouped_linear(h, self.w_ff2, self.b_ff2, expert_offsets, backend=linear), dropout)


class Mamba4RecEncoder(nn.Module):
    """Selective state-space layers per expert, then a readout (module docstring). rows [N, d],
    target [B, d], segment_offsets [E*B+1] -> [E, B, d]. state: S, the state size per channel;
    num_layers Mamba blocks; make_readout() builds the readout, an encoder of the same E experts
    over the encoded rows (`mos.encoders.make_encoder` passes a target attention), built after
    the blocks so that their weights are drawn first."""

    def __init__(self, dim: int, num_experts: int, make_readout: Callable[[], nn.Module], num_layers: int = 1,
                 state: int = 16, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts), ("num_layers", num_layers),
                            ("state", state)):
            check_count(name, value)
        self.dim, self.num_experts, self.dropout = dim, num_experts, dropout
        self.backends = op_backends(backend)
        if self.backends["selective_scan"] == "triton" and state > MAX_STATE:
            raise ValueError(f"state: expected at most {MAX_STATE} for backend {backend!r} (the Triton selective "
                             f"scan holds a channel's states in one tile; 'auto' or 'reference' take more), got {state}")
        self.layers = nn.ModuleList(_MambaBlock(dim, num_experts, state) for _ in range(num_layers))
        self.target_readout = make_readout()

    def forward(self, rows: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                max_len: Optional[int] = None) -> torch.Tensor:
        num_rows = rows.shape[0]
        expert_offsets = jagged_expert_offsets(segment_offsets, self.num_experts)
        expert = segment_ids(expert_offsets, num_rows, check=False)
        position = positions_in_segment(segment_offsets, num_rows, check=False)
        if max_len is None:
            max_len = max_segment_length(segment_offsets)
        for block in self.layers:
            rows = block(rows, expert, expert_offsets, segment_offsets, position,
                         self.dropout if self.training else 0.0, self.backends)
        return self.target_readout(rows, target, segment_offsets, max_len=max_len)
