"""grouped_linear: bad arguments refused by name.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import DIM, named


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
