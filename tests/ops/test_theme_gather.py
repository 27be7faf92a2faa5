"""theme_gather and theme_scatter: tokens copied to their theme rows (times the gate) and back.

Against the loop oracle (tests/oracles.py) in float64 over a real dispatch on awkward lengths,
gated and not: scatter with repeated indices, scatter as the adjoint of gather, gather exact in
every dtype; every kernel backend against the reference in fp32 / fp16 / bf16, rows spanning
whole chunks, and gather building the inverse index itself; the operator registration (opcheck)
and FLOP formulas; the row-block rule, its compiled configurations and each block against the
reference. Kernel outputs are poisoned before they run (tests/ops/conftest.py). Bad arguments,
strided views, rows past 2^31 elements: the tables at the end, run by test_contract.py; 4M tokens
and an output past 2^31 elements on the GPU: the tests marked gpu.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from mos_kernels.theme_gather import inverse_of, row_blocks
from tests import oracles
from tests.gpu_cases import GPU_DTYPES, needs_cuda, workload
from tests.input_cases import DIM, strided_gather_args
from tests.kernel_cases import (ALL_DTYPES, DTYPES, LENGTH_IDS, LENGTHS, SHAPES, assert_matches, backends,
                                check_forward_backward, compare_in_dtype, is_compiled, make_sessions, opcheck_inputs,
                                precision, random_themes, random_values, routed, skip_interpreted_bf16, upcast)
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



def test_flop_formulas_match_a_hand_count(device, kernel_backend):
    """Both registered operators (torch.ops.mos: Triton, torch.ops.mos_cuda: the CUDA extension, on
    the CPU its emulation): one multiply by the gate per element, nothing without a gate."""
    ops = kernel_ops(kernel_backend)
    dim, num_themes, top_k = 12, 3, 2
    sessions, values, _, themes = opcheck_inputs(device, dim, num_themes, top_k)
    dispatch = mk.theme_dispatch(themes, torch.rand(themes.shape, device=device), sessions.session_offsets,
                                 sessions.session_example, num_examples=4, num_themes=num_themes,
                                 backend="reference")
    rows = dispatch.gather_index.numel()
    for op, data in ((ops.theme_gather, values), (ops.theme_scatter, random_values(rows, dim, torch.float32, device))):
        with FlopCounterMode(display=False) as counter:
            op(data.detach(), dispatch.gather_index, dispatch.row_gate.detach(), dispatch.inverse_index)
        assert counter.get_total_flops() == rows * dim          # one multiply by the gate per element
        with FlopCounterMode(display=False) as counter:
            op(data.detach(), dispatch.gather_index, None, dispatch.inverse_index)
        assert counter.get_total_flops() == 0                   # pure data movement


# ---- row blocks: the rule, its compiled configurations, each choice against the reference ----

@pytest.mark.parametrize("dim,dtype,expected", [
    (64, torch.bfloat16, (128, 64, 8)), (256, torch.float32, (16, 256, 4)), (64, torch.float32, (64, 64, 4)),
    (16, torch.float16, (256, 16, 4)), (256, torch.bfloat16, (32, 256, 8)), (100, torch.float16, (64, 128, 8))])
def test_row_blocks(dim, dtype, expected):
    assert row_blocks(dim, dtype) == expected


def test_every_row_block_is_compiled():
    """~16 KB a program at most, powers of two, 32 tile elements a thread, and compile_check
    compiles exactly what the wrappers launch at every supported width."""
    for dtype in ALL_DTYPES:
        for dim in range(9, 257):
            block_r, block_d, warps = row_blocks(dim, dtype)
            assert block_r & (block_r - 1) == 0 and block_d >= dim
            assert block_r * block_d * dtype.itemsize <= 16384
            assert block_r * block_d <= 32 * 32 * warps
            wanted = {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": warps}
            for kernel, arg in (("_gather_rows", "out_ptr"), ("_scatter_rows", "out_ptr"), ("_row_dot", "a_ptr")):
                assert is_compiled(kernel, arg, dtype, wanted), (kernel, dtype, dim)


@pytest.mark.parametrize("dim", [16, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows", [0, 1, 300])
def test_gather_scatter_blocks(dim, dtype, num_rows, device):
    """Several programs and a partial last one at every width's rows per program (256, 128 and
    16-32 rows): gather and scatter with a gate, and both gradients."""
    num_tokens = 260
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, num_tokens, (num_rows,), generator=gen).to(device)
    inverse = inverse_of(index, num_tokens)
    inputs = {"values": random_values(num_tokens, dim, dtype, device),
              "gate": (torch.rand(num_rows, generator=gen) + 0.5).to(device=device, dtype=dtype)}
    rows = {"rows": random_values(num_rows, dim, dtype, device, seed=2), "gate": inputs["gate"]}
    for backend in ("triton", "reference"):
        assert mk.theme_gather(inputs["values"], index, inputs["gate"], inverse_index=inverse, backend=backend).shape \
            == (num_rows, dim)

    def gather(backend):
        return lambda values, gate: mk.theme_gather(values, index, gate, inverse_index=inverse, backend=backend)

    def scatter(backend):
        return lambda rows, gate: mk.theme_scatter(rows, index, gate, num_tokens=num_tokens, inverse_index=inverse,
                                                   backend=backend)
    compare_in_dtype(gather("triton"), gather("reference"), inputs, dtype, "reduction")
    compare_in_dtype(scatter("triton"), scatter("reference"), rows, dtype, "reduction")


# ---- at GPU scale (marked gpu: the GPU check selects them with -m gpu; skipped without CUDA) ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gather_scatter_large(dtype, kernel_backend):
    offsets, sessions, values, _ = workload(4_000_000, 128, 8, 2, dtype)
    themes = random_themes(sessions.num_sessions, 8, 2, "cuda")
    dispatch = mk.theme_dispatch(themes, torch.rand(themes.shape, device="cuda") + 0.5, sessions.session_offsets,
                                 sessions.session_example, num_examples=offsets.numel() - 1, num_themes=8)
    gate = dispatch.row_gate.to(dtype)
    rows = mk.theme_gather(values, dispatch.gather_index, gate, inverse_index=dispatch.inverse_index,
                           backend=kernel_backend)
    ref_rows = mk.theme_gather(values.float(), dispatch.gather_index, gate.float(), backend="reference")
    assert_close(rows.float(), ref_rows, "reduction", dtype=dtype)
    back = mk.theme_scatter(rows, dispatch.gather_index, gate, num_tokens=values.shape[0],
                            inverse_index=dispatch.inverse_index, backend=kernel_backend)
    ref_back = mk.theme_scatter(rows.float(), dispatch.gather_index, gate.float(), num_tokens=values.shape[0],
                                backend="reference")
    assert_close(back.float(), ref_back, "reduction", dtype=dtype)


# The gather's output holds WIDE_ROWS x WIDE_DIM = 2^31 + 8,192 elements (4.3 GB in fp16): its
# last rows lie past what 32-bit address arithmetic reaches. Every token is read twice.
WIDE_ROWS, WIDE_DIM = 8_388_640, 256


def check_gather_past(num_rows, dim, backend, device="cuda"):
    """theme_gather into num_rows x dim rows, then its backward (the scatter into the tokens'
    gradient and the gate's gradient, which read those rows back); checked on the last 64 rows
    against the reference on those rows. Returns nothing; asserts."""
    gen = torch.Generator(device=device).manual_seed(0)
    num_tokens = num_rows // 2
    values = torch.randn(num_tokens, dim, device=device, generator=gen).half().requires_grad_()
    gather_index = torch.randperm(num_rows, device=device, generator=gen) % num_tokens
    # Gates exact in fp16: the reference rounds the gate to the rows' dtype, the kernels do not.
    gate = (torch.randint(1, 8, (num_rows,), device=device, generator=gen) * 0.25).requires_grad_()
    inverse = inverse_of(gather_index, num_tokens)
    rows = mk.theme_gather(values, gather_index, gate, inverse_index=inverse, backend=backend)
    tail = slice(num_rows - 64, num_rows)
    index, tail_gate = gather_index[tail], gate.detach()[tail]
    assert torch.equal(rows[tail], mk.theme_gather(values.detach(), index, tail_gate, backend="reference"))
    cotangent = torch.randn(64, dim, device=device, generator=gen).half()
    (rows[tail].float() * cotangent.float()).sum().backward()
    rows_of = values.detach()[index].float()
    assert_close(gate.grad[tail], (cotangent.float() * rows_of).sum(1), "reduction")
    assert not gate.grad[:num_rows - 64].any()
    expected = torch.zeros(num_tokens, dim, device=device).index_add_(0, index, cotangent.float() * tail_gate[:, None])
    assert_close(values.grad.float(), expected, "reduction", dtype=torch.float16)


@pytest.mark.gpu
@needs_cuda
def test_gather_scatter_past_2_to_31_elements(kernel_backend):
    """Addresses past 2^31 elements, computed in 64 bits (on the CPU: ROWS_PAST_2_TO_31 below)."""
    check_gather_past(WIDE_ROWS, WIDE_DIM, kernel_backend)


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

def _scatter_with_inverse(inverse):
    """Three rows reading tokens 0, 1, 1 scattered back with a given inverse_index."""
    return mk.theme_scatter(torch.randn(3, DIM), torch.tensor([0, 1, 1]), num_tokens=2,
                            inverse_index=torch.tensor(inverse))


BAD_INPUT = {
    # name: (call, exception, argument named)
    "gather_index_out_of_range": (lambda: mk.theme_gather(torch.randn(3, DIM), torch.tensor([0, 3])), ValueError,
                                  "gather_index"),
    "gather_float_index": (lambda: mk.theme_gather(torch.randn(3, DIM), torch.tensor([0.0, 1.0])), TypeError,
                           "gather_index"),
    "gather_gate_count": (lambda: mk.theme_gather(torch.randn(3, DIM), torch.tensor([0, 1]), torch.ones(3)),
                          ValueError, "row_gate"),
    "gather_nan_values": (lambda: mk.theme_gather(torch.full((3, DIM), math.nan), torch.tensor([0])), ValueError,
                          "values"),
    "scatter_row_count": (lambda: mk.theme_scatter(torch.randn(3, DIM), torch.tensor([0, 1]), num_tokens=2),
                          ValueError, "gather_index"),
    "scatter_index_past_tokens": (lambda: mk.theme_scatter(torch.randn(2, DIM), torch.tensor([0, 2]), num_tokens=2),
                                  ValueError, "gather_index"),
    "gather_nan_gate": (lambda: mk.theme_gather(torch.randn(3, DIM), torch.tensor([0, 1]),
                                                torch.tensor([1.0, math.nan])), ValueError, "row_gate"),
    "scatter_float_num_tokens": (lambda: mk.theme_scatter(torch.randn(2, DIM), torch.tensor([0, 1]), num_tokens=2.0),
                                 TypeError, "num_tokens"),
    # inverse_index must be gather_index's inverse: the Triton scatter reads rows through it alone.
    "scatter_inverse_misses_a_row": (lambda: _scatter_with_inverse([[1, -1], [0, -1]]), ValueError, "inverse_index"),
    "scatter_inverse_past_rows": (lambda: _scatter_with_inverse([[7, -1], [1, 2]]), ValueError, "inverse_index"),
    "scatter_inverse_row_twice": (lambda: _scatter_with_inverse([[0, -1], [1, 1]]), ValueError, "inverse_index"),
    "scatter_inverse_wrong_token": (lambda: _scatter_with_inverse([[1, -1], [0, 2]]), ValueError, "inverse_index"),
    "gather_inverse_wrong_token": (lambda: mk.theme_gather(torch.randn(2, DIM), torch.tensor([0, 1, 1]),
                                                           inverse_index=torch.tensor([[1, -1], [0, 2]])),
                                   ValueError, "inverse_index"),
}


def _gather_case(device):
    values, gather_index, row_gate, inverse_index, _ = strided_gather_args(device, rows=False)

    def run(backend, values, gather_index, row_gate, inverse_index):
        return (mk.theme_gather(values, gather_index, row_gate, inverse_index=inverse_index, backend=backend),)
    return run, dict(values=values, gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index)


def _scatter_case(device):
    rows, gather_index, row_gate, inverse_index, num_tokens = strided_gather_args(device, rows=True)

    def run(backend, rows, gather_index, row_gate, inverse_index):
        return (mk.theme_scatter(rows, gather_index, row_gate, num_tokens=num_tokens, inverse_index=inverse_index,
                                 backend=backend),)
    return run, dict(rows=rows, gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index)


STRIDED_CASES = {"theme_gather": _gather_case, "theme_scatter": _scatter_case}


# Rows past 2^31 elements of a reserved input, read through an index.

def _read_rows(tokens, index, gate, backend):
    return mk.theme_gather(tokens, index, gate, backend=backend)


ROWS_PAST_2_TO_31 = {"theme_gather": _read_rows}
