"""`expert_target_attention`: per-expert target attention over jagged segments.

For every segment g of a layout with E experts and B examples (g = e*B + b, expert e = g // B):
multi-head attention of query[g] over expert e's key and value projections of the segment's
rows, rows = tokens[gather_index] * row_gate (tokens themselves without gather_index). Empty
segments give zeros.

Reference: vectorised PyTorch (the references of theme_gather and grouped_linear, a segment
softmax with index_add):
the oracle of the kernels.

Triton: the key projection is folded into the query. Per head h, with q_h the head's slice of
the query, W_k,h / W_v,h the head's columns of the projections and s = 1/sqrt(dh):
    score_i = s q_h . (x_i W_k,h + b_k,h) = x_i . (s W_k,h q_h) + s b_k,h . q_h
The last term is the same for every row of the segment and cancels in the softmax, so with
Q_h = s W_k,h q_h (d numbers) p = softmax_i(x_i . Q_h) exactly, and
    out_h = sum_i p_i (x_i W_v,h + b_v,h) = (sum_i p_i x_i) W_v,h + b_v,h sum_i p_i
where sum_i p_i = 1 on a non-empty segment and the sum is empty (out = 0) on an empty one. A
row then costs O(d*H) (a score and an accumulation per head) instead of the O(d^2) of projecting
it; b_k has no effect on the output (its gradient is exactly zero).
`_target_attention_fwd`, one program per segment: folds the query, streams the segment's rows
(the gather fused into pipelined loads, the gate into the scores and weights: x_i . Q_h =
gate_i (t_i . Q_h)) with an online softmax into A_h = sum_i p_i x_i, projects A through W_v
and stores the output, A and the log-sum-exp. `_target_attention_bwd`, one program per segment,
recomputes p from the log-sum-exp and writes the gradients of the rows, gates, query and Q_h;
the per-expert weight gradients are GEMMs over the B segments of each expert (deterministic),
the tokens' gradient the gather's backward (`theme_scatter`).
Custom ops mos::expert_target_attention and mos::expert_target_attention_backward, with FLOP formulas.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import FLOAT_DTYPES, check_gather_index, check_offsets, check_positive, check_tensor, check_values
from ._layout import kernel_op
from .backend import resolve_backend
from .grouped_linear import grouped_linear_reference
from .jagged import expert_offsets, segment_ids
from .theme_gather import inverse_of, theme_gather_reference
from .triton_helpers import dot_precision, segment_bounds


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
        if t is not None:
            check_tensor(name, t, ndim=ndim, dtypes=FLOAT_DTYPES, device=tokens.device)
    num_experts = w_key.shape[0]
    if num_experts < 1 or query.shape[0] % num_experts or query.shape[1] != dim:
        raise ValueError(f"query: expected shape [E*B, {dim}] with E={num_experts} (from w_key), "
                         f"got {tuple(query.shape)}")
    for name, t, shape in (("w_value", w_value, (num_experts, dim, dim)), ("w_key", w_key, (num_experts, dim, dim)),
                           ("b_key", b_key, (num_experts, dim)), ("b_value", b_value, (num_experts, dim))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    check_positive("num_heads", num_heads)
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


# ----------------------------------------------------------------------------- Triton kernels
#
# Per segment the heads are the rows of [BLOCK_H, BLOCK_D] tiles (BLOCK_H >= 16 for tl.dot;
# rows past num_heads stay zero and are never stored). Everything is computed in fp32, index
# arithmetic in int64 (segment id and widths widened first: a row times the width can pass 2^31).

@triton.jit
def _segment_prologue(g, offsets_ptr, num_examples, dim, head_dim, num_heads, BLOCK_D: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    """Segment g's expert, first and end row, the widths widened to int64, and the columns and
    heads of its [BLOCK_H, BLOCK_D] tiles with their masks."""
    dim, head_dim = tl.cast(dim, tl.int64), tl.cast(head_dim, tl.int64)
    start, end = segment_bounds(offsets_ptr, g)
    cols = tl.arange(0, BLOCK_D)
    heads = tl.arange(0, BLOCK_H)
    return g // num_examples, start, end, dim, head_dim, cols, cols < dim, heads, heads < num_heads


@triton.jit
def _head_fold(vec_ptr, w_ptr, g, expert, dim, num_heads, head_dim, scale, heads, cols, col_ok,
               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_H, BLOCK_D]: row h = scale * W[expert][:, head h's columns] @ vec[g, head h's columns],
    16 columns at a time (a [BLOCK_D, 16] slice of W in registers whatever the head width)."""
    sub = tl.arange(0, 16)
    out = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for h in range(num_heads):
        folded = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, head_dim, 16):
            sub_ok = c0 + sub < head_dim
            hcols = h * head_dim + c0 + sub
            v = tl.load(vec_ptr + g * dim + hcols, mask=sub_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + expert * dim * dim + cols[:, None] * dim + hcols[None, :],
                        mask=col_ok[:, None] & sub_ok[None, :], other=0.0).to(tl.float32)
            folded += tl.sum(w * v[None, :], axis=1)
        out = tl.where(heads[:, None] == h, folded[None, :] * scale, out)
    return out


@triton.jit
def _head_unfold(rows, w_ptr, out_ptr, g, expert, dim, num_heads, head_dim, scale, heads, cols, col_ok,
                 bias_ptr, nonempty, HAS_BIAS: tl.constexpr):
    """out[g, head h's columns] = scale * rows[h] @ W[expert][:, head h's columns] (+ the bias on
    a non-empty segment), 16 columns at a time: the transpose of `_head_fold`."""
    sub = tl.arange(0, 16)
    for h in range(num_heads):
        row = tl.sum(tl.where(heads[:, None] == h, rows, 0.0), axis=0)
        for c0 in range(0, head_dim, 16):
            sub_ok = c0 + sub < head_dim
            hcols = h * head_dim + c0 + sub
            w = tl.load(w_ptr + expert * dim * dim + cols[:, None] * dim + hcols[None, :],
                        mask=col_ok[:, None] & sub_ok[None, :], other=0.0).to(tl.float32)
            o = tl.sum(row[:, None] * w, axis=0) * scale
            if HAS_BIAS:
                o += tl.where(nonempty, tl.load(bias_ptr + expert * dim + hcols, mask=sub_ok, other=0.0).to(tl.float32),
                              0.0)
            tl.store(out_ptr + g * dim + hcols, o.to(out_ptr.dtype.element_ty), mask=sub_ok)


@triton.jit
def _load_rows(tokens_ptr, index_ptr, gate_ptr, rows, row_ok, cols, col_ok, dim,
               HAS_INDEX: tl.constexpr, HAS_GATE: tl.constexpr):
    """(token rows in their dtype, gate) of rows `rows`: tokens[index[r]] and gate[r] (fp32, 1
    without a gate). The rows go to the dots as loaded, so the loop's loads can be pipelined."""
    src = rows
    if HAS_INDEX:
        src = tl.load(index_ptr + rows, mask=row_ok, other=0)
    t = tl.load(tokens_ptr + src[:, None] * dim + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    gate = tl.full(rows.shape, 1.0, dtype=tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return t, gate


@triton.jit
def _dot_rows(a, rows, PRECISION: tl.constexpr, ROWS_LEFT: tl.constexpr):
    """rows @ a (ROWS_LEFT) or a @ rows for fp32 `a` and `rows` in the tokens' dtype, in fp32.

    fp32 rows: one dot at PRECISION. 16-bit rows are exact in their dtype, so `a` is split into
    a high and a low part in that dtype (hi + lo keeps ~16 of a's 24 mantissa bits, more than
    TF32's 11): two dots with fp32 accumulation, and `rows` never passes through registers."""
    if rows.dtype == tl.float32:
        out = tl.dot(rows, a, input_precision=PRECISION) if ROWS_LEFT else tl.dot(a, rows, input_precision=PRECISION)
    else:
        hi = a.to(rows.dtype)
        lo = (a - hi.to(tl.float32)).to(rows.dtype)
        out = tl.dot(rows, lo, acc=tl.dot(rows, hi)) if ROWS_LEFT else tl.dot(lo, rows, acc=tl.dot(hi, rows))
    return out


@triton.jit
def _target_attention_fwd(tokens_ptr, index_ptr, gate_ptr, query_ptr, w_key_ptr, w_value_ptr, b_value_ptr,
                          offsets_ptr, out_ptr, pooled_ptr, lse_ptr, num_examples, dim, num_heads, head_dim, scale,
                          HAS_INDEX: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_H: tl.constexpr, NUM_STAGES: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    expert, start, end, dim, head_dim, cols, col_ok, heads, head_ok = _segment_prologue(
        g, offsets_ptr, num_examples, dim, head_dim, num_heads, BLOCK_D, BLOCK_H)
    qf = _head_fold(query_ptr, w_key_ptr, g, expert, dim, num_heads, head_dim, scale, heads, cols, col_ok,
                    BLOCK_H, BLOCK_D)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for r0 in tl.range(start, end, BLOCK_T, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        t, gate = _load_rows(tokens_ptr, index_ptr, gate_ptr, rows, row_ok, cols, col_ok, dim, HAS_INDEX, HAS_GATE)
        s = _dot_rows(tl.trans(qf), t, PRECISION, True) * gate[:, None]            # [BLOCK_T, BLOCK_H]
        s = tl.where(row_ok[:, None], s, float("-inf"))
        # The first tile holds a real row, so m is finite from then on (no inf - inf).
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[None, :])
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[:, None] + _dot_rows(tl.trans(p * gate[:, None]), t, PRECISION, False)
        m = m_new
    nonempty = end > start
    pooled = acc / tl.where(nonempty, denom, 1.0)[:, None]                         # zeros when empty
    tl.store(pooled_ptr + (g * num_heads + heads[:, None]) * dim + cols[None, :], pooled,
             mask=head_ok[:, None] & col_ok[None, :])
    tl.store(lse_ptr + g * num_heads + heads, tl.where(nonempty, m + tl.log(tl.where(nonempty, denom, 1.0)), 0.0),
             mask=head_ok)
    # out_h = A_h W_v,h + b_v,h on a non-empty segment, zeros on an empty one.
    _head_unfold(pooled, w_value_ptr, out_ptr, g, expert, dim, num_heads, head_dim, 1.0, heads, cols, col_ok,
                 b_value_ptr, nonempty, HAS_BIAS)


@triton.jit
def _target_attention_bwd(tokens_ptr, index_ptr, gate_ptr, query_ptr, w_key_ptr, w_value_ptr, offsets_ptr,
                          g_out_ptr, pooled_ptr, lse_ptr, g_rows_ptr, g_gate_ptr, g_query_ptr, g_qf_ptr,
                          num_examples, dim, num_heads, head_dim, scale,
                          HAS_INDEX: tl.constexpr, HAS_GATE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                          NUM_STAGES: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    expert, start, end, dim, head_dim, cols, col_ok, heads, head_ok = _segment_prologue(
        g, offsets_ptr, num_examples, dim, head_dim, num_heads, BLOCK_D, BLOCK_H)
    hd_mask = head_ok[:, None] & col_ok[None, :]
    qf = _head_fold(query_ptr, w_key_ptr, g, expert, dim, num_heads, head_dim, scale, heads, cols, col_ok,
                    BLOCK_H, BLOCK_D)
    # dA_h = W_v,h dout_h; softmax backward: ds_i = p_i (x_i . dA_h - A_h . dA_h).
    g_pooled = _head_fold(g_out_ptr, w_value_ptr, g, expert, dim, num_heads, head_dim, 1.0, heads, cols, col_ok,
                          BLOCK_H, BLOCK_D)
    pooled = tl.load(pooled_ptr + (g * num_heads + heads[:, None]) * dim + cols[None, :], mask=hd_mask, other=0.0)
    delta = tl.sum(pooled * g_pooled, axis=1)
    lse = tl.load(lse_ptr + g * num_heads + heads, mask=head_ok, other=0.0)
    g_qf = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for r0 in tl.range(start, end, BLOCK_T, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_T)
        row_ok = rows < end
        t, gate = _load_rows(tokens_ptr, index_ptr, gate_ptr, rows, row_ok, cols, col_ok, dim, HAS_INDEX, HAS_GATE)
        s = _dot_rows(tl.trans(qf), t, PRECISION, True) * gate[:, None]
        p = tl.exp(tl.where(row_ok[:, None] & head_ok[None, :], s - lse[None, :], float("-inf")))
        dp = _dot_rows(tl.trans(g_pooled), t, PRECISION, True) * gate[:, None]
        ds = p * (dp - delta[None, :])
        g_x = (tl.dot(p, g_pooled, input_precision=PRECISION) + tl.dot(ds, qf, input_precision=PRECISION))
        g_qf += _dot_rows(tl.trans(ds * gate[:, None]), t, PRECISION, False)
        row_mask = row_ok[:, None] & col_ok[None, :]
        tl.store(g_rows_ptr + rows[:, None] * dim + cols[None, :], (g_x * gate[:, None]).to(g_rows_ptr.dtype.element_ty),
                 mask=row_mask)
        if HAS_GATE:
            tl.store(g_gate_ptr + rows, tl.sum(g_x * t.to(tl.float32), axis=1).to(g_gate_ptr.dtype.element_ty),
                     mask=row_ok)
    tl.store(g_qf_ptr + (g * num_heads + heads[:, None]) * dim + cols[None, :], g_qf, mask=hd_mask)
    # dq_h = scale W_k,h^T dQ_h.
    _head_unfold(g_qf, w_key_ptr, g_query_ptr, g, expert, dim, num_heads, head_dim, scale, heads, cols, col_ok,
                 None, False, False)


MAX_HEADS = 16     # BLOCK_H: the heads are the rows of a tl.dot operand, which needs >= 16 of them


# Held by the sm_90 compile check (tools/compile_check.py) over every configuration
# `attention_blocks` launches: at least 8 resident warps per SM (one 8-warp or two 4-warp
# programs; the pipelined row loads keep several tiles in flight per program), and no spill
# except at the widths below, where no tile the dot accepts (16 rows) fits in registers. They
# stay correct, only slower, and are outside what the layer is built for (d <= 128 in 16 bits).
MIN_WARPS_PER_SM = {"_target_attention_fwd": 8, "_target_attention_bwd": 8}
SPILLS_ALLOWED = {
    ("_target_attention_fwd", "fp32", 256): "780 B: three TF32 products of 256-wide fp32 rows",
    ("_target_attention_bwd", "bf16", 256): "116 B: the fp32 row gradient of 256-wide rows",
    ("_target_attention_bwd", "fp32", 128): "516 B: three TF32 products of 128-wide fp32 rows",
    ("_target_attention_bwd", "fp32", 256): "5272 B: as at 128, twice as wide",
}


def attention_blocks(dim: int, dtype: torch.dtype, backward: bool):
    """(BLOCK_T, BLOCK_D, num_warps, num_stages) of `_target_attention_fwd` / `_bwd` for rows of
    width dim in dtype.

    tl.dot needs every block dimension >= 16. The forward streams 32-row tiles (segments average
    ~100 rows: 4 tiles, up to 3 of them in flight through the pipelined loads). The backward
    holds a [BLOCK_T, BLOCK_D] fp32 row gradient next to three [16, BLOCK_D] fp32 head tiles:
    16-row tiles keep it in registers up to d = 128 in 16 bits (32 rows spill at d = 64). fp32
    dots run as three TF32 products and need about twice the registers, so fp32 gets the
    narrower choice one width earlier; the widest get 8 warps (the same warps per SM as two
    4-warp programs, with half the registers a thread)."""
    block_d = max(triton.next_power_of_2(dim), 16)
    wide = block_d >= (128 if dtype == torch.float32 else 256)
    if backward:
        return 16, block_d, 8 if wide else 4, 3
    if dtype != torch.float32:
        return 32, block_d, 4, 3
    return (16 if wide else 32), block_d, 8 if block_d == 256 else 4, 3


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
