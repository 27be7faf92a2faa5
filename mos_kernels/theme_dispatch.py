"""`theme_dispatch`: build the theme-major layout of the theme subsequences (spec step 4).

Rows are sorted by (theme k, example b, time) with a STABLE sort, so each (k, b) segment is
example b's tokens of theme k in their original order (a contract, tested). Segment k*B + b
owns rows theme_offsets[k*B+b] : theme_offsets[k*B+b+1]; expert k owns the contiguous block
expert_offsets[k] : expert_offsets[k+1] (one GEMM per expert). Empty segments are normal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_offsets, check_positive, check_tensor
from .backend import resolve_backend
from .jagged import offsets_from_lengths, segment_ids


@dataclass
class Dispatch:
    gather_index: torch.Tensor    # [T'] int64, source token row of every theme row
    row_gate: torch.Tensor        # [T'] straight-through gate of every row (1 in the forward pass)
    theme_offsets: torch.Tensor   # [K*B+1] int64, segment k*B+b
    expert_offsets: torch.Tensor  # [K+1] int64, expert k's block of rows
    num_examples: int
    num_themes: int

    @property
    def segment_lengths(self) -> torch.Tensor:
        """[K, B] tokens in each theme subsequence."""
        return (self.theme_offsets[1:] - self.theme_offsets[:-1]).view(self.num_themes, self.num_examples)


def theme_dispatch(themes: torch.Tensor, gate: torch.Tensor, session_offsets: torch.Tensor,
                   session_example: torch.Tensor, *, num_examples: int, num_themes: int,
                   capacity: Optional[int] = None, backend: str = "auto") -> Dispatch:
    """Route every token of session s to themes[s, :] with gate[s, :].

    capacity: keep at most this many most recent tokens per (theme, example) subsequence.
    Without capacity T' = T * top_k is known in advance; with it the kept count is read back
    from the device (a sync).
    """
    check_tensor("themes", themes, ndim=2, dtypes=(torch.int64,))
    num_sessions, top_k = themes.shape
    check_tensor("gate", gate, ndim=2, device=themes.device)
    if tuple(gate.shape) != (num_sessions, top_k):
        raise ValueError(f"gate: expected shape {(num_sessions, top_k)} like themes, got {tuple(gate.shape)}")
    check_offsets("session_offsets", session_offsets, device=themes.device)
    if session_offsets.numel() != num_sessions + 1:
        raise ValueError(
            f"session_offsets: expected {num_sessions + 1} entries (S+1 for S={num_sessions} sessions), "
            f"got {session_offsets.numel()}")
    check_tensor("session_example", session_example, ndim=1, dtypes=(torch.int64,), device=themes.device)
    if session_example.numel() != num_sessions:
        raise ValueError(f"session_example: expected {num_sessions} entries, got {session_example.numel()}")
    check_positive("num_themes", num_themes)
    if num_examples < 0:
        raise ValueError(f"num_examples: expected a count >= 0, got {num_examples}")
    if capacity is not None:
        check_positive("capacity", capacity)
    if num_sessions and not torch.compiler.is_compiling():
        lo, hi = int(themes.min()), int(themes.max())
        if lo < 0 or hi >= num_themes:
            raise ValueError(f"themes: expected values in [0, {num_themes - 1}], got min {lo}, max {hi}")
        lo, hi = int(session_example.min()), int(session_example.max())
        if lo < 0 or hi >= num_examples:
            raise ValueError(f"session_example: expected values in [0, {num_examples - 1}], got min {lo}, max {hi}")
    resolve_backend(backend, themes, "theme_dispatch")
    return _theme_dispatch_reference(themes, gate, session_offsets, session_example,
                                     num_examples, num_themes, capacity)


def _theme_dispatch_reference(themes, gate, session_offsets, session_example,
                              num_examples, num_themes, capacity) -> Dispatch:
    num_tokens = int(session_offsets[-1])
    top_k = themes.shape[1]
    token_session = segment_ids(session_offsets, num_tokens)
    # Candidate rows in (token, choice) order: stable sorting by segment key keeps time order.
    key = (themes[token_session] * num_examples + session_example[token_session, None]).reshape(-1)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_themes * num_examples)
    theme_offsets = offsets_from_lengths(counts)
    if capacity is not None:
        sorted_key = key[order]
        rank_from_end = theme_offsets[sorted_key + 1] - 1 - torch.arange(order.numel(), device=order.device)
        order = order[rank_from_end < capacity]
        theme_offsets = offsets_from_lengths(counts.clamp_max(capacity))
    gather_index = torch.div(order, top_k, rounding_mode="floor")
    row_gate = gate[token_session].reshape(-1)[order]
    return Dispatch(gather_index=gather_index, row_gate=row_gate, theme_offsets=theme_offsets,
                    expert_offsets=theme_offsets[::num_examples] if num_examples else
                    theme_offsets.new_zeros(num_themes + 1),
                    num_examples=num_examples, num_themes=num_themes)
