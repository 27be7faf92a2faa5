"""expert_target_attention on unusual input: bad arguments refused by name, and strided views of every
tensor argument giving the dense answer, and rows past 2^31 elements of an input read right through
an index (tests/input_cases.py says how).
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from mos_kernels.backend import IMPLEMENTED
from tests.input_cases import (DIM, NUM_THEMES, STRIDED_DIM, STRIDED_LENGTHS, check_rows_past_2_to_31,
                               check_strided_views, named, strided_gather_args, strided_layout, strided_params,
                               two_experts)
from tests.kernel_cases import ON_GPU, random_values


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
    "attention_no_key_weight": (lambda: _attention(w_key=None), TypeError, "w_key"),
    "attention_no_value_weight": (lambda: _attention(w_value=None), TypeError, "w_value"),
    "attention_int_value_bias": (lambda: _attention(b_value=torch.ones(2, DIM, dtype=torch.int64)), TypeError,
                                 "b_value"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """expert_target_attention refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _target_attention_case(device):
    tokens, gather_index, row_gate, inverse_index, _ = strided_gather_args(device, rows=False)
    _, _, _, _, d = strided_layout(device)
    weights = {name: random_values(NUM_THEMES * STRIDED_DIM, STRIDED_DIM, torch.float32, device, seed)
               .view(NUM_THEMES, STRIDED_DIM, STRIDED_DIM)
               for seed, name in enumerate(("w_key", "w_value"), start=2)}
    biases = {name: random_values(NUM_THEMES, STRIDED_DIM, torch.float32, device, seed)
              for seed, name in enumerate(("b_key", "b_value"), start=4)}

    def run(backend, tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate,
            inverse_index):
        return (mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, segment_offsets,
                                           num_heads=2, gather_index=gather_index, row_gate=row_gate,
                                           inverse_index=inverse_index, backend=backend),)
    query = random_values(NUM_THEMES * len(STRIDED_LENGTHS), STRIDED_DIM, torch.float32, device, 6)
    return run, dict(tokens=tokens, query=query,
                     **weights, **biases, segment_offsets=d.theme_offsets, gather_index=gather_index,
                     row_gate=row_gate, inverse_index=inverse_index)


STRIDED_CASES = {"expert_target_attention": _target_attention_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)


# ---- rows past 2^31 elements, read through an index (tests/input_cases.py) ------------------

def _read_rows(tokens, index, gate, backend):
    weights, offsets = two_experts(index)
    return mk.expert_target_attention(tokens, weights[:, 1], weights, None, weights.flip(0), None, offsets,
                                      num_heads=4, gather_index=index, row_gate=gate, backend=backend)


@pytest.mark.skipif(ON_GPU, reason="CPU memory trick; the GPU run allocates for real")
@pytest.mark.parametrize("op,backend", [("expert_target_attention", backend)
                                        for backend in IMPLEMENTED["expert_target_attention"]])
def test_rows_past_2_to_31_elements_read_through_an_index(op, backend):
    check_rows_past_2_to_31(op, _read_rows, backend)
