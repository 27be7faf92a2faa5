"""`grouped_linear`: one linear map per expert over that expert's contiguous block of rows.

x [N, d_in], weight [E, d_in, d_out], bias [E, d_out] or None, expert_offsets [E+1]:
rows expert_offsets[e]:expert_offsets[e+1] are multiplied by weight[e] (y = x @ W + b).

Reference: one product per expert's block on the CPU, or on other devices the blocks padded to
[E, max_rows, d_in] and one batched GEMM (no read-back of the offsets): obviously correct; its
padding is what the kernels remove.
Triton: `_grouped_mm`, one program per (tile of BLOCK_M rows of one expert, BLOCK_N output
columns); the input gradient is the same kernel on the transposed weight;
`_grouped_mm_weight_grad` reduces each expert's rows in a fixed number of splits into fp32
partials that one sum adds up in a fixed order (deterministic, no atomics). Index arithmetic is 64-bit
(program ids and strides widened first): a row index times a stride passes 2^31 once an
operand holds more than 2^31 elements.
Custom ops mos::grouped_linear and mos::grouped_linear_backward, with FLOP formulas.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import FLOAT_DTYPES, check_offsets, check_tensor
from ._layout import kernel_op
from .backend import resolve_backend
from .jagged import max_segment_length, positions_in_segment, segment_blocks, segment_ids
from .triton_helpers import dot_precision, segment_bounds


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   expert_offsets: torch.Tensor, *, max_rows: Optional[int] = None,
                   backend: str = "auto") -> torch.Tensor:
    """[N, d_out]. max_rows: a bound on the longest block (the reference pads to it; read back
    from the device when None)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
    num_experts, d_in, d_out = weight.shape
    if x.shape[1] != d_in:
        raise ValueError(f"x: expected {d_in} columns (weight is [E, d_in, d_out] = {tuple(weight.shape)}), "
                         f"got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        if tuple(bias.shape) != (num_experts, d_out):
            raise ValueError(f"bias: expected shape {(num_experts, d_out)}, got {tuple(bias.shape)}")
    check_offsets("expert_offsets", expert_offsets, total=x.shape[0], device=x.device)
    if expert_offsets.numel() != num_experts + 1:
        raise ValueError(f"expert_offsets: expected {num_experts + 1} entries (E+1), got {expert_offsets.numel()}")
    if resolve_backend(backend, x, "grouped_linear") == "triton":
        return torch.ops.mos.grouped_linear(x, weight, bias, expert_offsets)
    return grouped_linear_reference(x, weight, bias, expert_offsets, max_rows)


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             expert_offsets: torch.Tensor, max_rows: Optional[int] = None) -> torch.Tensor:
    """The reference without checks or backend choice (other ops' references compose it)."""
    if max_rows is None:
        max_rows = max_segment_length(expert_offsets)
    return torch.ops.mos.grouped_linear_reference(x, weight, bias, expert_offsets, max_rows)


def _expert_blocks(expert_offsets):
    """(expert, first row, end row) of every non-empty block; reads the offsets back (CPU only)."""
    bounds = expert_offsets.tolist()
    return [(e, a, b) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]


def _grouped_linear_reference(x, weight, bias, expert_offsets, max_rows):
    if x.device.type == "cpu":
        # On the CPU reading the offsets back costs nothing, and one product per block skips the
        # padding and its index copies (which cost more than the products at these widths).
        y = x.new_zeros((x.shape[0], weight.shape[2]))
        for e, a, b in _expert_blocks(expert_offsets):
            torch.mm(x[a:b], weight[e].to(x.dtype), out=y[a:b])
        return y if bias is None else y + bias.to(x.dtype)[segment_ids(expert_offsets, x.shape[0])]
    num_rows = x.shape[0]
    expert = segment_ids(expert_offsets, num_rows)
    pos = positions_in_segment(expert_offsets, num_rows)
    padded = x.new_zeros((weight.shape[0], max_rows, x.shape[1]))
    padded = padded.index_put((expert, pos), x)
    y = torch.bmm(padded, weight.to(x.dtype))[expert, pos]
    return y if bias is None else y + bias.to(x.dtype)[expert]


# The reference is a custom op too, only so that FLOP counters see the algorithm's
# 2 * rows * d_in * d_out (what the kernels compute) and not the padding of its batched GEMM:
# otherwise an unbalanced routing would look K times as expensive as it is.

@torch.library.custom_op("mos::grouped_linear_reference", mutates_args=())
def _grouped_linear_reference_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 expert_offsets: torch.Tensor, max_rows: int) -> torch.Tensor:
    return _grouped_linear_reference(x, weight, bias, expert_offsets, max_rows)


@_grouped_linear_reference_op.register_fake
def _(x, weight, bias, expert_offsets, max_rows):
    return x.new_empty((x.shape[0], weight.shape[2]))


@torch.library.custom_op("mos::grouped_linear_reference_backward", mutates_args=())
def _grouped_linear_reference_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                          expert_offsets: torch.Tensor, max_rows: int
                                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of x, of weight, of bias), by the same products as the forward."""
    if x.device.type == "cpu":
        g_x = x.new_zeros(x.shape)
        g_weight = weight.new_zeros(weight.shape)
        g_bias = grad.new_zeros((weight.shape[0], grad.shape[1]))
        for e, a, b in _expert_blocks(expert_offsets):
            g_x[a:b] = grad[a:b].to(x.dtype) @ weight[e].t().to(x.dtype)
            g_weight[e] = (x[a:b].t() @ grad[a:b].to(x.dtype)).to(weight.dtype)
            g_bias[e] = grad[a:b].sum(0)
        return g_x, g_weight, g_bias
    num_rows = x.shape[0]
    expert = segment_ids(expert_offsets, num_rows)
    pos = positions_in_segment(expert_offsets, num_rows)
    g_x = _grouped_linear_reference(grad, weight.transpose(1, 2).to(grad.dtype), None, expert_offsets, max_rows)
    padded_x = x.new_zeros((weight.shape[0], max_rows, x.shape[1])).index_put((expert, pos), x)
    padded_g = grad.new_zeros((weight.shape[0], max_rows, grad.shape[1])).index_put((expert, pos), grad)
    g_weight = torch.bmm(padded_x.transpose(1, 2), padded_g.to(x.dtype))
    g_bias = padded_g.sum(dim=1)
    return g_x.to(x.dtype), g_weight.to(weight.dtype), g_bias


@_grouped_linear_reference_backward_op.register_fake
def _(grad, x, weight, expert_offsets, max_rows):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad.new_empty((weight.shape[0], grad.shape[1]))


def _reference_setup_context(ctx, inputs, output):
    x, weight, bias, expert_offsets, max_rows = inputs
    ctx.save_for_backward(x, weight, expert_offsets)
    ctx.max_rows = max_rows
    ctx.bias_dtype = None if bias is None else bias.dtype


def _reference_backward(ctx, grad):
    x, weight, expert_offsets = ctx.saved_tensors
    g_x, g_weight, g_bias = torch.ops.mos.grouped_linear_reference_backward(
        grad.contiguous(), x, weight, expert_offsets, ctx.max_rows)
    return g_x, g_weight, None if ctx.bias_dtype is None else g_bias.to(ctx.bias_dtype), None, None


_grouped_linear_reference_op.register_autograd(_reference_backward, setup_context=_reference_setup_context)


# ----------------------------------------------------------------------------- Triton kernels

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


BLOCK_M = 64
# The sm_90 compile check holds every launchable configuration to this occupancy (resident warps
# per SM): tensor-core tiles pipelined over the reduction axis keep an SM busy from two programs
# of four warps on.
MIN_WARPS_PER_SM = {"_grouped_mm": 8, "_grouped_mm_weight_grad": 8}


def _block(width: int) -> int:
    """Column / reduction block: tl.dot needs >= 16; 64 keeps a tile in registers for any width."""
    return min(max(triton.next_power_of_2(width), 16), 64)


def _splits(num_rows: int, num_experts: int) -> int:
    """Row splits per expert of the weight gradient: ~1024 rows per program, at most 32 partials."""
    return max(1, min(32, num_rows // max(num_experts * 1024, 1)))


# ----------------------------------------------------------------------------- custom ops

def _launch_grouped_mm(a, weight, bias, expert_offsets, transpose: bool):
    """[N, n] in a's dtype: row r = a[r] @ W[e] (W[e]^T if transpose) + b[e]."""
    num_experts, d_in, d_out = weight.shape
    num_rows = a.shape[0]
    k_dim, n_dim = (d_out, d_in) if transpose else (d_in, d_out)
    out = new_output((num_rows, n_dim), dtype=a.dtype, device=a.device)
    if num_rows and n_dim:
        tile_expert, tile_start = segment_blocks(expert_offsets, BLOCK_M, num_rows)
        block_n = _block(n_dim)
        grid = (tile_expert.numel() * triton.cdiv(n_dim, block_n),)
        _grouped_mm[grid](a, weight, bias, out, tile_expert, tile_start, expert_offsets, num_experts, k_dim, n_dim,
                          a.stride(0), out.stride(0), TRANSPOSE_W=transpose, HAS_BIAS=bias is not None,
                          PRECISION=dot_precision(a.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=_block(k_dim))
    return out


def _launch_weight_grad(a, grad, expert_offsets, num_experts: int):
    """(dW [E, d_in, d_out], db [E, d_out]) in fp32: sums over each expert's rows of a^T grad and
    of grad."""
    d_in, d_out = a.shape[1], grad.shape[1]
    splits = _splits(grad.shape[0], num_experts)
    dw = new_output((num_experts * splits, d_in, d_out), dtype=torch.float32, device=a.device)
    db = new_output((num_experts * splits, d_out), dtype=torch.float32, device=a.device)
    if num_experts and d_in and d_out:
        block_k, block_n = _block(d_in), _block(d_out)
        grid = (num_experts * splits, triton.cdiv(d_in, block_k), triton.cdiv(d_out, block_n))
        _grouped_mm_weight_grad[grid](a, grad, expert_offsets, dw, db, d_in, d_out, a.stride(0), grad.stride(0),
                                      splits, PRECISION=dot_precision(a.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                                      BLOCK_K=block_k)
    # Each expert's partials are added in one fixed order: the same bits on every run.
    return dw.view(num_experts, splits, d_in, d_out).sum(1), db.view(num_experts, splits, d_out).sum(1)


@kernel_op("mos::grouped_linear")
def _grouped_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       expert_offsets: torch.Tensor) -> torch.Tensor:
    return _launch_grouped_mm(x, weight, bias, expert_offsets, transpose=False)


@_grouped_linear_op.register_fake
def _(x, weight, bias, expert_offsets):
    return x.new_empty((x.shape[0], weight.shape[2]))


@kernel_op("mos::grouped_linear_backward")
def _grouped_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                expert_offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient of the rows [N, d_in] in their dtype, dW fp32, db fp32)."""
    g_x = _launch_grouped_mm(grad, weight, None, expert_offsets, transpose=True)
    g_weight, g_bias = _launch_weight_grad(x, grad, expert_offsets, weight.shape[0])
    return g_x, g_weight, g_bias


@_grouped_linear_backward_op.register_fake
def _(grad, x, weight, expert_offsets):
    num_experts, d_in, d_out = weight.shape
    return (grad.new_empty((grad.shape[0], d_in)),
            grad.new_empty((num_experts, d_in, d_out), dtype=torch.float32),
            grad.new_empty((num_experts, d_out), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, expert_offsets = inputs
    ctx.save_for_backward(x, weight, expert_offsets)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, weight, expert_offsets = ctx.saved_tensors
    g_x, g_weight, g_bias = torch.ops.mos.grouped_linear_backward(grad, x, weight, expert_offsets)
    g_bias = None if ctx.bias_dtype is None else g_bias.to(ctx.bias_dtype)
    return g_x, g_weight.to(weight.dtype), g_bias, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula([torch.ops.mos.grouped_linear, torch.ops.mos.grouped_linear_reference])
def _grouped_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs):
    return 2 * out_shape[0] * weight_shape[1] * weight_shape[2]


@register_flop_formula([torch.ops.mos.grouped_linear_backward, torch.ops.mos.grouped_linear_reference_backward])
def _grouped_linear_backward_flops(grad_shape, x_shape, weight_shape, *args, out_shape=None, **kwargs):
    # Two products of the forward's size: the rows' gradient and the weight's.
    return 4 * grad_shape[0] * weight_shape[1] * weight_shape[2]
