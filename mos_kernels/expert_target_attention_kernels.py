"""The Triton kernels of `expert_target_attention` and their launch rule (`attention_blocks`).

The key projection is folded into the query. Per head h, with q_h the head's slice of
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
recomputes p from the log-sum-exp and writes the gradients of the rows, gates, query and Q_h.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_helpers import segment_bounds


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
