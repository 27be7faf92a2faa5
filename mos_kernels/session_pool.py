"""`session_pool`: the mean item embedding of every session (spec step 2).

Reference here; the fused Triton kernel (pooling + routing) comes behind the same function.
"""
from __future__ import annotations

import torch

from ._checks import check_offsets, check_values
from .backend import resolve_backend
from .jagged import lengths_from_offsets, segment_ids


def session_pool(values: torch.Tensor, session_offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """values [T, d] + session_offsets [S+1] -> [S, d] means; an empty session pools to zeros."""
    check_values("values", values)
    check_offsets("session_offsets", session_offsets, total=values.shape[0], device=values.device)
    resolve_backend(backend, values, "session_pool")
    return _session_pool_reference(values, session_offsets)


def _session_pool_reference(values: torch.Tensor, session_offsets: torch.Tensor) -> torch.Tensor:
    num_sessions = session_offsets.numel() - 1
    # Accumulate in fp32 at least: half-precision sums of long sessions lose digits.
    acc_dtype = torch.promote_types(values.dtype, torch.float32)
    sums = values.new_zeros((num_sessions, values.shape[1]), dtype=acc_dtype)
    sums.index_add_(0, segment_ids(session_offsets, values.shape[0]), values.to(acc_dtype))
    counts = lengths_from_offsets(session_offsets).clamp_min(1).to(acc_dtype)
    return (sums / counts[:, None]).to(values.dtype)
