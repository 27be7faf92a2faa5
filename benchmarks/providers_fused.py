"""The `compiled_fused` provider: the kernels' own algorithms in plain PyTorch ops, compiled.

The `compiled` provider compiles the reference, which is written to be obviously correct, not
fast: its grouped linear is a custom op that inductor cannot see into (padding, a batched GEMM,
index copies, all eager), and its target attention projects keys and values for every row. A
ratio over it partly measures the algorithm. This provider gives torch.compile the algorithm
the kernels run, so that a ratio over it measures the kernels:

  fused_target_attention  the key projection folded into the query (mos_kernels/expert_target_attention_kernels.py
                          derives it): per row a score and an accumulation per head, one value
                          projection per segment; segment softmax by scatter_reduce / index_add
  fused_grouped_linear    one grouped GEMM over the expert-major rows: bf16 on CUDA by
                          torch.nn.functional.grouped_mm (else torch._grouped_mm), other dtypes
                          and devices by the reference's padded batched GEMM as plain ops
  fuse_layer              a MoSLayer whose target-attention experts run fused_target_attention
"""
from __future__ import annotations

import math
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import Provider
from mos.encoders import TargetAttentionEncoder, _nonempty
from mos_kernels.jagged import positions_in_segment, segment_ids

# backend "fused" is this module's: the cases that have a fused form run it for this provider.
COMPILED_FUSED = Provider("compiled_fused", "fused", compiled=True)


def gathered(x: torch.Tensor, gather_index: Optional[torch.Tensor], row_gate: Optional[torch.Tensor]) -> torch.Tensor:
    """mk.theme_gather's reference as plain ops: x[gather_index] * row_gate (x without an index)."""
    if gather_index is None:
        return x
    rows = x[gather_index]
    return rows if row_gate is None else rows * row_gate[:, None].to(x.dtype)


def fused_target_attention(tokens: torch.Tensor, query: torch.Tensor, w_key: torch.Tensor,
                           b_key: Optional[torch.Tensor], w_value: torch.Tensor, b_value: Optional[torch.Tensor],
                           segment_offsets: torch.Tensor, *, num_heads: int, gather_index: Optional[torch.Tensor] = None,
                           row_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[G, d]: what mk.expert_target_attention returns, by the folded algorithm."""
    num_segments, dim = query.shape
    num_experts, head_dim = w_key.shape[0], dim // num_heads
    rows = gathered(tokens, gather_index, row_gate)
    seg = segment_ids(segment_offsets, rows.shape[0], check=False)
    wide = torch.promote_types(query.dtype, torch.float32)       # softmax and sums as the reference
    # Q_h = s W_k,h q_h: [E, B, H, d], one per segment and head.
    heads = query.to(wide).view(num_experts, -1, num_heads, head_dim)
    folded = torch.einsum("ebhc,ejhc->ebhj", heads, w_key.to(wide).view(num_experts, dim, num_heads, head_dim))
    folded = folded.reshape(num_segments, num_heads, dim) / math.sqrt(head_dim)
    x = rows.to(wide)
    scores = torch.einsum("nd,nhd->nh", x, folded[seg])
    if b_key is not None:
        # s b_k,h . q_h: the same for every row of a segment, so it cancels in the softmax; kept
        # (G·H numbers) so that b_key gets its zero gradient as in the reference.
        bias_term = (heads * b_key.to(wide).view(num_experts, 1, num_heads, head_dim)).sum(-1) / math.sqrt(head_dim)
        scores = scores + bias_term.reshape(num_segments, num_heads)[seg]
    # The max is only a stabiliser (it cancels), so no gradient flows through it.
    seg_max = scores.new_full((num_segments, num_heads), -math.inf)
    seg_max = seg_max.scatter_reduce(0, seg[:, None].expand_as(scores), scores.detach(), "amax")
    weights = torch.exp(scores - seg_max[seg])
    probs = weights / weights.new_zeros((num_segments, num_heads)).index_add(0, seg, weights)[seg]
    pooled = x.new_zeros((num_segments, num_heads, dim)).index_add(0, seg, probs[:, :, None] * x[:, None, :])
    # out_h = A_h W_v,h + b_v,h (the probabilities of a non-empty segment sum to 1; an empty one gives 0).
    out = torch.einsum("ebhj,ejhc->ebhc", pooled.view(num_experts, -1, num_heads, dim),
                       w_value.to(wide).view(num_experts, dim, num_heads, head_dim))
    if b_value is not None:
        nonempty = (segment_offsets[1:] > segment_offsets[:-1]).to(wide).view(num_experts, -1, 1, 1)
        out = out + b_value.to(wide).view(num_experts, 1, num_heads, head_dim) * nonempty
    return out.reshape(num_segments, dim).to(tokens.dtype)


def grouped_gemm_path(rows: torch.Tensor) -> str:
    """How fused_grouped_linear multiplies `rows`: "grouped_mm" (bf16 on CUDA, where torch has it:
    its kernel and its compile-time shape check take bf16 only), else "padded_bmm" (the blocks
    padded to the longest and one batched GEMM, as the reference does on a GPU)."""
    has_grouped_mm = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return "grouped_mm" if has_grouped_mm and rows.is_cuda and rows.dtype == torch.bfloat16 else "padded_bmm"


def fused_grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         expert_offsets: torch.Tensor, *, max_rows: int) -> torch.Tensor:
    """[N, d_out]: what mk.grouped_linear returns, by one grouped GEMM. max_rows: the longest
    expert block (the padded path pads to it)."""
    expert = segment_ids(expert_offsets, x.shape[0], check=False)
    if grouped_gemm_path(x) == "grouped_mm":
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        # offs: the end of every expert's block, int32.
        y = grouped_mm(x, weight.to(x.dtype), offs=expert_offsets[1:].to(torch.int32))
    else:
        # The reference's GPU algorithm (mos_kernels/grouped_linear.py), here as plain ops rather
        # than inside its custom op, so the compiler sees and fuses the copies around the GEMM.
        pos = positions_in_segment(expert_offsets, x.shape[0], check=False)
        padded = x.new_zeros((weight.shape[0], max_rows, x.shape[1])).index_put((expert, pos), x)
        y = torch.bmm(padded, weight.to(x.dtype))[expert, pos]
    return y if bias is None else y + bias.to(y.dtype)[expert]


def _fused_encoder_forward(self: TargetAttentionEncoder, tokens, target, segment_offsets, *, gather_index=None,
                           row_gate=None, inverse_index=None, max_len=None):
    # TargetAttentionEncoder.forward (mos/encoders.py) with its attention op replaced: keep in step.
    query = torch.einsum("bd,edf->ebf", target, self.w_query) + self.b_query[:, None]
    attended = fused_target_attention(tokens, query.reshape(-1, self.dim), self.w_key, self.b_key, self.w_value,
                                      self.b_value, segment_offsets, num_heads=self.num_heads,
                                      gather_index=gather_index, row_gate=row_gate)
    out = torch.einsum("ebd,edf->ebf", attended.view(self.num_experts, -1, self.dim), self.w_out)
    return (out + self.b_out[:, None]) * _nonempty(segment_offsets, self.num_experts)


def fuse_layer(layer: nn.Module) -> nn.Module:
    """`layer` (in place) with every target-attention encoder running the folded algorithm; its
    parameters and their names are unchanged, so the other providers' weights load into it."""
    encoders = [m for m in layer.modules() if isinstance(m, TargetAttentionEncoder)]
    if not encoders:
        raise ValueError("layer: expected a module with target-attention encoders, got none")
    for encoder in encoders:
        encoder.forward = types.MethodType(_fused_encoder_forward, encoder)
    return layer
