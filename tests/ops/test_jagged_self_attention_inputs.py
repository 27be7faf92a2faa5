"""jagged_self_attention: bad arguments refused by name.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import DIM, named


BAD_INPUT = {
    # name: (call, exception, argument named)
    "self_attention_k_shape": (lambda: mk.jagged_self_attention(torch.randn(3, DIM), torch.randn(2, DIM),
                                                                torch.randn(3, DIM), torch.tensor([0, 3]),
                                                                num_heads=2), ValueError, "k"),
    "self_attention_offsets_short": (lambda: mk.jagged_self_attention(torch.randn(3, DIM), torch.randn(3, DIM),
                                                                      torch.randn(3, DIM), torch.tensor([0, 2]),
                                                                      num_heads=2), ValueError, "segment_offsets"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """jagged_self_attention refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()
