"""`kernel_op`: how every Triton kernel is registered as a custom op, with dense inputs.

The kernels index their tensor arguments as dense row-major arrays (element (i, j) of an
[N, d] tensor at i * d + j; a 1-D index tensor at i). A strided view (a column of a wider
matrix, a transposed weight, an expanded gate, a slice with a step) read that way yields other
elements: wrong numbers, or addresses out of bounds. So the custom op's entry makes every tensor
argument dense before the kernel sees it, forward and backward alike (autograd hands backward
ops gradients of any layout): a dense tensor passes as it is, a strided one is copied once.
Arguments named in `row_strided` are kernels' operands that take a row stride; they are only
made dense when their columns are not contiguous.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable

import torch


def _dense(value, row_strided: bool):
    if not isinstance(value, torch.Tensor):
        return value
    if row_strided and value.dim() == 2 and value.stride(1) == 1:
        return value
    return value.contiguous()


def kernel_op(name: str, *, row_strided: Iterable[str] = ()) -> Callable:
    """`torch.library.custom_op(name, mutates_args=())` for a function whose tensor arguments
    are made dense first (see the module docstring)."""
    row_strided = frozenset(row_strided)

    def register(fn):
        # The schema comes from `fn` itself: its annotations are evaluated in its own module.
        schema = torch.library.infer_schema(fn, mutates_args=())
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def dense_inputs(*args, **kwargs):
            args = [_dense(a, n in row_strided) for n, a in zip(names, args)]
            kwargs = {n: _dense(a, n in row_strided) for n, a in kwargs.items()}
            return fn(*args, **kwargs)

        return torch.library.custom_op(name, dense_inputs, mutates_args=(), schema=schema)

    return register
