"""`theme_dispatch`: build the theme-major layout of the theme subsequences (spec step 4).

Rows are sorted by (theme k, example b, time) with a STABLE order, so each (k, b) segment is
example b's tokens of theme k in their original order (a contract, tested). Segment k*B + b
owns rows theme_offsets[k*B+b] : theme_offsets[k*B+b+1]; expert k owns the contiguous block
expert_offsets[k] : expert_offsets[k+1] (one GEMM per expert). Empty segments are normal.

Reference: a stable argsort of the (theme, example) key of every (token, choice).
Triton: a stable counting sort in two integer passes, no atomics, deterministic:
  1. `_dispatch_count`, one program per example: scans its sessions in time order and gives
     every (session, choice) its rank inside its (theme, example) segment, and the counts;
  2. an exclusive prefix sum of the counts (torch.cumsum) gives the segment starts;
  3. `_dispatch_fill`, one program per block of sessions: writes each row at start + rank.
Sizes: without `capacity` T' = T * top_k is known up front (no sync); with it the kept row
count is read back from the device once (documented sync).
CUDA C++: the same counting sort as torch.ops.mos_cuda.theme_dispatch (csrc/mos/theme_dispatch.h).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._alloc import new_output
from ._checks import check_offsets, check_positive, check_tensor, reads_data
from ._layout import kernel_op
from .backend import kernel_ops, resolve_backend
from .jagged import counts_of, offsets_from_lengths, segment_ids
from .session_blocks import membership, session_block


@dataclass
class Dispatch:
    gather_index: torch.Tensor    # [T'] int64, source token row of every theme row
    row_gate: torch.Tensor        # [T'] straight-through gate of every row (1 in the forward pass)
    inverse_index: torch.Tensor   # [T, top_k] int64, the theme row of each (token, choice); -1 if dropped
    theme_offsets: torch.Tensor   # [K*B+1] int64, segment k*B+b
    num_examples: int
    num_themes: int

    @property
    def expert_offsets(self) -> torch.Tensor:
        """[K+1] int64, expert k's contiguous block of rows."""
        if self.num_examples == 0:
            return self.theme_offsets.new_zeros(self.num_themes + 1)
        return self.theme_offsets[::self.num_examples]

    @property
    def segment_lengths(self) -> torch.Tensor:
        """[K, B] tokens in each theme subsequence."""
        return (self.theme_offsets[1:] - self.theme_offsets[:-1]).view(self.num_themes, self.num_examples)


def theme_dispatch(themes: torch.Tensor, gate: torch.Tensor, session_offsets: torch.Tensor,
                   session_example: torch.Tensor, *, num_examples: int, num_themes: int,
                   capacity: Optional[int] = None, num_tokens: Optional[int] = None,
                   backend: str = "auto") -> Dispatch:
    """Route every token of session s to themes[s, :] with gate[s, :].

    Sessions must be ordered by example (as `sessionize` makes them). capacity: keep at most
    this many most recent tokens per (theme, example) subsequence. num_tokens: T
    (= session_offsets[-1]); pass it to avoid reading it back from the device.
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
    if reads_data() and num_sessions:
        lo, hi = int(themes.min()), int(themes.max())
        if lo < 0 or hi >= num_themes:
            raise ValueError(f"themes: expected values in [0, {num_themes - 1}], got min {lo}, max {hi}")
        lo, hi = int(session_example.min()), int(session_example.max())
        if lo < 0 or hi >= num_examples:
            raise ValueError(f"session_example: expected values in [0, {num_examples - 1}], got min {lo}, max {hi}")
        if top_k > 1:
            # A session's choices are distinct themes (top-k): the kernels' counting sort places
            # choice j's rows before choice j+1's, which equals the reference's (token, choice)
            # order only when no two choices share a segment.
            sorted_themes = themes.sort(dim=1).values
            if bool((sorted_themes[:, 1:] == sorted_themes[:, :-1]).any()):
                raise ValueError("themes: expected distinct themes in each row (a session's top-k choices), "
                                 "got a repeated theme")
        if num_sessions > 1 and bool((session_example[1:] < session_example[:-1]).any()):
            raise ValueError("session_example: expected sessions ordered by example (non-decreasing), got a step back")
    if num_tokens is None:
        num_tokens = int(session_offsets[-1])
    elif reads_data() and int(session_offsets[-1]) != num_tokens:
        raise ValueError(f"num_tokens: expected session_offsets[-1] = {int(session_offsets[-1])}, got {num_tokens}")
    chosen = resolve_backend(backend, themes, "theme_dispatch")
    if chosen != "reference":
        example_session_offsets = offsets_from_lengths(counts_of(session_example, num_examples))
        gather_index, row_source, inverse_index, theme_offsets = kernel_ops(chosen).theme_dispatch(
            themes, session_offsets, session_example, example_session_offsets, num_tokens, num_themes,
            capacity or 0)
    else:
        gather_index, row_source, inverse_index, theme_offsets = _theme_dispatch_reference(
            themes, session_offsets, session_example, num_examples, num_themes, capacity, num_tokens)
    row_gate = gate.reshape(-1)[row_source]
    return Dispatch(gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index,
                    theme_offsets=theme_offsets, num_examples=num_examples, num_themes=num_themes)


def _theme_dispatch_reference(themes, session_offsets, session_example, num_examples, num_themes, capacity,
                              num_tokens):
    top_k = themes.shape[1]
    token_session = segment_ids(session_offsets, num_tokens)
    # Candidate rows in (token, choice) order: stable sorting by segment key keeps time order.
    key = (themes[token_session] * num_examples + session_example[token_session, None]).reshape(-1)
    order = torch.sort(key, stable=True).indices
    counts = counts_of(key, num_themes * num_examples)
    if capacity is not None:
        ends = offsets_from_lengths(counts)[1:]
        rank_from_end = ends[key[order]] - 1 - torch.arange(order.numel(), device=order.device)
        order = order[rank_from_end < capacity]
        counts = counts.clamp_max(capacity)
    inverse_index = torch.full((num_tokens * top_k,), -1, dtype=torch.int64, device=themes.device)
    inverse_index[order] = torch.arange(order.numel(), device=order.device)
    token = torch.div(order, top_k, rounding_mode="floor")
    row_source = token_session[token] * top_k + order % top_k
    return token, row_source, inverse_index.view(num_tokens, top_k), offsets_from_lengths(counts)


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _dispatch_count(themes_ptr, session_offsets_ptr, example_session_offsets_ptr, rank_ptr, counts_ptr,
                    num_examples, num_themes,
                    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, TOP_K: tl.constexpr):
    # 64-bit: counts_ptr + k * B + b passes 2^31 for K * B > 2^31 segments.
    b = tl.program_id(0).to(tl.int64)
    num_examples = tl.cast(num_examples, tl.int64)
    first = tl.load(example_session_offsets_ptr + b)
    last = tl.load(example_session_offsets_ptr + b + 1)
    ks = tl.arange(0, BLOCK_K)
    carry = tl.zeros([BLOCK_K], dtype=tl.int64)
    for s0 in range(first, last, BLOCK_S):
        sessions = s0 + tl.arange(0, BLOCK_S)
        ok = sessions < last
        length = (tl.load(session_offsets_ptr + sessions + 1, mask=ok, other=0)
                  - tl.load(session_offsets_ptr + sessions, mask=ok, other=0))
        tokens = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.int64)   # tokens each session adds to each theme
        for j in tl.static_range(TOP_K):
            theme = tl.load(themes_ptr + sessions * TOP_K + j, mask=ok, other=-1)
            tokens += tl.where(theme[:, None] == ks[None, :], length[:, None], 0)
        before = tl.cumsum(tokens, axis=0) - tokens + carry[None, :]
        for j in tl.static_range(TOP_K):
            theme = tl.load(themes_ptr + sessions * TOP_K + j, mask=ok, other=-1)
            rank = tl.sum(tl.where(theme[:, None] == ks[None, :], before, 0), axis=1)
            tl.store(rank_ptr + sessions * TOP_K + j, rank, mask=ok)
        carry += tl.sum(tokens, axis=0)
    tl.store(counts_ptr + ks * num_examples + b, carry, mask=ks < num_themes)


@triton.jit
def _dispatch_fill(themes_ptr, session_offsets_ptr, session_example_ptr, rank_ptr, counts_ptr, theme_offsets_ptr,
                   gather_index_ptr, row_source_ptr, inverse_ptr, num_sessions, num_examples, capacity,
                   BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, TOP_K: tl.constexpr,
                   HAS_CAPACITY: tl.constexpr):
    # One program per block of BLOCK_S sessions (`session_blocks`), rows in full BLOCK_T tiles.
    sessions, s_ok, starts, ends, first, last = session_block(session_offsets_ptr, num_sessions, BLOCK_S)
    example = tl.load(session_example_ptr + sessions, mask=s_ok, other=0)
    for j in tl.static_range(TOP_K):
        key = tl.load(themes_ptr + sessions * TOP_K + j, mask=s_ok, other=0) * num_examples + example
        # Row r of session s has rank first_rank[s] + (r - start[s]) inside segment `key`.
        rank_shift = tl.load(rank_ptr + sessions * TOP_K + j, mask=s_ok, other=0) - starts
        if HAS_CAPACITY:
            # Capacity keeps the newest rows: the oldest count - capacity ranks are dropped.
            rank_shift -= tl.maximum(tl.load(counts_ptr + key, mask=s_ok, other=0) - capacity, 0)
        dest_shift = tl.load(theme_offsets_ptr + key, mask=s_ok, other=0) + rank_shift
        for row0 in range(first, last, BLOCK_T):
            rows = row0 + tl.arange(0, BLOCK_T)
            in_block = rows < last
            member = membership(rows, starts, ends)
            row_rank = tl.sum(tl.where(member, rank_shift[:, None], 0), axis=0) + rows
            dest = tl.sum(tl.where(member, dest_shift[:, None], 0), axis=0) + rows
            source = tl.sum(tl.where(member, sessions[:, None], 0), axis=0) * TOP_K + j
            keep = in_block & (row_rank >= 0)
            tl.store(gather_index_ptr + dest, rows, mask=keep)
            tl.store(row_source_ptr + dest, source, mask=keep)
            tl.store(inverse_ptr + rows * TOP_K + j, tl.where(keep, dest, -1), mask=in_block)


_COUNT_BLOCK_S = 64   # sessions per step of an example's scan
_FILL_BLOCK_S = 32    # sessions per fill program
_FILL_BLOCK_T = 128   # rows per fill tile


@kernel_op("mos::theme_dispatch")
def _theme_dispatch_op(themes: torch.Tensor, session_offsets: torch.Tensor, session_example: torch.Tensor,
                       example_session_offsets: torch.Tensor, num_tokens: int, num_themes: int,
                       capacity: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """capacity 0 = unlimited. Returns gather_index, row_source (flat session*top_k + choice),
    inverse_index [T, top_k], theme_offsets [K*B+1]."""
    num_sessions, top_k = themes.shape
    num_examples = example_session_offsets.numel() - 1
    device = themes.device
    rank = new_output((num_sessions, top_k), dtype=torch.int64, device=device)
    counts = torch.zeros(num_themes * num_examples, dtype=torch.int64, device=device)
    if num_examples:
        _dispatch_count[(num_examples,)](
            themes, session_offsets, example_session_offsets, rank, counts, num_examples, num_themes,
            BLOCK_S=_COUNT_BLOCK_S, BLOCK_K=max(triton.next_power_of_2(num_themes), 2), TOP_K=top_k)
    kept = counts.clamp_max(capacity) if capacity else counts
    theme_offsets = offsets_from_lengths(kept)
    num_rows = int(theme_offsets[-1]) if capacity else num_tokens * top_k   # the documented sync
    gather_index = new_output(num_rows, dtype=torch.int64, device=device)
    row_source = new_output(num_rows, dtype=torch.int64, device=device)
    inverse_index = new_output((num_tokens, top_k), dtype=torch.int64, device=device)
    if num_sessions:
        _dispatch_fill[(triton.cdiv(num_sessions, _FILL_BLOCK_S),)](
            themes, session_offsets, session_example, rank, counts, theme_offsets,
            gather_index, row_source, inverse_index, num_sessions, num_examples, capacity,
            BLOCK_S=_FILL_BLOCK_S, BLOCK_T=_FILL_BLOCK_T, TOP_K=top_k, HAS_CAPACITY=capacity > 0)
    return gather_index, row_source, inverse_index, theme_offsets


@_theme_dispatch_op.register_fake
def dispatch_fake(themes, session_offsets, session_example, example_session_offsets, num_tokens, num_themes, capacity):
    top_k = themes.shape[1]
    num_examples = example_session_offsets.shape[0] - 1
    num_rows = torch.library.get_ctx().new_dynamic_size() if capacity else num_tokens * top_k
    new = themes.new_empty
    return (new(num_rows), new(num_rows), new((num_tokens, top_k)), new(num_themes * num_examples + 1))
