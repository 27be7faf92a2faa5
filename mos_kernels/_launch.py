"""What the op modules compute on the host to launch a Triton kernel, in plain Python.

The op modules import no triton: their kernels sit in `<op>_kernels` modules, imported where a
launch needs them, so that the reference backend runs where triton is not installed.
"""
from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0 (triton.cdiv)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, 0 for n = 0 (triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot precision of fp32 inputs: "tf32x3" (three TF32 products, fp32 accuracy on the
    tensor cores; plain TF32 would miss the fp32 tolerances, and "ieee" runs on the FMA units and
    compiles several times slower). fp16/bf16 inputs multiply natively whatever this says."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
