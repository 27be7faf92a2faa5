"""What the tensor-core kernels share: the tl.dot precision of a dtype (grouped_linear and both
attention ops) and the first loads of a program over one segment of a jagged layout.

The @triton.jit helpers are inlined into their callers: the compiled code is the one the
callers had with the lines written out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot precision of fp32 inputs: "tf32x3" (three TF32 products, fp32 accuracy on the
    tensor cores; plain TF32 would miss the fp32 tolerances, and "ieee" runs on the FMA units and
    compiles several times slower). fp16/bf16 inputs multiply natively whatever this says."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def segment_bounds(offsets_ptr, segment):
    """(first row, end row) of `segment`: offsets[segment], offsets[segment + 1]."""
    return tl.load(offsets_ptr + segment), tl.load(offsets_ptr + segment + 1)
