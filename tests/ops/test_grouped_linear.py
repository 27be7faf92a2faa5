"""grouped_linear: one linear map per expert over its block of rows, against the loop oracle
(tests/oracles.py) on awkward blocks (empty experts first, in the middle and last, one row,
prime sizes), forward and backward, with and without bias, and its max_rows bound. Kernel outputs
are poisoned before they run (tests/ops/conftest.py). The Triton kernel against the reference in
fp32 / fp16 / bf16, its opcheck and FLOP formula: test_attention_triton.py; bad arguments:
test_bad_input.py; strided views: test_hostile_inputs.py.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests import oracles
from tests.kernel_cases import backends, check_forward_backward, precision
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

