"""The Triton kernels of `linear_recurrence`: `_recurrence_fwd` and `_recurrence_bwd`, one program
per (segment, block of BLOCK_C channels) on one flat grid axis, walking the segment's rows in
order (backward: in reverse) with the state in fp32 registers. Rows of [N, width] row-major
tensors (width > 0: the op launches nothing without elements); every row index is int64 (loaded
from the int64 offsets), so row * width cannot wrap past 2^31 elements."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment_and_columns(pid, offsets_ptr, width, BLOCK_C: tl.constexpr):
    # One flat grid axis (2^31 - 1 programs): column blocks of a segment are neighbours, and a
    # second axis (65,535) would cap the width.
    blocks = tl.cdiv(width, BLOCK_C)
    pid = pid.to(tl.int64)
    segment = pid // blocks
    cols = (pid % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    return start, end, cols, cols < width


@triton.jit
def _recurrence_fwd(a_ptr, b_ptr, offsets_ptr, h_ptr, width, BLOCK_C: tl.constexpr):
    start, end, cols, col_ok = _segment_and_columns(tl.program_id(0), offsets_ptr, width, BLOCK_C)
    h = tl.zeros([BLOCK_C], dtype=tl.float32)
    for row in range(start, end):
        at = row * width + cols
        a = tl.load(a_ptr + at, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + at, mask=col_ok, other=0.0).to(tl.float32)
        # h = b at a segment's first row whatever a holds there (as the reference: a * 0 is NaN for a = inf).
        h = tl.where(row > start, a * h, 0.0) + b
        tl.store(h_ptr + at, h.to(h_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _recurrence_bwd(g_ptr, a_ptr, h_ptr, offsets_ptr, g_a_ptr, g_b_ptr, width, BLOCK_C: tl.constexpr):
    # lambda_t = g_t + a_{t+1} lambda_{t+1} from the last row back; grad b_t = lambda_t,
    # grad a_t = lambda_t h_{t-1} (h as the forward stored it; 0 before the first row).
    start, end, cols, col_ok = _segment_and_columns(tl.program_id(0), offsets_ptr, width, BLOCK_C)
    lam = tl.zeros([BLOCK_C], dtype=tl.float32)
    a_next = tl.zeros([BLOCK_C], dtype=tl.float32)       # a past the segment's last row: none
    for step in range(0, end - start):
        row = end - 1 - step
        at = row * width + cols
        g = tl.load(g_ptr + at, mask=col_ok, other=0.0).to(tl.float32)
        lam = g + a_next * lam
        tl.store(g_b_ptr + at, lam.to(g_b_ptr.dtype.element_ty), mask=col_ok)
        h_prev = tl.load(h_ptr + at - width, mask=col_ok & (row > start), other=0.0).to(tl.float32)
        tl.store(g_a_ptr + at, (lam * h_prev).to(g_a_ptr.dtype.element_ty), mask=col_ok)
        a_next = tl.load(a_ptr + at, mask=col_ok, other=0.0).to(tl.float32)


# One warp a program and few registers: the 32-program limit binds, 32 warps per SM.
MIN_WARPS_PER_SM = {"_recurrence_fwd": 32, "_recurrence_bwd": 32}
