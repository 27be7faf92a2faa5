"""`linear_recurrence`: h_t = a_t * h_{t-1} + b_t along the rows of each jagged segment, h starting
from 0 at every segment (so h = b at a segment's first row): the scan of a selective state-space
model (Mamba: a_t = exp(delta_t A), b_t = delta_t B_t x_t), elementwise over any trailing shape.

Plain PyTorch, vectorised over all segments at once by a log-depth (Hillis-Steele) scan over the
flat rows: after the step of stride s every row holds the composition of the 2s rows ending at
it, and a_t is set to 0 at each segment's first row, so no composition reaches across a segment
boundary (the product of a's over it is 0). ceil(log2(longest segment)) steps of one multiply-add
each, no loop over time. A custom op with its backward written out (the adjoint is the same scan
run backwards: lambda_t = g_t + a_{t+1} lambda_{t+1}; grad b = lambda, grad a_t = lambda_t h_{t-1}),
so autograd keeps no per-step tensors and FLOP counters see the recurrence's 2 FLOPs per element
(forward; 3 backward), not the scan's extra log factor.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from mos_kernels.checks import FLOAT_DTYPES, check_count, check_finite, check_offsets, check_tensor, reads_data
from mos_kernels.jagged import max_segment_length, positions_in_segment


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor, *,
                      max_len: Optional[int] = None) -> torch.Tensor:
    """h [N, ...] in b's dtype from a, b [N, ...] (same shape and dtype) and segment_offsets [G+1]
    int64 over the N rows. max_len: a bound on the longest segment (read back when None). Raises
    ValueError / TypeError naming the argument: shapes, dtypes, devices, offsets, NaN/inf (a data
    check), a max_len below the longest segment."""
    check_tensor("b", b, dtypes=FLOAT_DTYPES)
    check_tensor("a", a, dtypes=(b.dtype,), device=b.device)
    if a.shape != b.shape or b.dim() < 1:
        raise ValueError(f"a: expected the shape of b, {tuple(b.shape)} (at least 1-D), got {tuple(a.shape)}")
    check_offsets("segment_offsets", segment_offsets, total=b.shape[0], device=b.device)
    check_finite("a", a)
    check_finite("b", b)
    if max_len is None:
        max_len = max_segment_length(segment_offsets)
    else:
        check_count("max_len", max_len, minimum=0)
        # A data check like the others: too few doubling steps would silently cut every longer segment.
        if reads_data() and max_len < max_segment_length(segment_offsets):
            raise ValueError(f"max_len: expected at least the longest segment "
                             f"({max_segment_length(segment_offsets)}), got {max_len}")
    return _linear_recurrence(a, b, segment_offsets, max_len)


def shift_rows(x: torch.Tensor, step: int) -> torch.Tensor:
    """Row t of the result is row t - step of x (zeros for t < step)."""
    if step >= x.shape[0]:
        return torch.zeros_like(x)
    return torch.cat([x.new_zeros((step, *x.shape[1:])), x[:-step]])


def _scan(a: torch.Tensor, h: torch.Tensor, first: torch.Tensor, max_len: int) -> torch.Tensor:
    """The forward recurrence along the rows; first [N] bool marks each segment's first row."""
    a = a.masked_fill(first.view(-1, *[1] * (a.dim() - 1)), 0)
    step = 1
    while step < max_len:
        h = h + a * shift_rows(h, step)
        a = a * shift_rows(a, step)
        step *= 2
    return h


def _first_rows(segment_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    return positions_in_segment(segment_offsets, num_rows) == 0


@torch.library.custom_op("mos::linear_recurrence", mutates_args=())
def _linear_recurrence(a: torch.Tensor, b: torch.Tensor, segment_offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    if b.shape[0] == 0 or max_len <= 1:     # every segment at most one row: h = b (a copy: no alias)
        return b.clone()
    acc = torch.promote_types(b.dtype, torch.float32)
    return _scan(a.to(acc), b.to(acc), _first_rows(segment_offsets, b.shape[0]), max_len).to(b.dtype)


@_linear_recurrence.register_fake
def _(a, b, segment_offsets, max_len):
    return b.new_empty(b.shape)


@torch.library.custom_op("mos::linear_recurrence_backward", mutates_args=())
def _linear_recurrence_backward(g_h: torch.Tensor, a: torch.Tensor, h: torch.Tensor, segment_offsets: torch.Tensor,
                                max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad a, grad b): lambda_t = g_t + a_{t+1} lambda_{t+1} within each segment (the scan on the
    reversed rows), grad b_t = lambda_t, grad a_t = lambda_t * h_{t-1} (0 at a segment's first row)."""
    num_rows = h.shape[0]
    if num_rows == 0:
        return a.new_zeros(a.shape), h.new_zeros(h.shape)
    acc = torch.promote_types(h.dtype, torch.float32)
    first = _first_rows(segment_offsets, num_rows)
    last = torch.cat([first[1:], first.new_ones(1)])           # the row before a first row is a last row
    a_next = torch.cat([a[1:], a.new_zeros((1, *a.shape[1:]))]).to(acc)
    lam = _scan(a_next.flip(0), g_h.to(acc).flip(0), last.flip(0), max_len).flip(0)
    h_prev = shift_rows(h.to(acc), 1).masked_fill(first.view(-1, *[1] * (h.dim() - 1)), 0)
    return (lam * h_prev).to(a.dtype), lam.to(h.dtype)


@_linear_recurrence_backward.register_fake
def _(g_h, a, h, segment_offsets, max_len):
    return a.new_empty(a.shape), h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    a, b, segment_offsets, max_len = inputs
    ctx.save_for_backward(a, output, segment_offsets)
    ctx.max_len = max_len


def _backward(ctx, g_h):
    a, h, segment_offsets = ctx.saved_tensors
    g_a, g_b = torch.ops.mos.linear_recurrence_backward(g_h.contiguous(), a, h, segment_offsets, ctx.max_len)
    return g_a, g_b, None, None


_linear_recurrence.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mos.linear_recurrence, get_raw=True)
def _flops(a, b, segment_offsets, max_len, *args, out_val=None, **kwargs):
    # One multiply and one add per element, as the sequential recurrence computes them.
    return 2 * b.numel()


@register_flop_formula(torch.ops.mos.linear_recurrence_backward, get_raw=True)
def _backward_flops(g_h, a, h, segment_offsets, max_len, *args, out_val=None, **kwargs):
    # The adjoint recurrence (a multiply-add per element) and grad a = lambda * h_prev.
    return 3 * h.numel()
