"""`linear_recurrence`: h_t = a_t * h_{t-1} + b_t along the rows of each jagged segment, h starting
from 0 at every segment (so h = b at a segment's first row): the scan of a selective state-space
model (Mamba: a_t = exp(delta_t A), b_t = delta_t B_t x_t), elementwise over any trailing shape.

Plain PyTorch, vectorised over all segments at once. a_t is set to 0 at each segment's first row,
so the flat rows form one recurrence that restarts at every segment. That recurrence runs as a
chunked scan: the rows are cut into chunks of CHUNK; within all chunks at once, CHUNK - 1 steps
give each row its state from its chunk's start (h) and the product of the a's since then (p);
the state at each chunk's last row is the same recurrence one level up (a = p, b = h at the
chunks' last rows), solved recursively; each row then adds p times the previous chunk's final
state. Work O(N) whatever the segments' lengths (a log-depth scan takes log2(longest) full passes),
CHUNK - 1 Python steps per level and log_CHUNK(N) levels, no loop over time. A custom op with its
backward written out (the adjoint is the same scan run backwards: lambda_t = g_t + a_{t+1}
lambda_{t+1}; grad b = lambda, grad a_t = lambda_t h_{t-1}), so autograd keeps no per-step tensors
and FLOP counters see the recurrence's 2 FLOPs per element (forward; 3 backward).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from mos_kernels.checks import FLOAT_DTYPES, check_finite, check_offsets, check_tensor
from mos_kernels.jagged import positions_in_segment

CHUNK = 16          # rows per chunk: 15 in-place steps per level; 16 keeps levels few and steps cheap


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor) -> torch.Tensor:
    """h [N, ...] in b's dtype from a, b [N, ...] (same shape and dtype) and segment_offsets [G+1]
    int64 over the N rows; fp16/bf16 accumulate in fp32. Raises ValueError / TypeError naming the
    argument: shapes, dtypes, devices, offsets, NaN/inf (a data check)."""
    check_tensor("b", b, dtypes=FLOAT_DTYPES)
    check_tensor("a", a, dtypes=(b.dtype,), device=b.device)
    if a.shape != b.shape or b.dim() < 1:
        raise ValueError(f"a: expected the shape of b, {tuple(b.shape)} (at least 1-D), got {tuple(a.shape)}")
    check_offsets("segment_offsets", segment_offsets, total=b.shape[0], device=b.device)
    check_finite("a", a)
    check_finite("b", b)
    return _linear_recurrence(a, b, segment_offsets)


def shift_rows(x: torch.Tensor, step: int) -> torch.Tensor:
    """Row t of the result is row t - step of x (zeros for t < step). No branch on the row count:
    under torch.compile a theme's rows are a data-dependent size, which a comparison cannot guard."""
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (step, 0))[:x.shape[0]]


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
    return positions_in_segment(segment_offsets, num_rows) == 0


@torch.library.custom_op("mos::linear_recurrence", mutates_args=())
def _linear_recurrence(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor) -> torch.Tensor:
    num_rows = b.shape[0]
    if b.numel() == 0:
        return b.clone()
    acc = torch.promote_types(b.dtype, torch.float32)
    decay = _own_padded(a, acc)
    decay[:num_rows].masked_fill_(_first_rows(segment_offsets, num_rows)[:, None], 0)   # restart each segment
    return _chunked_scan_(decay, _own_padded(b, acc))[:num_rows].view(b.shape).to(b.dtype)


@_linear_recurrence.register_fake
def _(a, b, segment_offsets):
    return b.new_empty(b.shape)


@torch.library.custom_op("mos::linear_recurrence_backward", mutates_args=())
def _linear_recurrence_backward(g_h: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                                segment_offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad a, grad b): lambda_t = g_t + a_{t+1} lambda_{t+1} within each segment (the scan run from
    the last row back), grad b_t = lambda_t, grad a_t = lambda_t * h_{t-1} (0 at a segment's first
    row)."""
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


@_linear_recurrence_backward.register_fake
def _(g_h, a, h, segment_offsets):
    return a.new_empty(a.shape), h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    a, b, segment_offsets = inputs
    ctx.save_for_backward(a, output, segment_offsets)


def _backward(ctx, g_h):
    a, h, segment_offsets = ctx.saved_tensors
    g_a, g_b = torch.ops.mos.linear_recurrence_backward(g_h.contiguous(), a, h, segment_offsets)
    return g_a, g_b, None


_linear_recurrence.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mos.linear_recurrence, get_raw=True)
def _flops(a, b, segment_offsets, *args, out_val=None, **kwargs):
    # One multiply and one add per element, as the sequential recurrence computes them.
    return 2 * b.numel()


@register_flop_formula(torch.ops.mos.linear_recurrence_backward, get_raw=True)
def _backward_flops(g_h, a, h, segment_offsets, *args, out_val=None, **kwargs):
    # The adjoint recurrence (a multiply-add per element) and grad a = lambda * h_prev.
    return 3 * h.numel()
