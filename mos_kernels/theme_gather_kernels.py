"""The Triton kernels of `theme_gather` / `theme_scatter`: `_gather_rows`, `_scatter_rows` (a
gather-sum over `inverse_index`, its slots in a fixed order) and `_row_dot` (a gate's gradient),
each one program per block of BLOCK_R rows."""
from __future__ import annotations

import triton
import triton.language as tl


# Row indices and widths are int64: a row index times the width passes 2^31 once a tensor holds
# more than 2^31 elements (4 GB in fp16), and an int32 product would wrap to a wrong address.

@triton.jit
def _gather_rows(src_ptr, index_ptr, gate_ptr, out_ptr, num_rows, dim,
                 HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    dim = tl.cast(dim, tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < dim)[None, :]
    source = tl.load(index_ptr + rows, mask=row_ok, other=0)
    x = tl.load(src_ptr + source[:, None] * dim + cols[None, :], mask=mask, other=0.0)
    if HAS_GATE:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        x = x.to(tl.float32) * gate[:, None]
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_rows(rows_ptr, inverse_ptr, gate_ptr, out_ptr, num_tokens, dim,
                  SLOTS: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    dim = tl.cast(dim, tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    col_ok = (cols < dim)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    # Slots are summed in a fixed order: the result does not depend on scheduling.
    for j in tl.static_range(SLOTS):
        row = tl.load(inverse_ptr + tokens * SLOTS + j, mask=token_ok, other=-1)
        has_row = row >= 0
        x = tl.load(rows_ptr + row[:, None] * dim + cols[None, :], mask=has_row[:, None] & col_ok, other=0.0)
        x = x.to(tl.float32)
        if HAS_GATE:
            x = x * tl.load(gate_ptr + row, mask=has_row, other=0.0).to(tl.float32)[:, None]
        acc += x
    tl.store(out_ptr + tokens[:, None] * dim + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok)


@triton.jit
def _row_dot(a_ptr, b_ptr, b_index_ptr, out_ptr, num_rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = <a[r], b[b_index[r]]>: the gradient of a row gate."""
    dim = tl.cast(dim, tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < dim)[None, :]
    source = tl.load(b_index_ptr + rows, mask=row_ok, other=0)
    a = tl.load(a_ptr + rows[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + source[:, None] * dim + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.sum(a * b, axis=1).to(out_ptr.dtype.element_ty), mask=row_ok)


# Held by the sm_90 compile check (tools/compile_check.py) over every configuration `row_blocks`
# launches, as resident warps per SM: a copy kernel whose programs each wait on an index load
# before their row loads needs many in flight. From d = 16 on every launch keeps 32 or more (half
# the SM); rows of at most 8 elements run 1- and 2-warp programs with 20 to 28.
MIN_WARPS_PER_SM = {"_gather_rows": 16, "_scatter_rows": 16, "_row_dot": 16}
