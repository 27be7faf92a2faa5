"""`grouped_linear`: one linear map per expert over that expert's contiguous block of rows.

x [N, d_in], weight [E, d_in, d_out], bias [E, d_out] or None, expert_offsets [E+1]:
rows expert_offsets[e]:expert_offsets[e+1] are multiplied by weight[e] (y = x @ W + b).

Reference: one product per expert's block on the CPU, or on other devices the blocks padded to
[E, max_rows, d_in] and one batched GEMM (no read-back of the offsets): obviously correct; its
padding is what the kernels remove.
Triton: `grouped_linear_kernels` (one program per tile of BLOCK_M rows of one expert and
BLOCK_N output columns; the input gradient is the same kernel on the transposed weight, the
weight gradient fp32 partials over a fixed number of row splits that one sum adds up in a fixed
order: deterministic, no atomics).
Custom ops mos::grouped_linear and mos::grouped_linear_backward, with FLOP formulas.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import FLOAT_DTYPES, check_count, check_finite, check_offsets, check_tensor
from ._layout import kernel_op
from .backend import resolve_backend
from .jagged import max_segment_length, positions_in_segment, segment_blocks, segment_ids
from ._launch import cdiv, dot_precision, next_power_of_2


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
    if max_rows is not None:
        check_count("max_rows", max_rows, minimum=0)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_finite(name, t)
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
        return y if bias is None else y + bias.to(x.dtype)[segment_ids(expert_offsets, x.shape[0], check=False)]
    num_rows = x.shape[0]
    expert = segment_ids(expert_offsets, num_rows, check=False)
    pos = positions_in_segment(expert_offsets, num_rows, check=False)
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
    expert = segment_ids(expert_offsets, num_rows, check=False)
    pos = positions_in_segment(expert_offsets, num_rows, check=False)
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


BLOCK_M = 64   # rows per program of `_grouped_mm`, and per step of the weight gradient's reduction


def _block(width: int) -> int:
    """Column / reduction block: tl.dot needs >= 16; 64 keeps a tile in registers for any width."""
    return min(max(next_power_of_2(width), 16), 64)


def _splits(num_rows: int, num_experts: int) -> int:
    """Row splits per expert of the weight gradient: ~1024 rows per program, at most 32 partials."""
    return max(1, min(32, num_rows // max(num_experts * 1024, 1)))


# ----------------------------------------------------------------------------- custom ops

def _launch_grouped_mm(a, weight, bias, expert_offsets, transpose: bool):
    """[N, n] in a's dtype: row r = a[r] @ W[e] (W[e]^T if transpose) + b[e]."""
    from .grouped_linear_kernels import _grouped_mm   # triton only where a kernel launches

    num_experts, d_in, d_out = weight.shape
    num_rows = a.shape[0]
    k_dim, n_dim = (d_out, d_in) if transpose else (d_in, d_out)
    out = new_output((num_rows, n_dim), dtype=a.dtype, device=a.device)
    if num_rows and n_dim:
        tile_expert, tile_start = segment_blocks(expert_offsets, BLOCK_M, num_rows)
        block_n = _block(n_dim)
        grid = (tile_expert.numel() * cdiv(n_dim, block_n),)
        _grouped_mm[grid](a, weight, bias, out, tile_expert, tile_start, expert_offsets, num_experts, k_dim, n_dim,
                          a.stride(0), out.stride(0), TRANSPOSE_W=transpose, HAS_BIAS=bias is not None,
                          PRECISION=dot_precision(a.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=_block(k_dim))
    return out


def _launch_weight_grad(a, grad, expert_offsets, num_experts: int):
    """(dW [E, d_in, d_out], db [E, d_out]) in fp32: sums over each expert's rows of a^T grad and
    of grad."""
    from .grouped_linear_kernels import _grouped_mm_weight_grad

    d_in, d_out = a.shape[1], grad.shape[1]
    splits = _splits(grad.shape[0], num_experts)
    dw = new_output((num_experts * splits, d_in, d_out), dtype=torch.float32, device=a.device)
    db = new_output((num_experts * splits, d_out), dtype=torch.float32, device=a.device)
    if num_experts and d_in and d_out:
        block_k, block_n = _block(d_in), _block(d_out)
        grid = (num_experts * splits, cdiv(d_in, block_k), cdiv(d_out, block_n))
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
