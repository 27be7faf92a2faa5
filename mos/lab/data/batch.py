"""The batch every model consumes: jagged histories plus one target per example."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Batch:
    """B examples. Histories are jagged: example b owns rows offsets[b]:offsets[b+1], oldest first."""

    item_ids: torch.Tensor          # [T] int64
    category_ids: torch.Tensor      # [T] int64
    timestamps: torch.Tensor        # [T] int64 seconds, non-decreasing inside each example
    offsets: torch.Tensor           # [B+1] int64
    max_len: int                    # longest history in the batch (Python int: no device sync)
    target_item: torch.Tensor       # [B] int64
    target_category: torch.Tensor   # [B] int64
    label: torch.Tensor             # [B] float32 in {0, 1}
    user: torch.Tensor              # [B] int64, for GAUC
    true_interest: Optional[torch.Tensor] = None  # [T] int64 latent interest of each event (synthetic only; -1 = noise)

    @property
    def size(self) -> int:
        return self.offsets.numel() - 1

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return replace(self, **moved)
