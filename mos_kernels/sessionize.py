"""`sessionize`: cut every jagged sequence into sessions, the first step of the layer.

Integer-only, so it has no backward. The number of sessions S depends on the data, so this
op reads one size back from the device (`nonzero`); it is the documented sync of the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .checks import check_choice, check_offsets, check_positive, check_tensor, reads_data
from .jagged import counts_of, lengths_from_offsets, offsets_from_lengths, segment_ids


@dataclass
class Sessions:
    session_offsets: torch.Tensor          # [S+1] int64 over token rows
    session_example: torch.Tensor          # [S] int64, the example each session belongs to
    example_session_offsets: torch.Tensor  # [B+1] int64, example b owns sessions [o[b], o[b+1])

    @property
    def num_sessions(self) -> int:
        return self.session_example.numel()


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
    check_offsets("offsets", offsets, total=num_tokens)
    total = int(offsets[-1]) if num_tokens is None else num_tokens
    num_examples = offsets.numel() - 1
    example = segment_ids(offsets, total)
    pos = torch.arange(total, device=offsets.device) - offsets[example]
    if mode == "fixed":
        check_positive("session_len", session_len)
        length = lengths_from_offsets(offsets)[example]
        starts = (pos == 0) | ((length - pos) % session_len == 0)
    else:
        check_positive("gap_seconds", gap_seconds)
        check_positive("max_session_len", max_session_len)
        if timestamps is None:
            raise ValueError("timestamps: expected a [T] tensor of event times for mode='gap', got None")
        check_tensor("timestamps", timestamps, ndim=1, device=offsets.device)
        if timestamps.dtype == torch.bool or timestamps.is_complex():
            raise TypeError(f"timestamps: expected an integer or floating dtype, got "
                            f"{str(timestamps.dtype).replace('torch.', '')}")
        if timestamps.numel() != total:
            raise ValueError(f"timestamps: expected {total} entries (one per token), got {timestamps.numel()}")
        if reads_data() and timestamps.is_floating_point() and timestamps.numel() and not bool(
                torch.isfinite(timestamps).all()):
            # NaN compares false both ways (no gap, no step back); inf is what float16 makes of
            # epoch seconds: either would cut sessions wrongly without a word.
            raise ValueError(f"timestamps: expected finite times, got NaN or inf (dtype "
                             f"{str(timestamps.dtype).replace('torch.', '')}; epoch seconds need int64 or float64)")
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
    return Sessions(session_offsets, session_example, offsets_from_lengths(per_example))
