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
    """Poison the outputs of every kernel backend: the Triton ops read `_poison`, the C++
    operators (csrc/mos/checks.h: new_output) the environment variable."""
    global _poison
    previous, _poison = _poison, enabled
    previous_env = os.environ.get("MOS_POISON_OUTPUTS")
    os.environ["MOS_POISON_OUTPUTS"] = "1" if enabled else "0"
    try:
        yield
    finally:
        _poison = previous
        if previous_env is None:
            del os.environ["MOS_POISON_OUTPUTS"]
        else:
            os.environ["MOS_POISON_OUTPUTS"] = previous_env


def new_output(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out
