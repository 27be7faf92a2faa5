"""`expert_target_attention`: per-expert target attention over jagged segments.

For every segment g of a layout with E experts and B examples (g = e*B + b, expert e = g // B):
multi-head attention of query[g] over expert e's key and value projections of the segment's
rows, rows = tokens[gather_index] * row_gate (tokens themselves without gather_index). Empty
segments give zeros.

Reference: vectorised PyTorch (the references of theme_gather and grouped_linear, a segment
softmax with index_add): the oracle of the kernels.

Triton: `expert_target_attention_kernels` (the key projection folded into the query, one program
per segment, forward and backward); the per-expert weight gradients are GEMMs over the B segments
of each expert (deterministic), the tokens' gradient the gather's backward (`theme_scatter`).
Custom ops mos::expert_target_attention and mos::expert_target_attention_backward, with FLOP formulas.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import (FLOAT_DTYPES, check_count, check_finite, check_gather_index, check_offsets, check_tensor,
                     check_values)
from ._layout import kernel_op
from .backend import resolve_backend
from .grouped_linear import grouped_linear_reference
from .jagged import expert_offsets, segment_ids
from ._launch import dot_precision
from .theme_gather import inverse_of, theme_gather_reference

MAX_HEADS = 16   # the kernels' BLOCK_H: the heads are the rows of a tl.dot operand, which needs >= 16


def expert_target_attention(tokens: torch.Tensor, query: torch.Tensor, w_key: torch.Tensor,
                            b_key: Optional[torch.Tensor], w_value: torch.Tensor,
                            b_value: Optional[torch.Tensor], segment_offsets: torch.Tensor, *,
                            num_heads: int, gather_index: Optional[torch.Tensor] = None,
                            row_gate: Optional[torch.Tensor] = None, inverse_index: Optional[torch.Tensor] = None,
                            backend: str = "auto") -> torch.Tensor:
    """tokens [T, d]; query [E*B, d]; w_key/w_value [E, d, d]; b_key/b_value [E, d] or None;
    segment_offsets [E*B+1] over the rows tokens[gather_index] * row_gate (tokens themselves when
    gather_index is None; inverse_index as in `theme_gather`).
    Returns [E*B, d]: per head, softmax(q·k/√dh) weighted values."""
    _check_args(tokens, query, w_key, b_key, w_value, b_value, segment_offsets, num_heads, gather_index, row_gate,
                inverse_index)
    num_experts = w_key.shape[0]
    if resolve_backend(backend, tokens, "expert_target_attention") == "triton":
        if num_heads > MAX_HEADS:
            raise ValueError(f"num_heads: expected at most {MAX_HEADS} for backend 'triton', got {num_heads}")
        if gather_index is not None and inverse_index is None and tokens.requires_grad:
            inverse_index = inverse_of(gather_index, tokens.shape[0])
        return torch.ops.mos.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, segment_offsets,
                                                     gather_index, row_gate, inverse_index, num_heads)[0]
    rows = tokens if gather_index is None else theme_gather_reference(tokens, gather_index, row_gate)
    experts = expert_offsets(segment_offsets, num_experts)
    keys = grouped_linear_reference(rows, w_key, b_key, experts)
    values = grouped_linear_reference(rows, w_value, b_value, experts)
    return _segment_attention(query, keys, values, segment_offsets, num_heads)


def _check_args(tokens, query, w_key, b_key, w_value, b_value, segment_offsets, num_heads, gather_index, row_gate,
                inverse_index):
    """Once, at the entry, for every backend (the reference composes the other ops' references,
    which check nothing)."""
    check_values("tokens", tokens)
    dim = tokens.shape[1]
    check_tensor("query", query, ndim=2, dtypes=FLOAT_DTYPES, device=tokens.device)
    for name, t, ndim in (("w_key", w_key, 3), ("w_value", w_value, 3), ("b_key", b_key, 2), ("b_value", b_value, 2)):
        if t is not None or name.startswith("w_"):      # the biases are optional, the weights are not
            check_tensor(name, t, ndim=ndim, dtypes=FLOAT_DTYPES, device=tokens.device)
    num_experts = w_key.shape[0]
    if num_experts < 1 or query.shape[0] % num_experts or query.shape[1] != dim:
        raise ValueError(f"query: expected shape [E*B, {dim}] with E={num_experts} (from w_key), "
                         f"got {tuple(query.shape)}")
    for name, t, shape in (("w_value", w_value, (num_experts, dim, dim)), ("w_key", w_key, (num_experts, dim, dim)),
                           ("b_key", b_key, (num_experts, dim)), ("b_value", b_value, (num_experts, dim))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    for name, t in (("query", query), ("w_key", w_key), ("w_value", w_value), ("b_key", b_key), ("b_value", b_value)):
        if t is not None:
            check_finite(name, t)
    check_count("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads: expected a divisor of d={dim}, got {num_heads}")
    if row_gate is not None and gather_index is None:
        raise ValueError("row_gate: expected None when gather_index is None (a gate scales gathered rows)")
    num_rows = tokens.shape[0]
    if gather_index is not None:
        num_rows = gather_index.numel()
        check_gather_index(gather_index, row_gate, inverse_index, tokens.device, tokens.shape[0], num_rows)
    check_offsets("segment_offsets", segment_offsets, total=num_rows, device=tokens.device)
    if segment_offsets.numel() != query.shape[0] + 1:
        raise ValueError(f"segment_offsets: expected {query.shape[0] + 1} entries (one segment per query row), "
                         f"got {segment_offsets.numel()}")


def _segment_attention(query, keys, values, segment_offsets, num_heads):
    num_segments, dim = query.shape
    head_dim = dim // num_heads
    seg = segment_ids(segment_offsets, keys.shape[0], check=False)
    q = query.view(num_segments, num_heads, head_dim)[seg]
    # Softmax in fp32 at least (float64 stays float64: the reference is the float64 oracle too).
    acc = torch.promote_types(query.dtype, torch.float32)
    scores = (q * keys.view(-1, num_heads, head_dim)).sum(-1).to(acc) / math.sqrt(head_dim)
    # The max is only a stabiliser (it cancels), so no gradient flows through it.
    seg_max = torch.full((num_segments, num_heads), -math.inf, dtype=acc, device=scores.device)
    seg_max = seg_max.scatter_reduce(0, seg[:, None].expand_as(scores), scores.detach(), "amax")
    weights = torch.exp(scores - seg_max[seg])
    denom = weights.new_zeros((num_segments, num_heads)).index_add(0, seg, weights)
    probs = (weights / denom[seg]).to(values.dtype)
    weighted = (probs[:, :, None] * values.view(-1, num_heads, head_dim)).reshape(-1, dim)
    return values.new_zeros((num_segments, dim)).index_add(0, seg, weighted)


# ----------------------------------------------------------------------------- custom ops

@kernel_op("mos::expert_target_attention")
def _expert_target_attention_op(tokens: torch.Tensor, query: torch.Tensor, w_key: torch.Tensor,
                                b_key: Optional[torch.Tensor], w_value: torch.Tensor, b_value: Optional[torch.Tensor],
                                segment_offsets: torch.Tensor, gather_index: Optional[torch.Tensor],
                                row_gate: Optional[torch.Tensor], inverse_index: Optional[torch.Tensor],
                                num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [G, d] in the tokens' dtype, A [G, H, d] fp32, log-sum-exp [G, H] fp32). b_key is
    taken only to give it its (zero) gradient; inverse_index only for the backward."""
    num_segments, dim = query.shape
    num_experts = w_key.shape[0]
    out = new_output((num_segments, dim), dtype=tokens.dtype, device=tokens.device)
    pooled = new_output((num_segments, num_heads, dim), dtype=torch.float32, device=tokens.device)
    lse = new_output((num_segments, num_heads), dtype=torch.float32, device=tokens.device)
    if num_segments:
        # triton only where a kernel launches
        from .expert_target_attention_kernels import _target_attention_fwd, attention_blocks

        block_t, block_d, num_warps, num_stages = attention_blocks(dim, tokens.dtype, backward=False)
        _target_attention_fwd[(num_segments,)](
            tokens, gather_index, row_gate, query, w_key, w_value, b_value, segment_offsets, out, pooled, lse,
            num_segments // num_experts, dim, num_heads, dim // num_heads, 1.0 / math.sqrt(dim // num_heads),
            HAS_INDEX=gather_index is not None, HAS_GATE=row_gate is not None, HAS_BIAS=b_value is not None,
            PRECISION=dot_precision(tokens.dtype), BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H=MAX_HEADS,
            NUM_STAGES=num_stages, num_warps=num_warps, num_stages=num_stages)
    return out, pooled, lse


@_expert_target_attention_op.register_fake
def _(tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate, inverse_index,
      num_heads):
    num_segments, dim = query.shape
    return (tokens.new_empty((num_segments, dim)), tokens.new_empty((num_segments, num_heads, dim), dtype=torch.float32),
            tokens.new_empty((num_segments, num_heads), dtype=torch.float32))


@kernel_op("mos::expert_target_attention_backward")
def _expert_target_attention_backward_op(g_out: torch.Tensor, tokens: torch.Tensor, query: torch.Tensor,
                                         w_key: torch.Tensor, w_value: torch.Tensor, segment_offsets: torch.Tensor,
                                         gather_index: Optional[torch.Tensor], row_gate: Optional[torch.Tensor],
                                         pooled: torch.Tensor, lse: torch.Tensor, num_heads: int
                                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient of every gathered row times its gate [N, d], of every gate [N], of the query
    [G, d], of the folded query Q [G, H, d] fp32)."""
    num_segments, dim = query.shape
    num_rows = tokens.shape[0] if gather_index is None else gather_index.numel()
    g_rows = new_output((num_rows, dim), dtype=tokens.dtype, device=tokens.device)
    gate_dtype = tokens.dtype if row_gate is None else row_gate.dtype
    g_gate = new_output((num_rows if row_gate is not None else 0,), dtype=gate_dtype, device=tokens.device)
    g_query = new_output((num_segments, dim), dtype=query.dtype, device=tokens.device)
    g_qf = new_output((num_segments, num_heads, dim), dtype=torch.float32, device=tokens.device)
    if num_segments:
        from .expert_target_attention_kernels import _target_attention_bwd, attention_blocks

        block_t, block_d, num_warps, num_stages = attention_blocks(dim, tokens.dtype, backward=True)
        _target_attention_bwd[(num_segments,)](
            tokens, gather_index, row_gate, query, w_key, w_value, segment_offsets,
            g_out, pooled, lse, g_rows, g_gate, g_query, g_qf,
            num_segments // w_key.shape[0], dim, num_heads, dim // num_heads, 1.0 / math.sqrt(dim // num_heads),
            HAS_INDEX=gather_index is not None, HAS_GATE=row_gate is not None, PRECISION=dot_precision(tokens.dtype),
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H=MAX_HEADS, NUM_STAGES=num_stages, num_warps=num_warps,
            num_stages=num_stages)
    return g_rows, g_gate, g_query, g_qf


@_expert_target_attention_backward_op.register_fake
def _(g_out, tokens, query, w_key, w_value, segment_offsets, gather_index, row_gate, pooled, lse, num_heads):
    num_segments, dim = query.shape
    num_rows = tokens.shape[0] if gather_index is None else gather_index.shape[0]
    gate_dtype = tokens.dtype if row_gate is None else row_gate.dtype
    return (tokens.new_empty((num_rows, dim)),
            tokens.new_empty((num_rows if row_gate is not None else 0,), dtype=gate_dtype),
            query.new_empty((num_segments, dim)), query.new_empty((num_segments, num_heads, dim), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate, inverse_index,
     num_heads) = inputs
    _, pooled, lse = output
    ctx.save_for_backward(tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate,
                          inverse_index, pooled, lse)
    ctx.num_heads = num_heads


def _backward(ctx, g_out, _g_pooled, _g_lse):
    (tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate, inverse_index,
     pooled, lse) = ctx.saved_tensors
    num_heads = ctx.num_heads
    num_experts, dim = w_key.shape[0], w_key.shape[1]
    head_dim = dim // num_heads
    g_rows, g_gate, g_query, g_qf = torch.ops.mos.expert_target_attention_backward(
        g_out, tokens, query, w_key, w_value, segment_offsets, gather_index, row_gate, pooled, lse, num_heads)
    if gather_index is None:
        g_tokens = g_rows
    elif ctx.needs_input_grad[0]:
        if inverse_index is None:
            raise ValueError("inverse_index: expected a tensor to differentiate tokens through gather_index, got None")
        # g_rows already carry the gate: the gather's backward without a gate sums them per token.
        g_tokens = torch.ops.mos.theme_scatter(g_rows, gather_index, None, inverse_index)
    else:
        g_tokens = None
    # Per-expert sums over its B segments, as batched GEMMs (deterministic):
    # W_k,h gets scale * dQ_h q_h^T, W_v,h gets A_h dout_h^T, b_v the dout of non-empty segments.
    split = (num_experts, -1, num_heads, head_dim)
    g_out32 = g_out.float()
    scale = 1.0 / math.sqrt(head_dim)
    g_w_key = torch.einsum("ebhj,ebhc->ejhc", g_qf.view(num_experts, -1, num_heads, dim),
                           query.float().view(split)).reshape(num_experts, dim, dim) * scale
    g_w_value = torch.einsum("ebhj,ebhc->ejhc", pooled.view(num_experts, -1, num_heads, dim),
                             g_out32.view(split)).reshape(num_experts, dim, dim)
    g_b_value = None
    if b_value is not None:
        nonempty = (segment_offsets[1:] > segment_offsets[:-1]).to(torch.float32)
        g_b_value = (g_out32 * nonempty[:, None]).view(num_experts, -1, dim).sum(1).to(b_value.dtype)
    g_b_key = None if b_key is None else torch.zeros_like(b_key)
    return (g_tokens, g_query, g_w_key.to(w_key.dtype), g_b_key, g_w_value.to(w_value.dtype), g_b_value, None, None,
            g_gate if row_gate is not None else None, None, None)


_expert_target_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mos.expert_target_attention)
def _expert_target_attention_flops(tokens_shape, query_shape, w_key_shape, b_key_shape, w_value_shape, b_value_shape,
                                   offsets_shape, gather_index_shape, row_gate_shape, inverse_shape, num_heads,
                                   *args, out_shape=None, **kwargs):
    num_rows = tokens_shape[0] if gather_index_shape is None else gather_index_shape[0]
    num_segments, dim = query_shape
    # Per row and head a score and an accumulation (2d each); per segment the fold of the query
    # and the value projection (2d^2 each).
    return 4 * num_rows * num_heads * dim + 4 * num_segments * dim * dim


@register_flop_formula(torch.ops.mos.expert_target_attention_backward)
def _expert_target_attention_backward_flops(g_out_shape, tokens_shape, query_shape, w_key_shape, w_value_shape,
                                            offsets_shape, gather_index_shape, *args, out_shape=None, **kwargs):
    num_rows = tokens_shape[0] if gather_index_shape is None else gather_index_shape[0]
    num_segments, dim = query_shape
    num_heads = out_shape[3][1]
    # Per row and head: score, dp, two terms of dx and dQ (2d each); per segment the three folds.
    return 10 * num_rows * num_heads * dim + 6 * num_segments * dim * dim
