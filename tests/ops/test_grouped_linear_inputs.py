"""grouped_linear on unusual input: bad arguments refused by name, and strided views of every tensor
argument giving the dense answer (tests/input_cases.py says how).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import (DIM, NUM_THEMES, STRIDED_DIM, check_strided_views, named, strided_gather_args,
                               strided_layout, strided_params)
from tests.kernel_cases import random_values


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
    tokens, gather_index, row_gate, _, _ = strided_gather_args(device, rows=False)
    _, _, _, _, d = strided_layout(device)

    def run(backend, x, weight, bias, expert_offsets):
        return (mk.grouped_linear(x, weight, bias, expert_offsets, backend=backend),)
    weight = random_values(NUM_THEMES * STRIDED_DIM, 6, torch.float32, device, 2).view(NUM_THEMES, STRIDED_DIM, 6)
    return run, dict(x=mk.theme_gather(tokens, gather_index, row_gate, backend="reference"), weight=weight,
                     bias=random_values(NUM_THEMES, 6, torch.float32, device, 3), expert_offsets=d.expert_offsets)


STRIDED_CASES = {"grouped_linear": _grouped_linear_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)
