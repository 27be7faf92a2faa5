"""theme_gather and theme_scatter: tokens copied to their theme rows (times the gate) and back.

Against the loop oracle (tests/oracles.py) in float64 over a real dispatch on awkward lengths,
gated and not: scatter with repeated indices, scatter as the adjoint of gather, gather exact in
every dtype; every kernel backend against the reference in fp32 / fp16 / bf16, rows spanning
whole chunks, and gather building the inverse index itself; and the operator registration
(opcheck). Kernel outputs are poisoned before they run (tests/ops/conftest.py). Bad arguments:
test_bad_input.py; strided views: test_hostile_inputs.py; row blocks: test_kernel_blocks.py;
rows past 2^31 elements: test_wide_addresses.py; 4M tokens on the GPU: test_kernels_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from tests import oracles
from tests.kernel_cases import (ALL_DTYPES, LENGTH_IDS, LENGTHS, SHAPES, assert_matches, backends,
                                check_forward_backward, make_sessions, opcheck_inputs, precision, random_themes,
                                random_values, routed, skip_interpreted_bf16, upcast)
from tests.oracles import generator, randn
from tests.tolerances import assert_close


# ---- against the loop oracle ------------------------------------------------------------------

def routed_index(lengths, gen, top_k, max_theme_tokens, device):
    """gather_index, row_gate and T of a real dispatch (K = 3) over `lengths`."""
    d = routed(lengths, gen, top_k, max_theme_tokens, device)
    return d.gather_index, d.row_gate.detach(), sum(lengths)


@pytest.mark.parametrize("backend", backends("theme_gather"))
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 3)])
@pytest.mark.parametrize("gated", [False, True])
def test_theme_gather_scatter_match_oracle(lengths, top_k, max_theme_tokens, gated, backend, device):
    """gather and scatter, forward and backward (values/rows and the gate)."""
    gen = generator(10 + top_k)
    dtype, kind = precision(backend)
    index, gate, total = routed_index(lengths, gen, top_k, max_theme_tokens, device)
    gate = gate.to(dtype)
    values = randn(gen, total, 5, dtype=dtype, device=device)
    rows = randn(gen, index.numel(), 5, dtype=dtype, device=device)
    if gated:
        check_forward_backward(lambda values, gate: mk.theme_gather(values, index, gate, backend=backend),
                               lambda values, gate: oracles.theme_gather(values, index, gate),
                               {"values": values, "gate": gate}, kind=kind, grad_kind=kind, gen=gen)
        check_forward_backward(
            lambda rows, gate: mk.theme_scatter(rows, index, gate, num_tokens=total, backend=backend),
            lambda rows, gate: oracles.theme_scatter(rows, index, gate, total),
            {"rows": rows, "gate": gate}, kind=kind, grad_kind=kind, gen=gen)
    else:
        check_forward_backward(lambda values: mk.theme_gather(values, index, backend=backend),
                               lambda values: oracles.theme_gather(values, index),
                               {"values": values}, kind=kind, grad_kind=kind, gen=gen)
        check_forward_backward(lambda rows: mk.theme_scatter(rows, index, num_tokens=total, backend=backend),
                               lambda rows: oracles.theme_scatter(rows, index, None, total),
                               {"rows": rows}, kind=kind, grad_kind=kind, gen=gen)


@pytest.mark.parametrize("backend", backends("theme_scatter"))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theme_scatter_repeated_index_matches_oracle(seed, backend, device):
    """Scatter with arbitrary repeats (many rows to one token, tokens with none) sums them."""
    gen = generator(seed)
    dtype, kind = precision(backend)
    index = torch.randint(0, 7, (23,), generator=gen).to(device)
    check_forward_backward(
        lambda rows, gate: mk.theme_scatter(rows, index, gate, num_tokens=11, backend=backend),
        lambda rows, gate: oracles.theme_scatter(rows, index, gate, 11),
        {"rows": randn(gen, 23, 3, dtype=dtype, device=device), "gate": randn(gen, 23, dtype=dtype, device=device)},
        kind=kind, grad_kind=kind, gen=gen)


@pytest.mark.parametrize("backend", backends("theme_scatter"))
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 1)])
def test_theme_scatter_is_adjoint_of_gather(top_k, max_theme_tokens, backend, device):
    """<gather(x), y> == <x, scatter(y)> with the same index and gate."""
    gen = generator(11)
    dtype, kind = precision(backend)
    index, gate, total = routed_index([4, 0, 9, 1], gen, top_k, max_theme_tokens, device)
    x, y = randn(gen, total, 6, dtype=dtype, device=device), randn(gen, index.numel(), 6, dtype=dtype, device=device)
    lhs = (mk.theme_gather(x, index, gate.to(dtype), backend=backend).double() * y.double()).sum()
    rhs = (x.double() * mk.theme_scatter(y, index, gate.to(dtype), num_tokens=total, backend=backend).double()).sum()
    assert_close(lhs, rhs, kind, dtype=dtype)


@pytest.mark.parametrize("backend", backends("theme_gather"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_theme_gather_is_exact(dtype, backend, device):
    """Gathering without a gate (and with a gate of ones) moves bits, in every float dtype."""
    gen = generator(12)
    index, _, total = routed_index([5, 0, 8], gen, 2, None, device)
    values = randn(gen, total, 4, dtype=dtype, device=device)
    expected = oracles.theme_gather(values.cpu(), index.cpu())
    assert_matches(mk.theme_gather(values, index, backend=backend), expected, "exact")
    ones = torch.ones(index.numel(), dtype=dtype, device=device)
    assert_matches(mk.theme_gather(values, index, ones, backend=backend), expected, "exact")



# ---- kernel backends against the reference ----------------------------------------------------

def _dispatch_for(lengths, session_len, num_themes, top_k, device, max_theme_tokens=None):
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, device=device) + 0.5
    return mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                             num_examples=len(lengths), num_themes=num_themes, max_theme_tokens=max_theme_tokens,
                             backend="reference")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("top_k,max_theme_tokens,gated",
                         [(1, None, True), (2, None, True), (2, 3, True), (1, None, False)])
def test_gather_and_scatter(shape, dtype, op, top_k, max_theme_tokens, gated, device, kernel_backend):
    skip_interpreted_bf16(kernel_backend, dtype)
    lengths, session_len = SHAPES[shape]
    dispatch = _dispatch_for(lengths, session_len, 3, top_k, device, max_theme_tokens)
    num_tokens, dim = dispatch.inverse_index.shape[0], 19
    num_in = num_tokens if op == "gather" else dispatch.gather_index.numel()
    num_out = dispatch.gather_index.numel() if op == "gather" else num_tokens
    data = random_values(num_in, dim, dtype, device).requires_grad_()
    gate = dispatch.row_gate.to(dtype).detach().requires_grad_() if gated else None
    # Weights representable in `dtype`: the kernel's incoming gradient is then exactly the oracle's,
    # and every result differs from the fp32 oracle by one final rounding at most.
    weight = random_values(num_out, dim, dtype, device, seed=7).float()

    def run(backend, data, gate):
        index, inverse = dispatch.gather_index, dispatch.inverse_index
        if op == "gather":
            out = mk.theme_gather(data, index, gate, inverse_index=inverse, backend=backend)
        else:
            out = mk.theme_scatter(data, index, gate, num_tokens=num_tokens, inverse_index=inverse, backend=backend)
        (out.float() * weight).sum().backward()
        return out

    ref_data, ref_gate = upcast(data), (upcast(gate) if gated else None)
    expected = run("reference", ref_data, ref_gate)
    out = run(kernel_backend, data, gate)
    # A plain gather moves data; everything else rounds once to `dtype`.
    assert_close(out.float(), expected, "exact" if (op == "gather" and not gated) else "reduction", dtype=dtype)
    assert_close(data.grad.float(), ref_data.grad, "reduction", dtype=dtype)
    if gated:
        assert_close(gate.grad.float(), ref_gate.grad, "reduction", dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_gather_and_scatter_whole_chunks(dtype, op, device, kernel_backend):
    """d = 32: every row splits into whole 16-byte chunks (the CUDA kernels' vector path; the
    awkward-shape test above uses d = 19, the element path)."""
    skip_interpreted_bf16(kernel_backend, dtype)
    dispatch = _dispatch_for([13, 7, 29, 2], 3, 3, 2, device)
    num_tokens = dispatch.inverse_index.shape[0]
    index, inverse, gate = dispatch.gather_index, dispatch.inverse_index, dispatch.row_gate.to(dtype)
    data = random_values(num_tokens if op == "gather" else index.numel(), 32, dtype, device)
    kwargs = dict(inverse_index=inverse)
    if op == "gather":
        out = mk.theme_gather(data, index, gate, backend=kernel_backend, **kwargs)
        want = mk.theme_gather(data.float(), index, gate.float(), backend="reference")
    else:
        out = mk.theme_scatter(data, index, gate, num_tokens=num_tokens, backend=kernel_backend, **kwargs)
        want = mk.theme_scatter(data.float(), index, gate.float(), num_tokens=num_tokens, backend="reference")
    assert_close(out.float(), want, "reduction", dtype=dtype)


def test_gather_without_inverse_builds_it(device, kernel_backend):
    """Without inverse_index a kernel backend builds one (a documented sync) and gives the same result."""
    values = random_values(11, 8, torch.float32, device).requires_grad_()
    index = torch.tensor([3, 3, 0, 10, 3, 5], device=device)
    out = mk.theme_gather(values, index, backend=kernel_backend)
    assert torch.equal(out, values.detach()[index])
    out.sum().backward()
    assert values.grad[:, 0].tolist() == [1, 0, 0, 3, 0, 1, 0, 0, 0, 0, 1]



# ---- operator registration --------------------------------------------------------------------

@pytest.mark.parametrize("gated", [True, False])
def test_opcheck_gather_scatter(gated, device, kernel_backend):
    ops = kernel_ops(kernel_backend)
    sessions, values, _, themes = opcheck_inputs(device)
    gate = torch.rand(themes.shape, device=device)
    dispatch = mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                                 num_examples=4, num_themes=3, backend="reference")
    row_gate = dispatch.row_gate.detach().requires_grad_() if gated else None
    index, inverse = dispatch.gather_index, dispatch.inverse_index
    torch.library.opcheck(ops.theme_gather.default, (values, index, row_gate, inverse))
    rows = random_values(index.numel(), values.shape[1], torch.float32, device).requires_grad_()
    torch.library.opcheck(ops.theme_scatter.default, (rows, index, row_gate, inverse))

