"""`theme_dispatch`: build the theme-major layout of the theme subsequences.

Rows are sorted by (theme k, example b, time) with a STABLE order, so each (k, b) segment is
example b's tokens of theme k in their original order (a contract, tested). Segment k*B + b
owns rows theme_offsets[k*B+b] : theme_offsets[k*B+b+1]; expert k owns the contiguous block
expert_offsets[k] : expert_offsets[k+1] (one GEMM per expert). Empty segments are normal.

Reference: a stable argsort of the (theme, example) key of every (token, choice).
Triton: a stable counting sort in two integer passes (`theme_dispatch_kernels`), no atomics,
deterministic:
  1. `_dispatch_count`, one program per example: scans its sessions in time order and gives
     every (session, choice) its rank inside its (theme, example) segment, and the counts;
  2. an exclusive prefix sum of the counts (torch.cumsum) gives the segment starts;
  3. `_dispatch_fill`, one program per block of sessions: each (session, choice) has a base
     (segment start + rank - session start), so a token row t goes to base + t; the fill finds
     each row's session from the block's session starts (a histogram, no per-row search) and
     writes the row's token, its gate and the inverse index.
Sizes: without `max_theme_tokens` T' = T * top_k is known up front (no sync); with it the kept row
count is read back from the device once (documented sync).
CUDA C++: the same counting sort as torch.ops.mos_cuda.theme_dispatch (csrc/mos/theme_dispatch.h).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._alloc import new_output
from .checks import FLOAT_DTYPES, check_count, check_finite, check_offsets, check_tensor, reads_data
from ._layout import kernel_op
from .backend import kernel_ops, resolve_backend
from .jagged import counts_of, expert_offsets, offsets_from_lengths, segment_ids
from ._launch import cdiv, next_power_of_2


@dataclass
class Dispatch:
    gather_index: torch.Tensor    # [T'] int64, source token row of every theme row
    row_gate: torch.Tensor        # [T'] gate of every row, gate's dtype (1 in the forward pass when
                                  # it comes from the router's straight-through gate)
    inverse_index: torch.Tensor   # [T, top_k] int64, the theme row of each (token, choice); -1 if dropped
    theme_offsets: torch.Tensor   # [K*B+1] int64, segment k*B+b
    num_examples: int
    num_themes: int

    @property
    def expert_offsets(self) -> torch.Tensor:
        """[K+1] int64, expert k's contiguous block of rows."""
        return expert_offsets(self.theme_offsets, self.num_themes)

    @property
    def segment_lengths(self) -> torch.Tensor:
        """[K, B] tokens in each theme subsequence."""
        return (self.theme_offsets[1:] - self.theme_offsets[:-1]).view(self.num_themes, self.num_examples)


def theme_dispatch(themes: torch.Tensor, gate: torch.Tensor, session_offsets: torch.Tensor,
                   session_example: torch.Tensor, *, num_examples: int, num_themes: int,
                   max_theme_tokens: Optional[int] = None, num_tokens: Optional[int] = None,
                   example_session_offsets: Optional[torch.Tensor] = None, backend: str = "auto") -> Dispatch:
    """Route every token of session s to themes[s, :] with gate[s, :].

    themes [S, top_k] int64 (distinct in each row), gate [S, top_k] float, session_offsets
    [S+1] int64, session_example [S] int64. Sessions must be ordered by example (as
    `sessionize` makes them). max_theme_tokens: keep at most this many most recent tokens per
    (theme, example) subsequence. num_tokens: T (= session_offsets[-1]); pass it to avoid
    reading it back from the device. example_session_offsets: [B+1] int64, example b owns
    sessions o[b]:o[b+1] (`Sessions.example_session_offsets`); built from session_example when
    not given. The kernels index rows in 32 bits: T * top_k must stay below 2^31.
    Raises ValueError / TypeError naming the argument on a bad shape, dtype or value.
    """
    check_tensor("themes", themes, ndim=2, dtypes=(torch.int64,))
    num_sessions, top_k = themes.shape
    check_tensor("gate", gate, ndim=2, dtypes=FLOAT_DTYPES, device=themes.device)
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
    check_count("num_themes", num_themes)
    check_count("num_examples", num_examples, minimum=0)
    if max_theme_tokens is not None:
        check_count("max_theme_tokens", max_theme_tokens)
    if num_tokens is not None:
        check_count("num_tokens", num_tokens, minimum=0)
    if not torch.compiler.is_compiling() and num_sessions and num_examples == 0:
        raise ValueError(f"num_examples: expected at least 1 (session_example names the example of each of the "
                         f"{num_sessions} sessions), got 0")
    if not torch.compiler.is_compiling() and num_examples * num_themes >= 2 ** 62:
        raise ValueError(f"num_examples: expected num_examples * num_themes < 2^62 (one segment each), "
                         f"got {num_examples} * {num_themes}")
    check_finite("gate", gate)
    if reads_data() and num_sessions:
        check_themes(themes, num_themes)
        check_session_examples(session_example, num_examples)
    if num_tokens is None:
        num_tokens = int(session_offsets[-1])
    elif reads_data() and int(session_offsets[-1]) != num_tokens:
        raise ValueError(f"num_tokens: expected session_offsets[-1] = {int(session_offsets[-1])}, got {num_tokens}")
    if example_session_offsets is not None:
        check_example_session_offsets(example_session_offsets, session_example, num_examples)
    chosen = resolve_backend(backend, themes, "theme_dispatch")
    if chosen == "reference":
        gather_index, row_gate, inverse_index, theme_offsets = _theme_dispatch_reference(
            themes, gate, session_offsets, session_example, num_examples, num_themes, max_theme_tokens, num_tokens)
    else:
        if num_tokens * top_k >= 2 ** 31:
            raise ValueError(f"num_tokens: expected num_tokens * top_k < 2^31 theme rows (backend {chosen!r} "
                             f"indexes rows in 32 bits), got {num_tokens} * {top_k}")
        if example_session_offsets is None:
            example_session_offsets = offsets_from_lengths(counts_of(session_example, num_examples), check=False)
        gather_index, row_gate, inverse_index, theme_offsets = kernel_ops(chosen).theme_dispatch(
            themes, gate, session_offsets, session_example, example_session_offsets, num_tokens, num_themes,
            max_theme_tokens or 0)
    return Dispatch(gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index,
                    theme_offsets=theme_offsets, num_examples=num_examples, num_themes=num_themes)


def check_themes(themes: torch.Tensor, num_themes: int) -> None:
    """Each row's top-k themes in [0, K) and distinct (a data check: syncs). The kernels index
    segments by them, and their counting sort places choice j's rows before choice j+1's, which
    equals the reference's (token, choice) order only when no two choices share a segment."""
    lo, hi = int(themes.min()), int(themes.max())
    if lo < 0 or hi >= num_themes:
        raise ValueError(f"themes: expected values in [0, {num_themes - 1}], got min {lo}, max {hi}")
    if themes.shape[1] > 1:
        sorted_themes = themes.sort(dim=1).values
        if bool((sorted_themes[:, 1:] == sorted_themes[:, :-1]).any()):
            raise ValueError("themes: expected distinct themes in each row (a session's top-k choices), "
                             "got a repeated theme")


def check_session_examples(session_example: torch.Tensor, num_examples: int) -> None:
    """Each session's example in [0, B), sessions ordered by example (a data check: syncs)."""
    lo, hi = int(session_example.min()), int(session_example.max())
    if lo < 0 or hi >= num_examples:
        raise ValueError(f"session_example: expected values in [0, {num_examples - 1}], got min {lo}, max {hi}")
    if session_example.shape[0] > 1 and bool((session_example[1:] < session_example[:-1]).any()):
        raise ValueError("session_example: expected sessions ordered by example (non-decreasing), got a step back")


def check_example_session_offsets(offsets, session_example, num_examples):
    """example_session_offsets must be what session_example says: the kernels trust it."""
    num_sessions = session_example.numel()
    check_offsets("example_session_offsets", offsets, total=num_sessions, device=session_example.device)
    if offsets.numel() != num_examples + 1:
        raise ValueError(f"example_session_offsets: expected {num_examples + 1} entries (B+1 for "
                         f"B={num_examples} examples), got {offsets.numel()}")
    if reads_data() and num_sessions:
        built = offsets_from_lengths(counts_of(session_example, num_examples), check=False)
        wrong = torch.nonzero(built != offsets)
        if wrong.numel():
            b = int(wrong[0])
            raise ValueError(f"example_session_offsets: expected the sessions of each example as session_example "
                             f"orders them, got example_session_offsets[{b}] = {int(offsets[b])}, expected "
                             f"{int(built[b])}")


def _theme_dispatch_reference(themes, gate, session_offsets, session_example, num_examples, num_themes,
                              max_theme_tokens, num_tokens):
    top_k = themes.shape[1]
    token_session = segment_ids(session_offsets, num_tokens, check=False)
    # Candidate rows in (token, choice) order: stable sorting by segment key keeps time order.
    key = (themes[token_session] * num_examples + session_example[token_session, None]).reshape(-1)
    order = torch.sort(key, stable=True).indices
    counts = counts_of(key, num_themes * num_examples)
    if max_theme_tokens is not None:
        ends = offsets_from_lengths(counts, check=False)[1:]
        rank_from_end = ends[key[order]] - 1 - torch.arange(order.numel(), device=order.device)
        order = order[rank_from_end < max_theme_tokens]
        counts = counts.clamp_max(max_theme_tokens)
    inverse_index = torch.full((num_tokens * top_k,), -1, dtype=torch.int64, device=themes.device)
    inverse_index[order] = torch.arange(order.numel(), device=order.device)
    token = torch.div(order, top_k, rounding_mode="floor")
    row_gate = gate.reshape(-1)[token_session[token] * top_k + order % top_k]
    return token, row_gate, inverse_index.view(num_tokens, top_k), offsets_from_lengths(counts, check=False)


_COUNT_CELLS = 1024   # (session, theme) cells per step of an example's scan
_FILL_BLOCK_S = 32    # sessions per fill program
_FILL_ROWS = 128      # token rows per fill tile
_FILL_CELLS = 1024    # at most this many (token row, choice) cells per fill tile
# The gate is only copied, so the fill moves its bits as integers of the same width: one
# compiled kernel per width rather than per float type.
_GATE_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def count_blocks(num_themes: int) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_K) of the count for K themes; tools/compile_configs.py lists the same. The step
    holds a fixed number of cells, so few themes scan many sessions per step (fewer dependent
    steps for long examples) and many themes stay in registers."""
    block_k = max(next_power_of_2(num_themes), 2)
    return max(_COUNT_CELLS // block_k, 16), block_k


def fill_blocks(top_k: int) -> Tuple[int, int, int]:
    """(BLOCK_S, BLOCK_T, BLOCK_J) of the fill for top_k choices; tools/compile_configs.py lists the same.
    A tile holds 128 rows, fewer for top_k > 8 (at most 1024 (row, choice) cells), at least 32
    (the histogram needs a bin per lane)."""
    block_j = max(next_power_of_2(top_k), 1)
    return _FILL_BLOCK_S, max(min(_FILL_ROWS, _FILL_CELLS // block_j), 32), block_j


def _segment_starts(counts: torch.Tensor, max_theme_tokens: int) -> torch.Tensor:
    """theme_offsets [K*B+1] int64 from the int32 segment sizes, capped at max_theme_tokens."""
    kept = counts.clamp_max(max_theme_tokens) if max_theme_tokens else counts
    offsets = torch.zeros(kept.numel() + 1, dtype=torch.int64, device=kept.device)
    torch.cumsum(kept, 0, dtype=torch.int64, out=offsets[1:])
    return offsets


@kernel_op("mos::theme_dispatch")
def _theme_dispatch_op(themes: torch.Tensor, gate: torch.Tensor, session_offsets: torch.Tensor,
                       session_example: torch.Tensor, example_session_offsets: torch.Tensor, num_tokens: int,
                       num_themes: int, max_theme_tokens: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """max_theme_tokens 0 = unlimited. Returns gather_index [T'] int64, row_gate [T'] (gate's dtype),
    inverse_index [T, top_k] int64, theme_offsets [K*B+1] int64."""
    from .theme_dispatch_kernels import _dispatch_count, _dispatch_fill   # triton only where a kernel launches

    num_sessions, top_k = themes.shape
    num_examples = example_session_offsets.numel() - 1
    device = themes.device
    rank = new_output((num_sessions, top_k), dtype=torch.int32, device=device)
    counts = new_output(num_themes * num_examples, dtype=torch.int32, device=device)
    if num_examples:
        block_s, block_k = count_blocks(num_themes)
        _dispatch_count[(num_examples,)](
            themes, session_offsets, example_session_offsets, rank, counts, num_examples, num_themes, top_k,
            BLOCK_S=block_s, BLOCK_K=block_k)
    theme_offsets = _segment_starts(counts, max_theme_tokens)
    num_rows = int(theme_offsets[-1]) if max_theme_tokens else num_tokens * top_k   # the documented sync
    gather_index = new_output(num_rows, dtype=torch.int64, device=device)
    row_gate = new_output(num_rows, dtype=gate.dtype, device=device)
    inverse_index = new_output((num_tokens, top_k), dtype=torch.int64, device=device)
    if num_sessions:
        block_s, block_t, block_j = fill_blocks(top_k)
        bits = _GATE_BITS[gate.element_size()]
        _dispatch_fill[(cdiv(num_sessions, block_s),)](
            themes, gate.view(bits), session_offsets, session_example, rank, counts, theme_offsets,
            gather_index, row_gate.view(bits), inverse_index, num_sessions, num_examples, top_k, max_theme_tokens,
            BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_J=block_j, HAS_MAX_THEME_TOKENS=max_theme_tokens > 0)
    return gather_index, row_gate, inverse_index, theme_offsets


@_theme_dispatch_op.register_fake
def dispatch_fake(themes, gate, session_offsets, session_example, example_session_offsets, num_tokens, num_themes,
                  max_theme_tokens):
    top_k = themes.shape[1]
    num_examples = example_session_offsets.shape[0] - 1
    num_rows = torch.library.get_ctx().new_dynamic_size() if max_theme_tokens else num_tokens * top_k
    new = themes.new_empty
    return (new(num_rows), gate.new_empty(num_rows), new((num_tokens, top_k)), new(num_themes * num_examples + 1))


def dispatch_setup_context(ctx, inputs, output):
    themes, _, session_offsets = inputs[:3]
    ctx.save_for_backward(output[2], session_offsets)
    ctx.num_sessions = themes.shape[0]


def dispatch_backward(ctx, g_gather_index, g_row_gate, g_inverse_index, g_theme_offsets):
    """The gate's gradient: g_gate[s, j] = sum of g_row_gate over the rows of (session s, choice j),
    summed in time order by the sort-based (deterministic) index_put_. No branch on the sizes:
    under torch.compile they are data-dependent."""
    inverse_index, session_offsets = ctx.saved_tensors
    num_tokens, top_k = inverse_index.shape
    kept = inverse_index >= 0
    g_token = torch.where(kept, g_row_gate[inverse_index.clamp_min(0)], 0)   # [T, top_k]
    tokens = torch.arange(num_tokens, device=session_offsets.device)
    # Tokens past the last session (never kept) are clamped to it: they add zeros.
    token_session = torch.searchsorted(session_offsets.contiguous(), tokens, right=True) - 1
    token_session = token_session.clamp_max(ctx.num_sessions - 1)
    g_gate = g_row_gate.new_zeros((ctx.num_sessions, top_k)).index_put_((token_session,), g_token, accumulate=True)
    return None, g_gate, None, None, None, None, None, None


_theme_dispatch_op.register_autograd(dispatch_backward, setup_context=dispatch_setup_context)
