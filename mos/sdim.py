"""SDIM: target attention approximated by hash sampling (Cao et al., "Sampling Is All You Need on
Modeling Long-Term User Behaviors for CTR Prediction", CIKM 2022), as an encoder of the protocol
in `mos.encoder_protocol` (E experts over expert-major segments, [E, B, d]).

Each behaviour row x and the target t get R rounds of SimHash signatures of `bits` bits each: bit
i of round r is [x . h_{r,i} > 0] for fixed random Gaussian hyperplanes h (a buffer, drawn once;
per expert). In round r the rows whose signature equals the target's are the sampled ones, and
their values are summed and L2-normalised:

    u_r = normalize( sum_{j : sig_r(x_j) = sig_r(t)} W_v x_j + b_v ),   out = W_o mean_r(u_r) + b_o

Two vectors at angle theta collide in a round with probability (1 - theta / pi)^bits, so the
sampled sum weighs each behaviour by a kernel of its similarity to the target, as a target
attention does, at the cost of hashing (no N x B score matrix). Hashes are not differentiable: the
rows and the target are trained through the values only, as in the paper. A round with no
collision gives u_r = 0; an empty segment gives zeros.

Reconstruction choices (the paper hashes the raw embeddings and sums per round; the projections
W_v, W_o per expert are ours, so that K theme experts hold different parameters): docs/design.md.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

import mos_kernels as mk
from mos_kernels.backend import op_backends
from mos_kernels.checks import check_count
from mos_kernels.jagged import expert_offsets as jagged_expert_offsets, segment_ids

NORM_EPS = 1e-12    # a round whose sampled sum is (numerically) zero stays zero
MAX_BITS = 62       # a round's signature is one int64


def sdim_flops(num_rows: int, num_segments: int, dim: int, rounds: int, bits: int) -> int:
    """Forward FLOPs of `SDIMEncoder` as matrix products count them (torch's FlopCounterMode, the
    profile's counter): the rows' and targets' signatures 2 (N + S) d R bits, the values 2 N d^2,
    the output 2 S d^2. N rows, S = E*B segments. The per-round masked sums (R N d adds) and norms
    are elementwise work, which the counter leaves out for every encoder alike."""
    return 2 * (num_rows + num_segments) * dim * rounds * bits + 2 * num_rows * dim * dim + 2 * num_segments * dim * dim


class SDIMEncoder(nn.Module):
    """Hash-sampled target attention per expert (module docstring). rows [N, d], target [B, d],
    segment_offsets [E*B+1] -> [E, B, d] in the rows' dtype (hashing and sums in fp32 at least).
    rounds, bits: R rounds of `bits`-bit signatures (1 <= bits <= 62). Raises TypeError/ValueError
    naming a bad count."""

    def __init__(self, dim: int, num_experts: int = 1, rounds: int = 16, bits: int = 3, backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts), ("rounds", rounds)):
            check_count(name, value)
        check_count("bits", bits)
        if bits > MAX_BITS:
            raise ValueError(f"bits: expected at most {MAX_BITS} (a round's signature is one int64), got {bits}")
        self.dim, self.num_experts, self.rounds, self.bits = dim, num_experts, rounds, bits
        self.backends = op_backends(backend)
        bound = 1.0 / math.sqrt(dim)      # nn.Linear's default init, per expert
        self.w_value = nn.Parameter(torch.empty(num_experts, dim, dim).uniform_(-bound, bound))
        self.b_value = nn.Parameter(torch.empty(num_experts, dim).uniform_(-bound, bound))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, dim).uniform_(-bound, bound))
        self.b_out = nn.Parameter(torch.empty(num_experts, dim).uniform_(-bound, bound))
        # Fixed, not trained; saved with the weights so that a loaded model hashes as it was trained.
        self.register_buffer("hyperplanes", torch.randn(num_experts, dim, rounds * bits))
        self.register_buffer("bit_weights", 2 ** torch.arange(bits), persistent=False)

    def _codes(self, projected: torch.Tensor) -> torch.Tensor:
        """[n, R*bits] projections -> [n, R] int64 signatures (bit i of round r: projection > 0)."""
        bits = (projected > 0).view(-1, self.rounds, self.bits).long()
        return (bits * self.bit_weights).sum(-1)

    def forward(self, rows: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                max_len: Optional[int] = None) -> torch.Tensor:
        num_experts, num_examples, dim = self.num_experts, target.shape[0], self.dim
        num_segments = num_experts * num_examples
        acc = torch.promote_types(rows.dtype, torch.float32)
        segment = segment_ids(segment_offsets, rows.shape[0], check=False)                  # [N]
        expert_offsets = jagged_expert_offsets(segment_offsets, num_experts)
        with torch.no_grad():            # signatures are not differentiable: no graph for them
            planes = self.hyperplanes.to(acc)
            # On the reference whatever the backend: a sign test is discontinuous, so a kernel's
            # last-bit rounding would move a row near a hyperplane between buckets.
            row_sig = self._codes(mk.grouped_linear(rows.to(acc), planes, None, expert_offsets,
                                                    backend="reference"))                                # [N, R]
            target_projected = torch.einsum("bd,edh->ebh", target.to(acc), planes)
            target_sig = self._codes(target_projected.reshape(num_segments, planes.shape[2]))  # [S, R]
            sampled = (row_sig == target_sig[segment]).to(acc)                  # [N, R]
        values = mk.grouped_linear(rows, self.w_value, self.b_value, expert_offsets,
                                   backend=self.backends["grouped_linear"]).to(acc)
        pooled = rows.new_zeros((num_segments, dim), dtype=acc)
        for r in range(self.rounds):     # one [N, d] product per round, not an [N, R, d] tensor
            sums = torch.zeros((num_segments, dim), dtype=acc, device=rows.device).index_add(
                0, segment, values * sampled[:, r:r + 1])
            pooled = pooled + sums / sums.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        pooled = (pooled / self.rounds).view(num_experts, num_examples, dim)
        out = torch.einsum("ebd,edf->ebf", pooled, self.w_out.to(acc)) + self.b_out[:, None].to(acc)
        lengths = segment_offsets[1:] - segment_offsets[:-1]
        return (out * (lengths > 0).view(num_experts, num_examples, 1)).to(rows.dtype)
