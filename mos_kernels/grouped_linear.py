"""`grouped_linear`: one linear map per expert over that expert's contiguous block of rows.

x [N, d_in], weight [E, d_in, d_out], bias [E, d_out] or None, expert_offsets [E+1]:
rows expert_offsets[e]:expert_offsets[e+1] are multiplied by weight[e] (y = x @ W + b).
The reference pads the blocks to [E, max_rows, d_in] and runs one batched GEMM: vectorised,
obviously correct, and its padding cost is what the fused kernel removes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_offsets, check_tensor
from .backend import resolve_backend
from .jagged import max_segment_length, positions_in_segment, segment_ids


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   expert_offsets: torch.Tensor, *, max_rows: Optional[int] = None,
                   backend: str = "auto") -> torch.Tensor:
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
    resolve_backend(backend, x, "grouped_linear")
    if max_rows is None:
        max_rows = max_segment_length(expert_offsets)
    return _grouped_linear_reference(x, weight, bias, expert_offsets, max_rows)


def _grouped_linear_reference(x, weight, bias, expert_offsets, max_rows):
    num_rows = x.shape[0]
    expert = segment_ids(expert_offsets, num_rows)
    pos = positions_in_segment(expert_offsets, num_rows)
    padded = x.new_zeros((weight.shape[0], max_rows, x.shape[1]))
    padded = padded.index_put((expert, pos), x)
    y = torch.bmm(padded, weight.to(x.dtype))[expert, pos]
    return y if bias is None else y + bias.to(x.dtype)[expert]
