"""grouped_linear: one linear map per expert over its block of rows, against the loop oracle
(tests/oracles.py) on awkward blocks (empty experts first, in the middle and last, one row,
prime sizes), forward and backward, with and without bias, and its max_rows bound. Kernel outputs
are poisoned before they run (tests/ops/conftest.py). The Triton kernel against the reference in
fp32 / fp16 / bf16, its opcheck and FLOP formula. Bad arguments and strided views: the tables
at the end, run by test_contract.py; the target point on the GPU: the tests marked gpu.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from tests import oracles
from tests.gpu_cases import (GPU_DTYPES, RELATIVE_ERROR, cotangent, needs_cuda, relative_error, rounded_leaves,
                             theme_layout)
from tests.input_cases import DIM, NUM_THEMES, STRIDED_DIM, strided_gather_args, strided_layout
from tests.kernel_cases import (DTYPES, backends, check_forward_backward, compare_to_reference, precision,
                                random_values)
from tests.oracles import generator, randn
from tests.tolerances import assert_close


GROUP_BLOCKS = [[0], [5], [13], [0, 4, 0], [3, 0, 7, 1, 0], [2, 2, 2], [0, 0, 0]]


@pytest.mark.parametrize("backend", backends("grouped_linear"))
@pytest.mark.parametrize("blocks", GROUP_BLOCKS, ids=str)
@pytest.mark.parametrize("d_in,d_out", [(3, 5), (7, 2), (1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_linear_matches_oracle(blocks, d_in, d_out, with_bias, backend, device):
    """Each expert's block times its own weight (+ bias), forward and backward (float64 on the
    reference, fp32 on the kernels)."""
    gen = generator(sum(blocks) + d_in)
    dtype, kind = precision(backend)
    num_experts = len(blocks)
    inputs = {"x": randn(gen, sum(blocks), d_in, dtype=dtype, device=device),
              "weight": randn(gen, num_experts, d_in, d_out, dtype=dtype, device=device)}
    if with_bias:
        inputs["bias"] = randn(gen, num_experts, d_out, dtype=dtype, device=device)
    offsets = oracles.offsets_of(blocks).to(device)
    check_forward_backward(
        lambda x, weight, bias=None: mk.grouped_linear(x, weight, bias, offsets, backend=backend),
        lambda x, weight, bias=None: oracles.grouped_linear(x, weight, bias, offsets),
        inputs, kind=kind, grad_kind=kind, gen=gen)


@pytest.mark.parametrize("backend", backends("grouped_linear"))
def test_grouped_linear_max_rows_bound(backend, device):
    """A max_rows larger than the longest block (a bound known in advance) changes nothing."""
    gen = generator(13)
    dtype, kind = precision(backend)
    x, w, b = (randn(gen, *shape, dtype=dtype, device=device) for shape in ((9, 3), (2, 3, 4), (2, 4)))
    offsets = torch.tensor([0, 4, 9], device=device)
    assert_close(mk.grouped_linear(x, w, b, offsets, max_rows=16, backend=backend),
                 mk.grouped_linear(x, w, b, offsets, backend=backend), kind)


# ---- the Triton kernel against the reference in fp32 / fp16 / bf16 --------------------------------

BACKEND_BLOCKS = {"one_expert": [13], "empty_experts": [0, 5, 0, 70, 1, 0], "all_empty": [0, 0], "primes": [3, 11, 2]}


@pytest.mark.parametrize("blocks", list(BACKEND_BLOCKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_in,d_out", [(7, 5), (33, 70)])
@pytest.mark.parametrize("variant", ["plain", "no_bias"])
def test_grouped_linear(blocks, dtype, d_in, d_out, variant, device):
    lengths = BACKEND_BLOCKS[blocks]
    num_rows, num_experts = sum(lengths), len(lengths)
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = {"x": random_values(num_rows, d_in, dtype, device),
              "weight": random_values(num_experts * d_in, d_out, dtype, device, seed=1).view(num_experts, d_in, d_out)
              / math.sqrt(d_in),
              "bias": None if variant == "no_bias" else random_values(num_experts, d_out, dtype, device, seed=2)}

    def run(backend):
        return lambda x, weight, bias: mk.grouped_linear(x, weight, bias, offsets, backend=backend)

    # Every output and gradient is an fp32 sum rounded once to the dtype.
    compare_to_reference(run("triton"), run("reference"), inputs, dtype, "reduction", "reduction")


def test_grouped_linear_weight_grad_splits_rows(device):
    """Experts with more rows than one program reduces (several fp32 partials per expert, added
    in a fixed order) give the weight and bias gradients of a float64 oracle to fp32 accuracy
    (relative to the norm: sums of thousands of terms cancel in single entries)."""
    from mos_kernels.grouped_linear import _launch_weight_grad, _splits

    lengths = [4100, 0, 3000]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    x = random_values(sum(lengths), 16, torch.float32, device)
    grad = random_values(sum(lengths), 16, torch.float32, device, seed=1)
    assert _splits(sum(lengths), 3) > 1
    dw, db = _launch_weight_grad(x, grad, offsets, 3)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        for got, want in ((dw[e], x[lo:hi].double().t() @ grad[lo:hi].double()),
                          (db[e], grad[lo:hi].double().sum(0))):
            rel = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
            assert rel < 1e-6, f"expert {e}: relative error {rel:.2e}"


# ---- operator registration: opcheck, FLOP formula ---------------------------------------------

def test_opcheck_grouped_linear(device):
    x = random_values(19, 8, torch.float32, device).requires_grad_()
    weight = random_values(24, 5, torch.float32, device, seed=1).view(3, 8, 5).requires_grad_()
    bias = random_values(3, 5, torch.float32, device, seed=2).requires_grad_()
    args = (x, weight, bias, torch.tensor([0, 7, 7, 19], device=device))
    torch.library.opcheck(torch.ops.mos.grouped_linear.default, args)


def test_opcheck_grouped_linear_backward(device):
    """The backward kernel is a custom op too (no autograd of its own): schema, fake, tracing."""
    x = random_values(19, 8, torch.float32, device)
    weight = random_values(24, 5, torch.float32, device, seed=1).view(3, 8, 5)
    torch.library.opcheck(torch.ops.mos.grouped_linear_backward.default,
                          (random_values(19, 5, torch.float32, device, seed=2), x, weight,
                           torch.tensor([0, 7, 7, 19], device=device)))


def test_flop_formula_grouped_linear(device):
    """FlopCounterMode counts the kernel: 2·N·d_in·d_out per grouped GEMM."""
    lengths, dim = [5, 0, 11], 8
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    x = random_values(16, dim, torch.float32, device)
    weight = random_values(3 * dim, 6, torch.float32, device).view(3, dim, 6)
    with FlopCounterMode(display=False) as counter:
        torch.ops.mos.grouped_linear(x, weight, None, offsets)
    assert counter.get_total_flops() == 2 * 16 * dim * 6


# ---- at GPU scale (marked gpu: the GPU check selects them with -m gpu; skipped without CUDA) ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_grouped_linear_large(dtype):
    dispatch, values = theme_layout(256, 1000, 64, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(2)
    weight = torch.randn(8, 64, 192, device="cuda", generator=gen) / 8
    bias = torch.randn(8, 192, device="cuda", generator=gen)
    results = []
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        x, w, b = rounded_leaves([values, weight, bias], dtype, run_dtype)
        rows = mk.theme_gather(x, dispatch.gather_index, inverse_index=dispatch.inverse_index, backend=backend)
        out = mk.grouped_linear(rows, w, b, dispatch.expert_offsets, backend=backend)
        (out.float() * cotangent(out.shape, dtype, 5)).sum().backward()
        results.append([out, x.grad, w.grad, b.grad])
    for name, got, want in zip(("out", "x", "weight", "bias"), *results):
        error = relative_error(got, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

BAD_INPUT = {
    # name: (call, exception, argument named)
    "grouped_linear_width": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM + 1, 2), None,
                                                       torch.tensor([0, 1, 3])), ValueError, "x"),
    "grouped_linear_offsets_count": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2), None,
                                                               torch.tensor([0, 3])), ValueError, "expert_offsets"),
    "grouped_linear_offsets_short": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2), None,
                                                               torch.tensor([0, 1, 2])), ValueError,
                                     "expert_offsets"),
    "grouped_linear_bias_shape": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2),
                                                            torch.randn(2, 3), torch.tensor([0, 1, 3])),
                                  ValueError, "bias"),
    "grouped_linear_weight_2d": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(DIM, 2), None,
                                                           torch.tensor([0, 3])), ValueError, "weight"),
    "grouped_linear_nan_x": (lambda: mk.grouped_linear(torch.full((3, DIM), math.nan), torch.randn(2, DIM, 2), None,
                                                       torch.tensor([0, 1, 3])), ValueError, "x"),
    "grouped_linear_inf_weight": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.full((2, DIM, 2), math.inf),
                                                            None, torch.tensor([0, 1, 3])), ValueError, "weight"),
    "grouped_linear_nan_bias": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2),
                                                          torch.full((2, 2), math.nan), torch.tensor([0, 1, 3])),
                                ValueError, "bias"),
    "grouped_linear_negative_max_rows": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2), None,
                                                                   torch.tensor([0, 1, 3]), max_rows=-1),
                                         ValueError, "max_rows"),
}


def _grouped_linear_case(device):
    tokens, gather_index, row_gate, _, _ = strided_gather_args(device, rows=False)
    _, _, _, _, d = strided_layout(device)

    def run(backend, x, weight, bias, expert_offsets):
        return (mk.grouped_linear(x, weight, bias, expert_offsets, backend=backend),)
    weight = random_values(NUM_THEMES * STRIDED_DIM, 6, torch.float32, device, 2).view(NUM_THEMES, STRIDED_DIM, 6)
    return run, dict(x=mk.theme_gather(tokens, gather_index, row_gate, backend="reference"), weight=weight,
                     bias=random_values(NUM_THEMES, 6, torch.float32, device, 3), expert_offsets=d.expert_offsets)


STRIDED_CASES = {"grouped_linear": _grouped_linear_case}
