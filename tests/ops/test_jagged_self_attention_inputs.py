"""jagged_self_attention on unusual input: bad arguments refused by name, and strided views of
every tensor argument giving the dense answer (tests/input_cases.py says how).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import DIM, STRIDED_DIM, check_strided_views, named, strided_layout, strided_params
from tests.kernel_cases import random_values


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


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _self_attention_case(device):
    offsets, _, _, _, _ = strided_layout(device)
    qkv = {name: random_values(int(offsets[-1]), STRIDED_DIM, torch.float32, device, seed)
           for seed, name in enumerate("qkv")}

    def run(backend, q, k, v, segment_offsets):
        return (mk.jagged_self_attention(q, k, v, segment_offsets, num_heads=2, backend=backend),)
    return run, dict(**qkv, segment_offsets=offsets)


STRIDED_CASES = {"jagged_self_attention": _self_attention_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)
