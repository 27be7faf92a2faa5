"""`sessionize`: cut every jagged sequence into sessions, the first step of the layer.

Integer-only, so it has no backward. The number of sessions S depends on the data, so this
op reads one size back from the device (`nonzero`); it is the documented sync of the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .checks import check_choice, check_count, check_offsets, check_positive, check_tensor, reads_data
from .jagged import counts_of, lengths_from_offsets, offsets_from_lengths, segment_ids


@dataclass
class Sessions:
    session_offsets: torch.Tensor          # [S+1] int64 over token rows
    session_example: torch.Tensor          # [S] int64, the example each session belongs to
    example_session_offsets: torch.Tensor  # [B+1] int64, example b owns sessions [o[b], o[b+1])

    @property
    def num_sessions(self) -> int:
        return self.session_example.numel()


# Unsigned types wider than 8 bits have few CPU ops in torch; an event time fits int64.
TIMESTAMP_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.float64, torch.float32,
                    torch.bfloat16, torch.float16)
# int64 times are subtracted in int64: within +-2^62 every difference fits.
MAX_INT_TIME = 2 ** 62


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_time_range(timestamps: torch.Tensor, gap_seconds: float) -> None:
    """Times that the gap rule can read: int64 within +-2^62 (a wider span would wrap its step to a
    negative gap), and floats whose spacing at their size is finer than gap_seconds (bfloat16
    epoch seconds are ~8 million seconds apart: every session would merge)."""
    times = timestamps.detach()
    largest = max(abs(float(times.min())), abs(float(times.max())))   # abs(-2^63) wraps in int64
    if not timestamps.is_floating_point():
        if largest > MAX_INT_TIME:
            raise ValueError(f"timestamps: expected times within +-2^62 (their differences must fit in int64), "
                             f"got one of magnitude {largest:.3g}")
        return
    spacing = torch.finfo(timestamps.dtype).eps * largest
    if spacing > gap_seconds:
        raise ValueError(f"timestamps: {_name(timestamps.dtype)} tells times near {largest:.3g} apart only to "
                         f"~{spacing:.3g} s, coarser than gap_seconds={gap_seconds:g}; pass int64 or float64 seconds")


def sessionize(offsets: torch.Tensor, *, mode: str = "fixed", session_len: int = 8,
               timestamps: Optional[torch.Tensor] = None, gap_seconds: float = 1800.0,
               max_session_len: int = 64, num_tokens: Optional[int] = None) -> Sessions:
    """Session boundaries of every example.

    mode="fixed": chunks of `session_len` items aligned to the newest item (the newest session
    is full, the oldest may be shorter), so the short-term expert always sees whole sessions.
    mode="gap": a session starts where the time since the previous event exceeds `gap_seconds`;
    sessions longer than `max_session_len` are split into chunks from their start.
    Empty sequences have no sessions. num_tokens: T (= offsets[-1]); pass it to avoid reading it
    back from the device (and so that torch.compile sees a size, not a data-dependent value).
    """
    check_choice("mode", mode, ("fixed", "gap"))
    if num_tokens is not None:
        check_count("num_tokens", num_tokens, minimum=0)
    check_offsets("offsets", offsets, total=num_tokens)
    total = int(offsets[-1]) if num_tokens is None else num_tokens
    num_examples = offsets.numel() - 1
    example = segment_ids(offsets, total, check=False)
    pos = torch.arange(total, device=offsets.device) - offsets[example]
    if mode == "fixed":
        check_count("session_len", session_len)
        length = lengths_from_offsets(offsets, check=False)[example]
        starts = (pos == 0) | ((length - pos) % session_len == 0)
    else:
        check_positive("gap_seconds", gap_seconds)
        check_count("max_session_len", max_session_len)
        if timestamps is None:
            raise ValueError("timestamps: expected a [T] tensor of event times for mode='gap', got None")
        check_tensor("timestamps", timestamps, ndim=1, device=offsets.device)
        if timestamps.dtype not in TIMESTAMP_DTYPES:
            raise TypeError(f"timestamps: expected one of ({', '.join(_name(d) for d in TIMESTAMP_DTYPES)}), got "
                            f"{_name(timestamps.dtype)}")
        if timestamps.numel() != total:
            raise ValueError(f"timestamps: expected {total} entries (one per token), got {timestamps.numel()}")
        if reads_data() and timestamps.is_floating_point() and timestamps.numel() and not bool(
                torch.isfinite(timestamps).all()):
            # NaN compares false both ways (no gap, no step back); inf is what float16 makes of
            # epoch seconds: either would cut sessions wrongly without a word.
            raise ValueError(f"timestamps: expected finite times, got NaN or inf (dtype "
                             f"{str(timestamps.dtype).replace('torch.', '')}; epoch seconds need int64 or float64)")
        if reads_data() and timestamps.numel():
            _check_time_range(timestamps, gap_seconds)
        # Compared, not subtracted: an unsigned step back in time would wrap to a large gap.
        back = torch.zeros(total, dtype=torch.bool, device=offsets.device)
        back[1:] = timestamps[1:] < timestamps[:-1]
        back &= pos > 0
        step = torch.zeros(total, dtype=torch.float64 if timestamps.is_floating_point() else torch.int64,
                           device=offsets.device)
        step[1:] = timestamps[1:].to(step.dtype) - timestamps[:-1].to(step.dtype)
        if reads_data() and bool(back.any()):
            row = int(torch.nonzero(back)[0])
            raise ValueError(
                f"timestamps: expected non-decreasing times inside each sequence, got a step back at row "
                f"{row} (example {int(example[row])}): {timestamps[row - 1].item()} -> {timestamps[row].item()}")
        gap_start = (pos == 0) | (step > gap_seconds)
        # Split long gap-sessions into max_session_len chunks counted from each session's start.
        gap_id = torch.cumsum(gap_start.to(torch.int64), 0) - 1
        first_row = torch.nonzero(gap_start).squeeze(1)
        in_session = torch.arange(total, device=offsets.device) - first_row[gap_id]
        starts = in_session % max_session_len == 0
    start_rows = torch.nonzero(starts).squeeze(1)
    session_offsets = torch.cat([start_rows, offsets.new_tensor([total])])
    session_example = example[start_rows]
    per_example = counts_of(session_example, num_examples)
    return Sessions(session_offsets, session_example, offsets_from_lengths(per_example, check=False))
