"""What the tensor-core kernels share (grouped_linear and both attention ops): the first loads
of a program over one segment of a jagged layout.

The @triton.jit helpers are inlined into their callers: the compiled code is the one the
callers had with the lines written out.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_bounds(offsets_ptr, segment):
    """(first row, end row) of `segment`: offsets[segment], offsets[segment + 1]."""
    return tl.load(offsets_ptr + segment), tl.load(offsets_ptr + segment + 1)
