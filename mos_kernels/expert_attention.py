"""Expert encoders' attention over jagged segments.

`expert_target_attention`: for every segment g of a layout with E experts and B examples
(g = e*B + b, expert e = g // B), multi-head attention of query[g] over expert e's key and
value projections of the segment's rows. Empty segments give zeros.

`jagged_self_attention`: causal multi-head attention inside each segment.

Both references are vectorised PyTorch (segment softmax with index_add; padded attention) and
are the oracle for the fused kernels that come behind the same functions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_offsets, check_positive, check_tensor, check_values
from .backend import resolve_backend
from .grouped_linear import grouped_linear
from .jagged import jagged_to_padded, max_segment_length, positions_in_segment, segment_ids
from .theme_gather import theme_gather


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
    check_values("tokens", tokens)
    dim = tokens.shape[1]
    check_tensor("query", query, ndim=2, dtypes=FLOAT_DTYPES, device=tokens.device)
    check_tensor("w_key", w_key, ndim=3, dtypes=FLOAT_DTYPES, device=tokens.device)
    num_experts = w_key.shape[0]
    if num_experts < 1 or query.shape[0] % num_experts or query.shape[1] != dim:
        raise ValueError(f"query: expected shape [E*B, {dim}] with E={num_experts} (from w_key), "
                         f"got {tuple(query.shape)}")
    check_positive("num_heads", num_heads)
    if dim % num_heads:
        raise ValueError(f"num_heads: expected a divisor of d={dim}, got {num_heads}")
    num_rows = tokens.shape[0] if gather_index is None else gather_index.numel()
    check_offsets("segment_offsets", segment_offsets, total=num_rows, device=tokens.device)
    if segment_offsets.numel() != query.shape[0] + 1:
        raise ValueError(f"segment_offsets: expected {query.shape[0] + 1} entries (one segment per query row), "
                         f"got {segment_offsets.numel()}")
    if row_gate is not None and gather_index is None:
        raise ValueError("row_gate: expected None when gather_index is None (a gate scales gathered rows)")
    resolve_backend(backend, tokens, "expert_target_attention")
    rows = tokens if gather_index is None else theme_gather(tokens, gather_index, row_gate,
                                                            inverse_index=inverse_index, backend=backend)
    num_examples = query.shape[0] // num_experts
    expert_offsets = segment_offsets[::num_examples] if num_examples else segment_offsets.new_zeros(num_experts + 1)
    keys = grouped_linear(rows, w_key, b_key, expert_offsets, backend="reference")
    values = grouped_linear(rows, w_value, b_value, expert_offsets, backend="reference")
    return _segment_attention(query, keys, values, segment_offsets, num_heads)


def _segment_attention(query, keys, values, segment_offsets, num_heads):
    num_segments, dim = query.shape
    head_dim = dim // num_heads
    seg = segment_ids(segment_offsets, keys.shape[0])
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


def jagged_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_offsets: torch.Tensor, *,
                          num_heads: int, max_len: Optional[int] = None, causal: bool = True,
                          backend: str = "auto") -> torch.Tensor:
    """q, k, v [N, d] in one jagged layout -> [N, d]; row i attends to rows j <= i of its segment."""
    check_tensor("q", q, ndim=2, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} like q, got {tuple(t.shape)}")
    check_positive("num_heads", num_heads)
    if q.shape[1] % num_heads:
        raise ValueError(f"num_heads: expected a divisor of d={q.shape[1]}, got {num_heads}")
    check_offsets("segment_offsets", segment_offsets, total=q.shape[0], device=q.device)
    resolve_backend(backend, q, "jagged_self_attention")
    if max_len is None:
        max_len = max_segment_length(segment_offsets)
    return _jagged_self_attention_reference(q, k, v, segment_offsets, num_heads, max_len, causal)


def _jagged_self_attention_reference(q, k, v, segment_offsets, num_heads, max_len, causal):
    num_rows, dim = q.shape
    head_dim = dim // num_heads
    num_segments = segment_offsets.numel() - 1

    def heads(x):  # [N, d] -> [G, H, L, dh]
        padded = jagged_to_padded(x, segment_offsets, max_len)
        return padded.view(num_segments, max_len, num_heads, head_dim).transpose(1, 2)

    acc = torch.promote_types(q.dtype, torch.float32)
    scores = heads(q).to(acc) @ heads(k).to(acc).transpose(-1, -2) / math.sqrt(head_dim)
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    pos = torch.arange(max_len, device=q.device)
    allowed = pos[None, None, :] < lengths[:, None, None]            # key is a real row
    if causal:
        allowed = allowed & (pos[None, None, :] <= pos[None, :, None])
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    # Padded query rows have no allowed key; their NaN rows are never read back.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)
    out = (probs @ heads(v)).transpose(1, 2).reshape(num_segments, max_len, dim)
    return out[segment_ids(segment_offsets, num_rows), positions_in_segment(segment_offsets, num_rows)]
