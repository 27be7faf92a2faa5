"""theme_gather and theme_scatter on unusual input: bad arguments refused by name, and strided views of
every tensor argument giving the dense answer, and rows past 2^31 elements of an input read right
through an index (tests/input_cases.py says how).
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from mos_kernels.backend import IMPLEMENTED
from tests.input_cases import (DIM, check_rows_past_2_to_31, check_strided_views, named, strided_gather_args,
                               strided_params)
from tests.kernel_cases import ON_GPU


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
    """theme_gather or theme_scatter refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _gather_case(device):
    values, gather_index, row_gate, inverse_index, _ = strided_gather_args(device, rows=False)

    def run(backend, values, gather_index, row_gate, inverse_index):
        return (mk.theme_gather(values, gather_index, row_gate, inverse_index=inverse_index, backend=backend),)
    return run, dict(values=values, gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index)


def _scatter_case(device):
    rows, gather_index, row_gate, inverse_index, num_tokens = strided_gather_args(device, rows=True)

    def run(backend, rows, gather_index, row_gate, inverse_index):
        return (mk.theme_scatter(rows, gather_index, row_gate, num_tokens=num_tokens, inverse_index=inverse_index,
                                 backend=backend),)
    return run, dict(rows=rows, gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index)


STRIDED_CASES = {"theme_gather": _gather_case, "theme_scatter": _scatter_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)


# ---- rows past 2^31 elements, read through an index (tests/input_cases.py) ------------------

def _read_rows(tokens, index, gate, backend):
    return mk.theme_gather(tokens, index, gate, backend=backend)


@pytest.mark.skipif(ON_GPU, reason="CPU memory trick; the GPU run allocates for real")
@pytest.mark.parametrize("op,backend", [("theme_gather", backend) for backend in IMPLEMENTED["theme_gather"]])
def test_rows_past_2_to_31_elements_read_through_an_index(op, backend):
    check_rows_past_2_to_31(op, _read_rows, backend)
