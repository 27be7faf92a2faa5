"""The interpreter's vectorised scan (tests/interpreter_scan.py, installed by conftest.py) gives
the original element-by-element scan's results bit for bit: a kernel scanning a [8, 4, 2] tile
with the selective scan's (non-commutative) combine, forward and reverse, along every axis."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the interpreter's scan (TRITON_INTERPRET=1)", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from mos_kernels.selective_scan_kernels import _combine  # noqa: E402
from tests import interpreter_scan  # noqa: E402
from tests.interpreter_scan import vectorised_generic_scan  # noqa: E402

interpreter_scan.install()          # (conftest did already; the original is kept aside)
_ORIGINAL = interpreter_scan.ORIGINAL


@triton.jit
def _scan_tile(a_ptr, b_ptr, h_ptr, AXIS: tl.constexpr, REVERSE: tl.constexpr):
    at = (tl.arange(0, 8)[:, None, None] * 8 + tl.arange(0, 4)[None, :, None] * 2
          + tl.arange(0, 2)[None, None, :])
    _, h = tl.associative_scan((tl.load(a_ptr + at), tl.load(b_ptr + at)), AXIS, _combine, reverse=REVERSE)
    tl.store(h_ptr + at, h)


def _run(scan, a, b, axis, reverse):
    interpreter.ScanOps.generic_scan = scan
    try:
        h = torch.empty_like(a)
        _scan_tile[(1,)](a, b, h, AXIS=axis, REVERSE=reverse)
        return h
    finally:
        interpreter.ScanOps.generic_scan = vectorised_generic_scan


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_vectorised_scan_equals_the_interpreter_s_own(axis, reverse):
    gen = torch.Generator().manual_seed(axis + 3 * reverse)
    a = torch.rand(8, 4, 2, generator=gen) * 1.5 + 0.01
    b = torch.randn(8, 4, 2, generator=gen)
    vectorised = _run(vectorised_generic_scan, a, b, axis, reverse)
    assert torch.equal(vectorised, _run(_ORIGINAL, a, b, axis, reverse))
    # It is the recurrence the kernels rely on: h_t = a_t h_{t-1} + b_t along the axis (from the
    # end with reverse).
    h, av, bv = (x.movedim(axis, 0) for x in (vectorised, a, b))
    state = None
    for t in (range(av.shape[0] - 1, -1, -1) if reverse else range(av.shape[0])):
        state = bv[t] if state is None else av[t] * state + bv[t]
        torch.testing.assert_close(h[t], state)
