"""`jagged_self_attention`: multi-head attention inside each segment of a jagged layout.

q, k, v [N, d] share segment_offsets [G+1]; row i of segment g attends to the rows j of g with
j <= i (causal) or to all of them, per head, softmax(q k^T / sqrt(dh)) v. No padding.

Reference: attention over the segments padded to the length of their bucket
(`_padded_attention`: lengths rounded up to three significant bits, and torch's fused CPU flash
attention per bucket, on the CPU; masked dense attention over one bucket padded to max_len
elsewhere), a custom op whose FLOP formula counts the jagged pairs.
Triton: flash attention over jagged segments, one program per (tile of rows, head)
(`jagged_self_attention_kernels`); every sum in a fixed order, deterministic. q, k, v may be column
slices of one [N, 3d] projection (row strides). Custom ops mos::jagged_self_attention and
mos::jagged_self_attention_backward; their FLOP formulas count the jagged work, sum over
segments of L_g^2 (causal: L_g (L_g + 1) / 2) pairs.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import FLOAT_DTYPES, check_count, check_finite, check_flag, check_offsets, check_tensor
from ._layout import kernel_op
from .backend import resolve_backend
from ._padded_attention import padded_attention_backward, padded_attention_forward
from .jagged import max_segment_length, segment_blocks
from ._launch import dot_precision


def jagged_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_offsets: torch.Tensor, *,
                          num_heads: int, max_len: Optional[int] = None, causal: bool = True,
                          backend: str = "auto") -> torch.Tensor:
    """q, k, v [N, d] in one jagged layout -> [N, d]; row i attends to rows j <= i of its segment.
    max_len: a bound on the longest segment, the reference's padding off the CPU (read back when
    None; the CPU reference pads each segment to its length bucket instead) and the Triton path's
    tile size (small tiles for short segments; None: tiles for long ones, no read-back). Raises
    ValueError when a segment is longer than max_len."""
    check_tensor("q", q, ndim=2, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} like q, got {tuple(t.shape)}")
    check_count("num_heads", num_heads)
    check_flag("causal", causal)
    if max_len is not None:
        check_count("max_len", max_len, minimum=0)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)      # a NaN would reach other rows on one backend and not on another
    if q.shape[1] % num_heads:
        raise ValueError(f"num_heads: expected a divisor of d={q.shape[1]}, got {num_heads}")
    check_offsets("segment_offsets", segment_offsets, total=q.shape[0], device=q.device)
    if resolve_backend(backend, q, "jagged_self_attention") == "triton":
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k, v: expected the dtype of q ({q.dtype}) for backend 'triton', got {k.dtype}, {v.dtype}")
        return torch.ops.mos.jagged_self_attention(q, k, v, segment_offsets, num_heads, causal, max_len)[0]
    if max_len is None and segment_offsets.device.type != "cpu":
        max_len = max_segment_length(segment_offsets)
    return _jagged_self_attention_reference(q, k, v, segment_offsets, num_heads, max_len, causal)[0]


# The reference is a custom op too, only so that FLOP counters see the algorithm's jagged pairs
# (what the kernels compute) and not the padding of its dense products: otherwise the theme
# experts' short segments would look as expensive as whole sequences.

@torch.library.custom_op("mos::jagged_self_attention_reference", mutates_args=())
def _jagged_self_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     segment_offsets: torch.Tensor, num_heads: int, max_len: Optional[int],
                                     causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [N, d], log-sum-exp [N, H] in fp32 at least), like the kernel's op."""
    return padded_attention_forward(q, k, v, segment_offsets, num_heads, max_len, causal)


@_jagged_self_attention_reference.register_fake
def _(q, k, v, segment_offsets, num_heads, max_len, causal):
    return v.new_empty(q.shape), q.new_empty((q.shape[0], num_heads), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op("mos::jagged_self_attention_reference_backward", mutates_args=())
def _jagged_self_attention_reference_backward(g_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                              segment_offsets: torch.Tensor, num_heads: int,
                                              max_len: Optional[int], causal: bool
                                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return padded_attention_backward(g_out, q, k, v, out, lse, segment_offsets, num_heads, max_len, causal)


@_jagged_self_attention_reference_backward.register_fake
def _(g_out, q, k, v, out, lse, segment_offsets, num_heads, max_len, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _reference_setup_context(ctx, inputs, output):
    q, k, v, segment_offsets, num_heads, max_len, causal = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)      # saved for the backward only: no gradient flows through it
    ctx.save_for_backward(q, k, v, out, lse, segment_offsets)
    ctx.num_heads, ctx.max_len, ctx.causal = num_heads, max_len, causal


def _reference_backward(ctx, g_out, _g_lse):
    q, k, v, out, lse, segment_offsets = ctx.saved_tensors
    g_q, g_k, g_v = torch.ops.mos.jagged_self_attention_reference_backward(
        g_out.contiguous(), q, k, v, out, lse, segment_offsets, ctx.num_heads, ctx.max_len, ctx.causal)
    return g_q, g_k, g_v, None, None, None, None


_jagged_self_attention_reference.register_autograd(_reference_backward, setup_context=_reference_setup_context)


# ----------------------------------------------------------------------------- custom ops

@kernel_op("mos::jagged_self_attention", row_strided=("q", "k", "v"))
def _jagged_self_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_offsets: torch.Tensor,
                              num_heads: int, causal: bool, max_len: Optional[int] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [N, d], log-sum-exp [N, H] fp32). max_len: a bound on the longest segment, or None;
    it sets the tiles only (any value gives the same result). Bucketed here, inside the op, so
    a compiled graph passes it through without a guard on its value."""
    num_rows, dim = q.shape
    head_dim = dim // num_heads
    out = new_output((num_rows, dim), dtype=q.dtype, device=q.device)
    lse = new_output((num_rows, num_heads), dtype=torch.float32, device=q.device)
    if num_rows:
        # triton only where a kernel launches
        from .jagged_self_attention_kernels import _self_attention_fwd, attention_tiles, longest_bucket

        tiles = attention_tiles(longest_bucket(max_len), head_dim, q.dtype)
        block_m, block_n, block_dh, num_warps, num_stages = tiles
        tile_segment, tile_start = segment_blocks(segment_offsets, block_m, num_rows)
        _self_attention_fwd[(tile_segment.numel(), num_heads)](
            q, k, v, out, lse, tile_segment, tile_start, segment_offsets, segment_offsets.numel() - 1, num_heads,
            head_dim, q.stride(0), k.stride(0), v.stride(0), out.stride(0), 1.0 / math.sqrt(head_dim),
            CAUSAL=causal, PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DH=block_dh,
            num_warps=num_warps, num_stages=num_stages)
    return out, lse


@_jagged_self_attention_op.register_fake
def _(q, k, v, segment_offsets, num_heads, causal, max_len=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], num_heads), dtype=torch.float32)


@kernel_op("mos::jagged_self_attention_backward", row_strided=("q", "k", "v"))
def _jagged_self_attention_backward_op(g_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       out: torch.Tensor, lse: torch.Tensor, segment_offsets: torch.Tensor,
                                       num_heads: int, causal: bool, max_len: Optional[int] = None
                                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, dim = q.shape
    head_dim = dim // num_heads
    g_q = new_output((num_rows, dim), dtype=q.dtype, device=q.device)
    g_k = new_output((num_rows, dim), dtype=k.dtype, device=q.device)
    g_v = new_output((num_rows, dim), dtype=v.dtype, device=q.device)
    if num_rows:
        from .jagged_self_attention_kernels import (_self_attention_bwd_kv, _self_attention_bwd_q, attention_tiles,
                                                    longest_bucket)

        # delta_i = dout_i . out_i per head: the softmax backward's row term.
        delta = (g_out.float() * out.float()).view(num_rows, num_heads, head_dim).sum(-1)
        tiles = attention_tiles(longest_bucket(max_len), head_dim, q.dtype)
        block_m, block_n, block_dh, num_warps, num_stages = tiles
        tile_segment, tile_start = segment_blocks(segment_offsets, block_m, num_rows)
        common = dict(CAUSAL=causal, PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_DH=block_dh, num_warps=num_warps, num_stages=num_stages)
        args = (tile_segment, tile_start, segment_offsets, segment_offsets.numel() - 1, num_heads, head_dim,
                q.stride(0), k.stride(0), v.stride(0), 1.0 / math.sqrt(head_dim))
        grid = (tile_segment.numel(), num_heads)
        _self_attention_bwd_kv[grid](q, k, v, g_out, lse, delta, g_k, g_v, *args, **common)
        _self_attention_bwd_q[grid](q, k, v, g_out, lse, delta, g_q, *args, **common)
    return g_q, g_k, g_v


@_jagged_self_attention_backward_op.register_fake
def _(g_out, q, k, v, out, lse, segment_offsets, num_heads, causal, max_len=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, segment_offsets, num_heads, causal, max_len = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)      # saved for the backward only: no gradient flows through it
    ctx.save_for_backward(q, k, v, out, lse, segment_offsets)
    ctx.num_heads, ctx.causal, ctx.max_len = num_heads, causal, max_len


def _backward(ctx, g_out, _g_lse):
    q, k, v, out, lse, segment_offsets = ctx.saved_tensors
    g_q, g_k, g_v = torch.ops.mos.jagged_self_attention_backward(g_out, q, k, v, out, lse, segment_offsets,
                                                                 ctx.num_heads, ctx.causal, ctx.max_len)
    return g_q, g_k, g_v, None, None, None, None


_jagged_self_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention_pairs(segment_offsets: torch.Tensor, causal: bool) -> int:
    """(query, key) pairs the jagged attention computes: sum of L_g^2, or L_g (L_g + 1) / 2 causal.
    Reads the offsets back (FLOP counting only, never on the hot path)."""
    lengths = (segment_offsets[1:] - segment_offsets[:-1]).to(torch.int64)
    pairs = lengths * (lengths + 1) // 2 if causal else lengths * lengths
    return int(pairs.sum())


@register_flop_formula(torch.ops.mos.jagged_self_attention, get_raw=True)
def _jagged_self_attention_flops(q, k, v, segment_offsets, num_heads, causal, *args, out_val=None, **kwargs):
    # q.k and p.v: 2 * dh each per pair and head, 4 * d per pair over all heads.
    return 4 * q.shape[1] * attention_pairs(segment_offsets, causal)


@register_flop_formula(torch.ops.mos.jagged_self_attention_backward, get_raw=True)
def _jagged_self_attention_backward_flops(g_out, q, k, v, out, lse, segment_offsets, num_heads, causal, *args,
                                          out_val=None, **kwargs):
    # Recomputed q.k, dV, dP, dK, dQ: five products of 2 * dh per pair and head.
    return 10 * q.shape[1] * attention_pairs(segment_offsets, causal)


@register_flop_formula(torch.ops.mos.jagged_self_attention_reference, get_raw=True)
def _reference_flops(q, k, v, segment_offsets, num_heads, max_len, causal, *args, out_val=None, **kwargs):
    return _jagged_self_attention_flops(q, k, v, segment_offsets, num_heads, causal)


@register_flop_formula(torch.ops.mos.jagged_self_attention_reference_backward, get_raw=True)
def _reference_backward_flops(g_out, q, k, v, out, lse, segment_offsets, num_heads, max_len, causal, *args,
                              out_val=None, **kwargs):
    return _jagged_self_attention_backward_flops(g_out, q, k, v, None, None, segment_offsets, num_heads, causal)
