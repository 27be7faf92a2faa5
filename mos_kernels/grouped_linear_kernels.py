"""The Triton kernels of `grouped_linear`.

`_grouped_mm`, one program per (tile of BLOCK_M rows of one expert, BLOCK_N output columns);
the input gradient is the same kernel on the transposed weight. `_grouped_mm_weight_grad`
reduces each expert's rows in a fixed number of splits into fp32 partials that the caller adds
up in a fixed order (deterministic, no atomics). Index arithmetic is 64-bit (program ids and
strides widened first): a row index times a stride passes 2^31 once an operand holds more than
2^31 elements.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_helpers import segment_bounds


@triton.jit
def _grouped_mm(a_ptr, w_ptr, bias_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, num_experts, k_dim,
                n_dim, stride_a, stride_out, TRANSPOSE_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r] = a[r] @ W[e] (+ b[e]) for the BLOCK_M rows of one tile of expert e.
    Consecutive programs take the column blocks of one row tile, which then comes from L2."""
    pid = tl.program_id(0).to(tl.int64)    # 64-bit index arithmetic (module docstring)
    k_wide, n_wide = tl.cast(k_dim, tl.int64), tl.cast(n_dim, tl.int64)
    num_col_blocks = tl.cdiv(n_dim, BLOCK_N)
    tile = pid // num_col_blocks
    expert = tl.load(tile_expert_ptr + tile)
    if expert < num_experts:
        rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(offsets_ptr + expert + 1)
        cols = (pid % num_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_dim
        w_base = w_ptr + expert * k_wide * n_wide
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k_dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_dim
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            # A compile-time layout of W[e] (dense [d_in, d_out], read as is or transposed) lets the
            # compiler see which axis is contiguous and load it in 16-byte vectors; with run-time
            # strides every element needed its own 64-bit address (sm_90, bf16 64x64x64 tiles: 204
            # registers, now 71; fp32 spilled 64 bytes, now none).
            if TRANSPOSE_W:
                w_offsets = ks[:, None] + cols[None, :] * k_wide
            else:
                w_offsets = ks[:, None] * n_wide + cols[None, :]
            w = tl.load(w_base + w_offsets,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            # The weight is rounded to the rows' dtype first, as the reference does.
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * n_dim + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_mm_weight_grad(a_ptr, g_ptr, offsets_ptr, dw_ptr, db_ptr, k_dim, n_dim, stride_a, stride_g, splits,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Partial sums over split s of expert e's rows: dW[e, s] = sum_r a[r]^T g[r], db[e, s] = sum_r g[r]."""
    pid = tl.program_id(0).to(tl.int64)    # e * splits + s; 64-bit index arithmetic (module docstring)
    expert = pid // splits
    first, last = segment_bounds(offsets_ptr, expert)
    chunk = (last - first + splits - 1) // splits
    lo = first + (pid % splits) * chunk
    hi = tl.minimum(lo + chunk, last)
    ks = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < k_dim
    col_ok = cols < n_dim
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(a), g.to(a.dtype), input_precision=PRECISION)
        col_sum += tl.sum(g.to(tl.float32), axis=0)
    tl.store(dw_ptr + (pid * k_dim + ks[:, None]) * n_dim + cols[None, :], acc, mask=k_ok[:, None] & col_ok[None, :])
    tl.store(db_ptr + pid * n_dim + cols, col_sum, mask=col_ok & (tl.program_id(1) == 0))


# The sm_90 compile check holds every launchable configuration to this occupancy (resident warps
# per SM): tensor-core tiles pipelined over the reduction axis keep an SM busy from two programs
# of four warps on.
MIN_WARPS_PER_SM = {"_grouped_mm": 8, "_grouped_mm_weight_grad": 8}
