"""`theme_gather` / `theme_scatter`: move token rows into the theme-major layout and back.

gather:  rows[r] = values[gather_index[r]] * row_gate[r]
scatter: out[t]  = sum over r with gather_index[r] == t of rows[r] * row_gate[r]
Each is the other's backward for the row data; a gate's gradient is a row-wise dot product.

`inverse_index [T, m]` lists the rows that read each token (-1 for none; `Dispatch` carries
it). With it the Triton scatter (`theme_gather_kernels`) is a gather-sum in a fixed order:
deterministic, no floating-point atomics. Reference: index_select / index_add. CUDA C++: the
same three operators in torch.ops.mos_cuda (csrc/mos/theme_gather.h), sharing this module's
fakes and autograd formulas (`gather_backward_for`, `scatter_backward_for`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import check_count, check_gather_index, check_values
from ._layout import kernel_op
from .backend import kernel_ops, resolve_backend
from ._launch import cdiv, next_power_of_2

_BYTES_PER_PROGRAM = 16384   # rows a program moves: enough to hide the index -> row load chain
_MAX_BLOCK_R = 256
_ELEMENTS_PER_THREAD = 32    # a [BLOCK_R, BLOCK_D] fp32 tile is 32 registers a thread: no spills


def row_blocks(dim: int, dtype: torch.dtype):
    """(BLOCK_R, BLOCK_D, num_warps) of the row kernels for rows of `dim` elements of `dtype`.

    A program moves ~16 KB of rows (d = 64 bf16: 128 rows; d = 256 fp32: 16): short programs
    spend their time waiting on the dependent index -> row loads. The warps grow with the tile
    so each thread holds 32 elements of it (32 fp32 registers for the scatter's sum)."""
    block_d = next_power_of_2(dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_r = max(min(_BYTES_PER_PROGRAM // (block_d * itemsize), _MAX_BLOCK_R), 1)
    num_warps = min(max(block_r * block_d // (32 * _ELEMENTS_PER_THREAD), 1), 8)
    return block_r, block_d, num_warps


def inverse_of_unique(gather_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inverse_index [T, 1] of a gather that reads every token at most once (no sync)."""
    inverse = torch.full((num_tokens, 1), -1, dtype=torch.int64, device=gather_index.device)
    inverse[gather_index, 0] = torch.arange(gather_index.numel(), device=gather_index.device)
    return inverse


def inverse_of(gather_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inverse_index [T, m] of any gather, m = the most rows reading one token.

    Reads m back from the device (a sync); `Dispatch.inverse_index` avoids it on the hot path.
    """
    device = gather_index.device
    counts = torch.bincount(gather_index, minlength=num_tokens)
    slots = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.sort(gather_index, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=device) - starts[gather_index[order]]
    inverse = torch.full((num_tokens, slots), -1, dtype=torch.int64, device=device)
    inverse[gather_index[order], slot] = order
    return inverse


def theme_gather(values: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor] = None, *,
                 inverse_index: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """values [T, d] -> rows [T', d] in the order of gather_index, scaled by row_gate.

    inverse_index: see the module docstring; built here (one sync) when the Triton path needs it.
    Raises ValueError / TypeError naming the argument: shapes, dtypes, devices; the data checks
    (one sync each): gather_index in range, NaN/inf values or row_gate, an inverse_index that is
    not gather_index's inverse (the kernels read rows through it alone).
    """
    check_values("values", values)
    check_gather_index(gather_index, row_gate, inverse_index, values.device, values.shape[0], gather_index.numel())
    chosen = resolve_backend(backend, values, "theme_gather")
    if chosen != "reference":
        if inverse_index is None:
            inverse_index = inverse_of(gather_index, values.shape[0])
        return kernel_ops(chosen).theme_gather(values, gather_index, row_gate, inverse_index)
    return theme_gather_reference(values, gather_index, row_gate)


def theme_scatter(rows: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor] = None, *,
                  num_tokens: int, inverse_index: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> torch.Tensor:
    """rows [T', d] -> [num_tokens, d]: every row, scaled by its gate, added to its source token.
    Raises as `theme_gather` (rows in place of values, and num_tokens)."""
    check_values("rows", rows)
    check_count("num_tokens", num_tokens, minimum=0)
    check_gather_index(gather_index, row_gate, inverse_index, rows.device, num_tokens, rows.shape[0])
    chosen = resolve_backend(backend, rows, "theme_scatter")
    if chosen != "reference":
        if inverse_index is None:
            inverse_index = inverse_of(gather_index, num_tokens)
        return kernel_ops(chosen).theme_scatter(rows, gather_index, row_gate, inverse_index)
    return theme_scatter_reference(rows, gather_index, row_gate, num_tokens)


# The references without checks or backend choice: other ops' references compose them.

def theme_gather_reference(values: torch.Tensor, gather_index: torch.Tensor,
                           row_gate: Optional[torch.Tensor]) -> torch.Tensor:
    rows = values.index_select(0, gather_index)
    return rows if row_gate is None else rows * row_gate[:, None].to(rows.dtype)


def theme_scatter_reference(rows: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor],
                            num_tokens: int) -> torch.Tensor:
    scaled = rows if row_gate is None else rows * row_gate[:, None].to(rows.dtype)
    return rows.new_zeros((num_tokens, rows.shape[1])).index_add(0, gather_index, scaled)


def _grid(n: int, block_r: int):
    return (max(cdiv(n, block_r), 1),)


# ----------------------------------------------------------------------------- custom ops

@kernel_op("mos::theme_gather")
def _theme_gather_op(values: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor],
                     inverse_index: torch.Tensor) -> torch.Tensor:
    out = new_output((gather_index.numel(), values.shape[1]), dtype=values.dtype, device=values.device)
    if out.numel():
        from .theme_gather_kernels import _gather_rows   # triton only where a kernel launches

        block_r, block_d, num_warps = row_blocks(values.shape[1], values.dtype)
        _gather_rows[_grid(out.shape[0], block_r)](values, gather_index, row_gate, out, out.shape[0], values.shape[1],
                                                   HAS_GATE=row_gate is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                                                   num_warps=num_warps)
    return out


@_theme_gather_op.register_fake
def gather_fake(values, gather_index, row_gate, inverse_index):
    return values.new_empty((gather_index.shape[0], values.shape[1]))


@kernel_op("mos::theme_scatter")
def _theme_scatter_op(rows: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor],
                      inverse_index: torch.Tensor) -> torch.Tensor:
    num_tokens, slots = inverse_index.shape
    out = new_output((num_tokens, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    if out.numel():
        from .theme_gather_kernels import _scatter_rows

        block_r, block_d, num_warps = row_blocks(rows.shape[1], rows.dtype)
        _scatter_rows[_grid(num_tokens, block_r)](rows, inverse_index, row_gate, out, num_tokens, rows.shape[1],
                                                  SLOTS=slots, HAS_GATE=row_gate is not None, BLOCK_R=block_r,
                                                  BLOCK_D=block_d, num_warps=num_warps)
    return out


@_theme_scatter_op.register_fake
def scatter_fake(rows, gather_index, row_gate, inverse_index):
    return rows.new_empty((inverse_index.shape[0], rows.shape[1]))


@kernel_op("mos::row_dot")
def _row_dot_op(a: torch.Tensor, b: torch.Tensor, b_index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = new_output(a.shape[0], dtype=out_dtype, device=a.device)
    if out.numel():
        from .theme_gather_kernels import _row_dot

        block_r, block_d, num_warps = row_blocks(a.shape[1], a.dtype)
        _row_dot[_grid(a.shape[0], block_r)](a, b, b_index, out, a.shape[0], a.shape[1], BLOCK_R=block_r,
                                             BLOCK_D=block_d, num_warps=num_warps)
    return out


@_row_dot_op.register_fake
def row_dot_fake(a, b, b_index, out_dtype):
    return a.new_empty(a.shape[0], dtype=out_dtype)


def setup_context(ctx, inputs, output):
    data, gather_index, row_gate, inverse_index = inputs
    ctx.save_for_backward(data, gather_index, row_gate, inverse_index)


def _backward_for(lib: str, adjoint: str, data_is_rows: bool):
    """The autograd formula of `lib`::theme_gather / theme_scatter (mos: Triton, mos_cuda: the C++
    backend): the data's grad is the adjoint op on the incoming grad; the gate's grad is a
    row-wise dot of the theme-row side with the token side at gather_index."""
    def backward(ctx, grad):
        data, gather_index, row_gate, inverse_index = ctx.saved_tensors
        need_data, _, need_gate, _ = ctx.needs_input_grad
        ops = getattr(torch.ops, lib)
        g_data = getattr(ops, adjoint)(grad, gather_index, row_gate, inverse_index) if need_data else None
        rows, tokens = (data, grad) if data_is_rows else (grad, data)
        g_gate = ops.row_dot(rows, tokens, gather_index, row_gate.dtype) if need_gate else None
        return g_data, None, g_gate, None
    return backward


def gather_backward_for(lib: str):
    return _backward_for(lib, "theme_scatter", data_is_rows=False)


def scatter_backward_for(lib: str):
    return _backward_for(lib, "theme_gather", data_is_rows=True)


_theme_gather_op.register_autograd(gather_backward_for("mos"), setup_context=setup_context)
_theme_scatter_op.register_autograd(scatter_backward_for("mos"), setup_context=setup_context)


@register_flop_formula([torch.ops.mos.theme_gather, torch.ops.mos.theme_scatter])
def gate_flops(data_shape, gather_index_shape, row_gate_shape, *args, out_shape=None, **kwargs):
    # Data movement; the only arithmetic is one multiply per element by the gate (plus the scatter's adds).
    return 0 if row_gate_shape is None else gather_index_shape[0] * data_shape[1]
