"""Output allocation for the kernels, with an optional poison fill for tests.

With poisoning on, every output a kernel is meant to write completely starts as NaN (floats)
or a sentinel (ints), so an element the kernel forgot to write fails the comparison with the
reference instead of passing by luck with whatever the allocator returned.
"""
from __future__ import annotations

import contextlib
import os

import torch

INT_POISON = -7_777_777
_poison = os.environ.get("MOS_POISON_OUTPUTS", "0") == "1"


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def new_output(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out
