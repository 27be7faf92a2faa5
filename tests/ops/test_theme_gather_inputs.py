"""theme_gather and theme_scatter: bad arguments refused by name.
"""
from __future__ import annotations

import math
import pytest
import torch

import mos_kernels as mk
from tests.input_cases import DIM, named


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
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """theme_gather refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()
