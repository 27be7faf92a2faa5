"""The Triton kernels of `theme_dispatch`'s stable counting sort: `_dispatch_count` (one
program per example: ranks and segment sizes) and `_dispatch_fill` (one program per block of
sessions: every kept row's token, gate and inverse index)."""
from __future__ import annotations

import triton
import triton.language as tl

from .session_blocks import session_block


# A stable counting sort in 32-bit integers (T * top_k < 2^31, checked by the wrapper); the
# outputs are int64 only because the Dispatch contract is.

@triton.jit
def _dispatch_count(themes_ptr, session_offsets_ptr, example_session_offsets_ptr, rank_ptr, counts_ptr,
                    num_examples, num_themes, top_k, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per example, its sessions in time order: rank[s, j] = the rows of segment
    (themes[s, j], b) before session s; counts[k * B + b] = the rows of segment (k, b), every
    k < K written (no zero fill needed)."""
    b = tl.program_id(0).to(tl.int64)
    first = tl.load(example_session_offsets_ptr + b)
    last = tl.load(example_session_offsets_ptr + b + 1)
    ks = tl.arange(0, BLOCK_K)
    carry = tl.zeros([BLOCK_K], dtype=tl.int32)
    for s0 in range(first, last, BLOCK_S):
        sessions = s0 + tl.arange(0, BLOCK_S)
        ok = sessions < last
        length = (tl.load(session_offsets_ptr + sessions + 1, mask=ok, other=0)
                  - tl.load(session_offsets_ptr + sessions, mask=ok, other=0)).to(tl.int32)
        tokens = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.int32)   # tokens each session adds to each theme
        for j in range(top_k):
            theme = tl.load(themes_ptr + sessions * top_k + j, mask=ok, other=-1).to(tl.int32)
            tokens += tl.where(theme[:, None] == ks[None, :], length[:, None], 0)
        before = tl.cumsum(tokens, axis=0) - tokens + carry[None, :]
        for j in range(top_k):
            theme = tl.load(themes_ptr + sessions * top_k + j, mask=ok, other=-1).to(tl.int32)
            rank = tl.sum(tl.where(theme[:, None] == ks[None, :], before, 0), axis=1)
            tl.store(rank_ptr + sessions * top_k + j, rank, mask=ok)
        carry += tl.sum(tokens, axis=0)
    # 64-bit: k * B + b passes 2^31 for K * B > 2^31 segments.
    tl.store(counts_ptr + ks.to(tl.int64) * num_examples + b, carry, mask=ks < num_themes)


@triton.jit
def _session_in_block(starts, s_ok, row0, BLOCK_T: tl.constexpr):
    """[BLOCK_T] int32: the block's session (0..BLOCK_S-1) of rows row0 .. row0 + BLOCK_T - 1.

    Session of row r = (block sessions starting at or before r) - 1: those begun before the
    tile, plus a running sum over the tile of the sessions starting at each row (a histogram of
    their starts). An empty session shares its start with the next one, so it never owns a row.
    """
    offset = starts - row0
    begun = tl.sum((s_ok & (offset < 0)).to(tl.int32), axis=0)
    starting = tl.histogram(offset.to(tl.int32), BLOCK_T, mask=s_ok & (offset >= 0) & (offset < BLOCK_T))
    return begun + tl.cumsum(starting, axis=0) - 1


@triton.jit
def _dispatch_fill(themes_ptr, gate_ptr, session_offsets_ptr, session_example_ptr, rank_ptr, counts_ptr,
                   theme_offsets_ptr, gather_index_ptr, row_gate_ptr, inverse_ptr, num_sessions, num_examples,
                   top_k, max_theme_tokens, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
                   HAS_MAX_THEME_TOKENS: tl.constexpr):
    """One program per block of BLOCK_S sessions (`session_blocks`). Token row t of session s
    goes, for choice j, to dest = base[s, j] + t. (session, choice) pairs and (row, choice)
    tiles are flat vectors, pair p = (p // BLOCK_J, p % BLOCK_J): 1-D gathers, and the tile
    is laid out as inverse_index is."""
    sessions, s_ok, starts, ends, first, last = session_block(session_offsets_ptr, num_sessions, BLOCK_S)
    pair = tl.arange(0, BLOCK_S * BLOCK_J)
    session = tl.program_id(0).to(tl.int64) * BLOCK_S + pair // BLOCK_J
    choice = pair % BLOCK_J
    pair_ok = (session < num_sessions) & (choice < top_k)
    pair_index = session * top_k + choice
    example = tl.load(session_example_ptr + session, mask=pair_ok, other=0)
    key = tl.load(themes_ptr + pair_index, mask=pair_ok, other=0) * num_examples + example
    # first_kept: the token row of rank 0 in the segment (rank <= session start: the ranks
    # count earlier rows of the same example). Capacity keeps the newest rows: the oldest
    # count - max_theme_tokens ranks are dropped.
    first_kept = (tl.load(session_offsets_ptr + session, mask=pair_ok, other=0).to(tl.int32)
                  - tl.load(rank_ptr + pair_index, mask=pair_ok, other=0))
    if HAS_MAX_THEME_TOKENS:
        first_kept += tl.maximum(tl.load(counts_ptr + key, mask=pair_ok, other=0) - max_theme_tokens, 0)
    base = tl.load(theme_offsets_ptr + key, mask=pair_ok, other=0).to(tl.int32) - first_kept
    gate = tl.load(gate_ptr + pair_index, mask=pair_ok, other=0)
    cell = tl.arange(0, BLOCK_T * BLOCK_J)
    cell_choice = cell % BLOCK_J
    for row0 in range(first, last, BLOCK_T):
        rows = row0 + cell // BLOCK_J                                  # int64
        at = _session_in_block(starts, s_ok, row0, BLOCK_T)
        at = tl.reshape(tl.broadcast_to(at[:, None], (BLOCK_T, BLOCK_J)), (BLOCK_T * BLOCK_J,))
        # The cell's (session, choice) pair; a product in 64 bits like every index product (the
        # address check does not tell a register index from a memory offset).
        at = at.to(tl.int64) * BLOCK_J + cell_choice
        dest = tl.gather(base, at, axis=0) + rows.to(tl.int32)
        valid = (rows < last) & (cell_choice < top_k)
        keep = valid
        if HAS_MAX_THEME_TOKENS:
            keep = valid & (rows.to(tl.int32) >= tl.gather(first_kept, at, axis=0))
        tl.store(gather_index_ptr + dest, rows, mask=keep)
        tl.store(row_gate_ptr + dest, tl.gather(gate, at, axis=0), mask=keep)
        tl.store(inverse_ptr + rows * top_k + cell_choice, tl.where(keep, dest, -1).to(tl.int64), mask=valid)


# Held by the sm_90 compile check (tools/compile_check.py) over every configuration `count_blocks`
# and `fill_blocks` launch, as resident warps per SM: the count scans with 16 warps or more in
# flight; the fill gets 8 at the widest pair tiles (top_k 32 and 64: 1024 (row, choice) cells a
# tile), 36 to 64 at top_k <= 2.
MIN_WARPS_PER_SM = {"_dispatch_count": 16, "_dispatch_fill": 8}
