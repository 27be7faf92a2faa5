"""`linear_recurrence`: h_t = a_t * h_{t-1} + b_t along the rows of each jagged segment, h starting
from 0 at every segment (so h = b at a segment's first row): the scan of a selective state-space
model (Mamba: a_t = exp(delta_t A), b_t = delta_t B_t x_t), elementwise over any trailing shape.

Reference: plain PyTorch, vectorised over all segments at once. a_t is set to 0 at each
segment's first row, so the flat rows form one recurrence that restarts at every segment. That
recurrence runs as a chunked scan: the rows are cut into chunks of CHUNK; within all chunks at
once, CHUNK - 1 steps give each row its state from its chunk's start (h) and the product of the
a's since then (p); the state at each chunk's last row is the same recurrence one level up
(a = p, b = h at the chunks' last rows), solved recursively; each row then adds p times the
previous chunk's final state. Work O(N) whatever the segments' lengths, CHUNK - 1 Python steps
per level and log_CHUNK(N) levels, no loop over time.
Triton (`linear_recurrence_kernels`): one program per (segment, block of channels) walks its
segment's rows in order with h in fp32 registers, so each element is read and written once; the
backward walks them back. No atomics: deterministic.

Both backwards are the same adjoint, the scan run from the last row back: lambda_t = g_t +
a_{t+1} lambda_{t+1}; grad b = lambda, grad a_t = lambda_t h_{t-1}. Custom ops with their
backward written out, so autograd keeps no per-step tensors and FLOP counters see the
recurrence's 2 FLOPs per element (forward; 3 backward).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from ._launch import cdiv, next_power_of_2
from ._layout import kernel_op
from .backend import resolve_backend
from .checks import FLOAT_DTYPES, check_finite, check_offsets, check_tensor
from .jagged import positions_in_segment

CHUNK = 16          # rows per chunk of the reference: 15 in-place steps per level, few levels
_MAX_BLOCK_C = 128  # channels per Triton program: 4 fp32 a thread of one warp, many programs per segment


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor, *,
                      backend: str = "auto") -> torch.Tensor:
    """h [N, ...] in b's dtype from a, b [N, ...] (same shape and dtype) and segment_offsets [G+1]
    int64 over the N rows; fp16/bf16 accumulate in fp32 (float64 in float64, on the reference).
    Raises ValueError / TypeError naming the argument: shapes, dtypes, devices, offsets, NaN/inf
    (a data check)."""
    check_tensor("b", b, dtypes=FLOAT_DTYPES)
    check_tensor("a", a, dtypes=(b.dtype,), device=b.device)
    if a.shape != b.shape or b.dim() < 1:
        raise ValueError(f"a: expected the shape of b, {tuple(b.shape)} (at least 1-D), got {tuple(a.shape)}")
    check_offsets("segment_offsets", segment_offsets, total=b.shape[0], device=b.device)
    check_finite("a", a)
    check_finite("b", b)
    chosen = resolve_backend(backend, b, "linear_recurrence")
    flat = (b.shape[0], math.prod(b.shape[1:]))
    if chosen == "triton":
        return torch.ops.mos.linear_recurrence(a.reshape(flat), b.reshape(flat), segment_offsets).view(b.shape)
    return torch.ops.mos.linear_recurrence_reference(a, b, segment_offsets)


# ----------------------------------------------------------------------------- reference

def _own_padded(x: torch.Tensor, dtype: torch.dtype, num_rows: Optional[int] = None) -> torch.Tensor:
    """A new [R, C] buffer in dtype: x's rows flattened to C columns, then zero rows up to R, the
    first multiple of CHUNK at or above num_rows (default: x's rows)."""
    rows = x.shape[0] if num_rows is None else num_rows
    out = torch.empty((-(-rows // CHUNK) * CHUNK, math.prod(x.shape[1:])), dtype=dtype, device=x.device)
    out[:x.shape[0]].copy_(x.reshape(x.shape[0], out.shape[1]))      # (not -1: x may have no rows)
    out[x.shape[0]:].zero_()
    return out


def _chunked_scan_(a: torch.Tensor, h: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """In place over a, h [R, C] (R a multiple of CHUNK; their own buffers): h_t = a_t h_{t-1} + h_t
    from the first row on (h_{-1} = 0), or with reverse h_t = a_t h_{t+1} + h_t from the last row
    back. Returns h; a is left holding products of a within each chunk. Zero rows at the end
    (a = h = 0) change no other row's result, in either direction."""
    num_chunks = h.shape[0] // CHUNK
    a, h = a.view(num_chunks, CHUNK, -1), h.view(num_chunks, CHUNK, -1)
    prev, steps = (1, range(CHUNK - 2, -1, -1)) if reverse else (-1, range(1, CHUNK))
    for j in steps:
        h[:, j].addcmul_(a[:, j], h[:, j + prev])
        if num_chunks > 1:
            a[:, j].mul_(a[:, j + prev])      # the product of the a's from the chunk's entry row to j
    if num_chunks > 1:
        # The state at each chunk's exit row: the same recurrence over chunks, one level up.
        exit_row = 0 if reverse else -1
        carry = _chunked_scan_(_own_padded(a[:, exit_row], a.dtype), _own_padded(h[:, exit_row], h.dtype),
                               reverse)[:num_chunks]
        if reverse:
            h[:-1].addcmul_(a[:-1], carry[1:, None])
        else:
            h[1:].addcmul_(a[1:], carry[:-1, None])
    return h.view(-1, h.shape[-1])


def _first_rows(segment_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    return positions_in_segment(segment_offsets, num_rows, check=False) == 0


@torch.library.custom_op("mos::linear_recurrence_reference", mutates_args=())
def _linear_recurrence_reference(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor) -> torch.Tensor:
    num_rows = b.shape[0]
    if b.numel() == 0:
        return b.clone()
    acc = torch.promote_types(b.dtype, torch.float32)
    decay = _own_padded(a, acc)
    decay[:num_rows].masked_fill_(_first_rows(segment_offsets, num_rows)[:, None], 0)   # restart each segment
    return _chunked_scan_(decay, _own_padded(b, acc))[:num_rows].view(b.shape).to(b.dtype)


@_linear_recurrence_reference.register_fake
def _(a, b, segment_offsets):
    return b.new_empty(b.shape)


@torch.library.custom_op("mos::linear_recurrence_reference_backward", mutates_args=())
def _linear_recurrence_reference_backward(g_h: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                                          segment_offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad a, grad b) by the adjoint scan of the module docstring; grad a_t is 0 at a segment's
    first row (h_{t-1} = 0 there)."""
    num_rows = h.shape[0]
    if h.numel() == 0:
        return a.new_zeros(a.shape), h.new_zeros(h.shape)
    acc = torch.promote_types(h.dtype, torch.float32)
    first = _first_rows(segment_offsets, num_rows)
    last = torch.cat([first[1:], first.new_ones(1)])           # the row before a first row is a last row
    a_next = _own_padded(a[1:], acc, num_rows)                 # a_{t+1}, 0 past each segment's last row
    a_next[:num_rows].masked_fill_(last[:, None], 0)
    lam = _chunked_scan_(a_next, _own_padded(g_h, acc), reverse=True)[:num_rows]
    g_a = torch.empty_like(lam)
    torch.mul(lam[1:], h.reshape(num_rows, -1)[:-1].to(acc), out=g_a[1:])
    g_a[0].zero_()
    g_a.masked_fill_(first[:, None], 0)                        # h_{t-1} = 0 at a segment's first row
    return g_a.view(a.shape).to(a.dtype), lam.view(h.shape).to(h.dtype)


@_linear_recurrence_reference_backward.register_fake
def _(g_h, a, h, segment_offsets):
    return a.new_empty(a.shape), h.new_empty(h.shape)


# ----------------------------------------------------------------------------- Triton

def recurrence_blocks(width: int) -> Tuple[int, int]:
    """(BLOCK_C, num_warps) of the Triton kernels for rows of `width` channels."""
    block_c = min(max(next_power_of_2(width), 1), _MAX_BLOCK_C)
    return block_c, 1


@kernel_op("mos::linear_recurrence")
def _linear_recurrence_op(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor) -> torch.Tensor:
    h = new_output(b.shape, dtype=b.dtype, device=b.device)
    num_segments, width = segment_offsets.numel() - 1, b.shape[1]
    if h.numel() and num_segments:
        from .linear_recurrence_kernels import _recurrence_fwd   # triton only where a kernel launches

        block_c, num_warps = recurrence_blocks(width)
        _recurrence_fwd[(num_segments * cdiv(width, block_c),)](a, b, segment_offsets, h, width, BLOCK_C=block_c,
                                                                 num_warps=num_warps)
    return h


@_linear_recurrence_op.register_fake
def _(a, b, segment_offsets):
    return b.new_empty(b.shape)


@kernel_op("mos::linear_recurrence_backward")
def _linear_recurrence_backward_op(g_h: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                                   segment_offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    g_a = new_output(a.shape, dtype=a.dtype, device=a.device)
    g_b = new_output(h.shape, dtype=h.dtype, device=h.device)
    num_segments, width = segment_offsets.numel() - 1, h.shape[1]
    if h.numel() and num_segments:
        from .linear_recurrence_kernels import _recurrence_bwd

        block_c, num_warps = recurrence_blocks(width)
        _recurrence_bwd[(num_segments * cdiv(width, block_c),)](g_h, a, h, segment_offsets, g_a, g_b, width,
                                                                 BLOCK_C=block_c, num_warps=num_warps)
    return g_a, g_b


@_linear_recurrence_backward_op.register_fake
def _(g_h, a, h, segment_offsets):
    return a.new_empty(a.shape), h.new_empty(h.shape)


# ----------------------------------------------------------------------------- autograd, FLOPs

def _setup_context(ctx, inputs, output):
    a, b, segment_offsets = inputs
    ctx.save_for_backward(a, output, segment_offsets)


def _backward_through(backward_op):
    def backward(ctx, g_h):
        a, h, segment_offsets = ctx.saved_tensors
        g_a, g_b = backward_op(g_h.contiguous(), a, h, segment_offsets)
        return g_a, g_b, None
    return backward


_linear_recurrence_reference.register_autograd(
    _backward_through(torch.ops.mos.linear_recurrence_reference_backward), setup_context=_setup_context)
_linear_recurrence_op.register_autograd(_backward_through(torch.ops.mos.linear_recurrence_backward),
                                        setup_context=_setup_context)


@register_flop_formula([torch.ops.mos.linear_recurrence_reference, torch.ops.mos.linear_recurrence], get_raw=True)
def _flops(a, b, segment_offsets, *args, out_val=None, **kwargs):
    # One multiply and one add per element, as the sequential recurrence computes them.
    return 2 * b.numel()


@register_flop_formula([torch.ops.mos.linear_recurrence_reference_backward, torch.ops.mos.linear_recurrence_backward],
                       get_raw=True)
def _backward_flops(g_h, a, h, segment_offsets, *args, out_val=None, **kwargs):
    # The adjoint recurrence (a multiply-add per element) and grad a = lambda * h_prev.
    return 3 * h.numel()
