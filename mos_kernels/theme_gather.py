"""`theme_gather` / `theme_scatter`: move token rows into the theme-major layout and back.

gather: rows[r] = values[gather_index[r]] * row_gate[r]
scatter: out[t] = sum over r with gather_index[r] == t of rows[r] * row_gate[r]
Each is the other's backward (for the row data); the gate gets the row-wise dot product.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_tensor, check_values
from .backend import resolve_backend


def _check_index(gather_index, row_gate, device, num_source: Optional[int]):
    check_tensor("gather_index", gather_index, ndim=1, dtypes=(torch.int64,), device=device)
    if row_gate is not None:
        check_tensor("row_gate", row_gate, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        if row_gate.numel() != gather_index.numel():
            raise ValueError(f"row_gate: expected {gather_index.numel()} entries like gather_index, got {row_gate.numel()}")
    if num_source is not None and gather_index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(gather_index.min()), int(gather_index.max())
        if lo < 0 or hi >= num_source:
            raise ValueError(f"gather_index: expected values in [0, {num_source - 1}], got min {lo}, max {hi}")


def theme_gather(values: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor] = None,
                 *, backend: str = "auto") -> torch.Tensor:
    """values [T, d] -> rows [T', d] in the order of gather_index, scaled by row_gate."""
    check_values("values", values)
    _check_index(gather_index, row_gate, values.device, values.shape[0])
    resolve_backend(backend, values, "theme_gather")
    rows = values.index_select(0, gather_index)
    return rows if row_gate is None else rows * row_gate[:, None].to(rows.dtype)


def theme_scatter(rows: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor] = None,
                  *, num_tokens: int, backend: str = "auto") -> torch.Tensor:
    """rows [T', d] -> [num_tokens, d]: every row (scaled by its gate) added to its source token."""
    check_values("rows", rows)
    if rows.shape[0] != gather_index.numel():
        raise ValueError(f"rows: expected {gather_index.numel()} rows like gather_index, got {rows.shape[0]}")
    _check_index(gather_index, row_gate, rows.device, num_tokens)
    resolve_backend(backend, rows, "theme_scatter")
    scaled = rows if row_gate is None else rows * row_gate[:, None].to(rows.dtype)
    out = rows.new_zeros((num_tokens, rows.shape[1]))
    return out.index_add(0, gather_index, scaled)
