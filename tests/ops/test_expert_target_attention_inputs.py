"""expert_target_attention: bad arguments refused by name.
"""
from __future__ import annotations

import math
import pytest
import torch

import mos_kernels as mk
from tests.input_cases import DIM, named


def _attention(**kw):
    args = dict(tokens=torch.randn(5, DIM), query=torch.randn(4, DIM), w_key=torch.randn(2, DIM, DIM), b_key=None,
                w_value=torch.randn(2, DIM, DIM), b_value=None, segment_offsets=torch.tensor([0, 1, 3, 3, 5]),
                num_heads=2)
    args.update(kw)
    return mk.expert_target_attention(**args)


BAD_INPUT = {
    # name: (call, exception, argument named)
    "attention_heads_not_dividing": (lambda: _attention(num_heads=3), ValueError, "num_heads"),
    "attention_query_rows": (lambda: _attention(query=torch.randn(3, DIM)), ValueError, "query"),
    "attention_segments_count": (lambda: _attention(segment_offsets=torch.tensor([0, 1, 5])), ValueError,
                                 "segment_offsets"),
    "attention_gate_without_index": (lambda: _attention(row_gate=torch.ones(5)), ValueError, "row_gate"),
    "attention_nan_tokens": (lambda: _attention(tokens=torch.full((5, DIM), math.nan)), ValueError, "tokens"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """expert_target_attention refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()
