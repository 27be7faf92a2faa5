"""grouped_linear on unusual input: bad arguments refused by name, and strided views of every tensor
argument giving the dense answer, and rows past 2^31 elements of an input read right through an
index (tests/input_cases.py says how).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels.backend import IMPLEMENTED
from tests.input_cases import (DIM, NUM_THEMES, STRIDED_DIM, check_rows_past_2_to_31, check_strided_views, named,
                               strided_gather_args, strided_layout, strided_params, two_experts)
from tests.kernel_cases import ON_GPU, random_values


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
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """grouped_linear refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _grouped_linear_case(device):
    x, gather_index, row_gate, inverse_index, _ = strided_gather_args(device, rows=False)
    _, _, _, _, d = strided_layout(device)
    gen = torch.Generator().manual_seed(5)

    def run(backend, x, weight, bias, expert_offsets, gather_index, row_gate, inverse_index, scatter_index):
        return (mk.grouped_linear(x, weight, bias, expert_offsets, gather_index=gather_index, row_gate=row_gate,
                                  inverse_index=inverse_index, scatter_index=scatter_index, backend=backend),)
    weight = random_values(NUM_THEMES * STRIDED_DIM, 6, torch.float32, device, 2).view(NUM_THEMES, STRIDED_DIM, 6)
    return run, dict(x=x, weight=weight,
                     bias=random_values(NUM_THEMES, 6, torch.float32, device, 3), expert_offsets=d.expert_offsets,
                     gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index,
                     scatter_index=torch.randperm(gather_index.numel(), generator=gen).to(device))


STRIDED_CASES = {"grouped_linear": _grouped_linear_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)


# ---- rows past 2^31 elements, read through an index (tests/input_cases.py) ------------------

def _read_rows(tokens, index, gate, backend):
    weights, offsets = two_experts(index)
    return mk.grouped_linear(tokens, weights[:, :, :16], weights[:, 0, :16], offsets, gather_index=index,
                             row_gate=gate, backend=backend)


@pytest.mark.skipif(ON_GPU, reason="CPU memory trick; the GPU run allocates for real")
@pytest.mark.parametrize("op,backend", [("grouped_linear", backend)
                                        for backend in IMPLEMENTED["grouped_linear"]])
def test_rows_past_2_to_31_elements_read_through_an_index(op, backend):
    check_rows_past_2_to_31(op, _read_rows, backend)
