"""A faster `tl.associative_scan` for Triton's interpreter, installed by conftest.py.

Triton 3.6's interpreter runs a scan whose combine function is not a plain sum or product
element by element: one Python call of the combine function per element of the tile. The
selective scan's kernels scan [CHUNK, BLOCK_D, BLOCK_S] tiles, so a layer test of Mamba4Rec on
the Triton backend spent minutes there. `vectorised_generic_scan` walks the scan axis only and
combines whole slices: the same combine function, applied in the same order to the same
float32 values, so every element gets the same result bit for bit
(tests/test_interpreter_scan.py checks it against the original).
"""
from __future__ import annotations

import numpy as np

ORIGINAL = None     # the interpreter's own generic_scan, once install() has replaced it


def vectorised_generic_scan(self, input):
    """ScanOps.generic_scan, one combine call per position along the axis instead of per element."""
    axis = self.axis
    data = [arg.handle.data for arg in input]
    outputs = [np.empty_like(d) for d in data]

    def at(position):
        index = [slice(None)] * data[0].ndim
        index[axis] = slice(position, position + 1)
        return tuple(index)

    acc = [self.to_tensor(d[at(0)], arg.dtype) for d, arg in zip(data, input)]
    for out, value in zip(outputs, acc):
        out[at(0)] = value.handle.data
    for position in range(1, data[0].shape[axis]):
        current = [self.to_tensor(d[at(position)], arg.dtype) for d, arg in zip(data, input)]
        combined = self.combine_fn.fn(*acc, *current)
        for out, value in zip(outputs, combined if isinstance(combined, tuple) else (combined,)):
            out[at(position)] = value.handle.data if hasattr(value, "handle") else value
        # As the original: the carry is read back from the outputs, in the inputs' dtypes.
        acc = [self.to_tensor(out[at(position)], arg.dtype) for out, arg in zip(outputs, input)]
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outputs, input)]


def install() -> None:
    """Replace the interpreter's element-by-element generic scan (Triton's interpreter only)."""
    global ORIGINAL
    from triton.runtime import interpreter

    if ORIGINAL is None:
        ORIGINAL = interpreter.ScanOps.generic_scan
    interpreter.ScanOps.generic_scan = vectorised_generic_scan
