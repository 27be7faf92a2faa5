"""Triton helpers for kernels that give each program a block of consecutive sessions.

A block's rows are contiguous (sessions are ordered), so such a program streams them in full
row tiles and finds each row's session by comparing it with the block's session bounds:
every load is a full tile, however short the sessions are.
"""
import triton
import triton.language as tl


@triton.jit
def session_block(offsets_ptr, num_sessions, BLOCK_S: tl.constexpr):
    """This program's sessions: ids, mask, row bounds of each, and the block's first/last row."""
    block = tl.program_id(0).to(tl.int64) * BLOCK_S     # 64-bit: session ids scale addresses
    sessions = block + tl.arange(0, BLOCK_S)
    s_ok = sessions < num_sessions
    starts = tl.load(offsets_ptr + sessions, mask=s_ok, other=0)
    ends = tl.load(offsets_ptr + sessions + 1, mask=s_ok, other=0)
    first = tl.load(offsets_ptr + block)
    last = tl.load(offsets_ptr + tl.minimum(block + BLOCK_S, num_sessions))
    return sessions, s_ok, starts, ends, first, last

