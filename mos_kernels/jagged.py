"""Jagged-layout helpers: values [N, ...] + offsets [G+1] (int64).

Segment g owns rows offsets[g]:offsets[g+1]. Everything here is vectorised (no Python loop
over segments) and works on CPU and CUDA tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .checks import check_count, check_offsets, check_tensor, reads_data


# Each takes check=False where its offsets were checked where they came in (or built by the
# caller): the ops and the layer call them in backwards and hot loops, where a data check would be
# a device sync that `data_checks(False)` no longer covers (a backward runs after the layer returned).

def lengths_from_offsets(offsets: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """[G] int64 segment lengths from offsets [G+1] int64 (from 0, non-decreasing: a data check).
    Raises ValueError / TypeError naming `offsets` (with check)."""
    if check:
        check_offsets("offsets", offsets)
    return offsets[1:] - offsets[:-1]


def offsets_from_lengths(lengths: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """[G+1] int64 offsets (from 0) from lengths [G] of any integer dtype, each >= 0 (a data check).
    Raises ValueError / TypeError naming `lengths` (with check)."""
    if check:
        check_tensor("lengths", lengths, ndim=1)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths: expected an integer tensor, got {str(lengths.dtype).replace('torch.', '')}")
        if reads_data() and lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"lengths: expected non-negative lengths, got {int(lengths.min())}")
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), 0, out=out[1:])
    return out


def segment_ids(offsets: torch.Tensor, total: Optional[int] = None, *, check: bool = True) -> torch.Tensor:
    """The segment of every row: [N] int64, from offsets [G+1] int64 (checked as
    `lengths_from_offsets`' and, given `total`, offsets[-1] == total). `total` (= offsets[-1])
    avoids a device sync. Raises ValueError / TypeError naming `offsets` (with check)."""
    if check:
        check_offsets("offsets", offsets, total=total if isinstance(total, int) else None)
    lengths = offsets[1:] - offsets[:-1]
    ids = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def positions_in_segment(offsets: torch.Tensor, total: Optional[int] = None, *, check: bool = True) -> torch.Tensor:
    """Index of every row inside its segment (0 for the first row of each): [N] int64; offsets
    checked as `segment_ids`' (with check)."""
    seg = segment_ids(offsets, total, check=check)
    return torch.arange(seg.numel(), device=offsets.device) - offsets[seg]


def counts_of(index: torch.Tensor, size: int) -> torch.Tensor:
    """[size] int64 occurrences of each value 0..size-1 in `index` (values must lie in that range):
    torch.bincount(index, minlength=size) with an output size known up front, which torch.compile
    can trace (bincount's size depends on the data)."""
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(0, index, torch.ones_like(index))


def max_segment_length(offsets: torch.Tensor) -> int:
    """The longest segment. Reads a number back from the device: pass a known bound where you can."""
    if offsets.numel() < 2:
        return 0
    return int(lengths_from_offsets(offsets, check=False).max())


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int,
                     padding_value: float = 0.0) -> torch.Tensor:
    """[N, *rest] + offsets [G+1] -> [G, max_len, *rest]; rows past max_len are an error."""
    check_tensor("values", values)
    check_offsets("offsets", offsets, total=values.shape[0], device=values.device)
    check_count("max_len", max_len, minimum=0)
    num = offsets.numel() - 1
    out = values.new_full((num, max_len) + tuple(values.shape[1:]), padding_value)
    pos = positions_in_segment(offsets, values.shape[0], check=False)
    if reads_data() and values.shape[0] and int(pos.max()) >= max_len:
        raise ValueError(f"max_len: expected at least the longest segment ({int(pos.max()) + 1}), got {max_len}")
    out[segment_ids(offsets, values.shape[0], check=False), pos] = values
    return out


def padded_to_jagged(padded: torch.Tensor, lengths: torch.Tensor):
    """[G, L, *rest] + lengths [G] -> (values [sum(lengths), *rest], offsets [G+1])."""
    check_tensor("padded", padded)
    if padded.dim() < 2:
        raise ValueError(f"padded: expected at least 2 dimensions [G, L, ...], got shape {tuple(padded.shape)}")
    check_tensor("lengths", lengths, ndim=1, device=padded.device)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer tensor, got {lengths.dtype}")
    if lengths.numel() != padded.shape[0]:
        raise ValueError(f"lengths: expected {padded.shape[0]} entries (one per row of padded), got {lengths.numel()}")
    if reads_data() and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > padded.shape[1]:
            raise ValueError(f"lengths: expected values in [0, {padded.shape[1]}], got min {lo}, max {hi}")
    mask = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    return padded[mask], offsets_from_lengths(lengths, check=False)


def expert_offsets(segment_offsets: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E+1] int64: expert e's contiguous block of rows in a layout whose segments are ordered
    expert-major (segment e*B + b is example b of expert e, as `theme_dispatch` builds them), from
    segment_offsets [E*B+1]. With no examples every block is empty."""
    num_examples = (segment_offsets.numel() - 1) // num_experts
    if num_examples == 0:
        return segment_offsets.new_zeros(num_experts + 1)
    return segment_offsets[::num_examples]


def segment_blocks(offsets: torch.Tensor, block: int, num_rows: int):
    """The `block`-row tiles that cover every segment, for kernels with one program per tile.

    Returns (segment [n], start row [n]) int64 with n = ceil(num_rows / block) + G, a bound on
    the tile count known without reading the offsets back (sum of ceil(len_g / block) <=
    num_rows / block + G). Tile i of the real ones belongs to `segment[i]` and starts at
    `start[i]`; the spare tiles at the end have segment == G and must do nothing.
    """
    num_segments = offsets.numel() - 1
    bound = (num_rows + block - 1) // block + num_segments
    tiles = torch.arange(bound, device=offsets.device)
    if num_segments == 0:
        return tiles, tiles
    tile_offsets = offsets_from_lengths((lengths_from_offsets(offsets, check=False) + block - 1) // block, check=False)
    segment = torch.searchsorted(tile_offsets[1:], tiles, right=True)
    owner = segment.clamp_max(num_segments - 1)
    start = offsets[owner] + (tiles - tile_offsets[owner]) * block
    return segment, start
