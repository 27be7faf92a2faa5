"""What every op promises about its arguments, checked from the tables each op's test file holds
(plain data, defined next to the op's other tests; tests/input_cases.py says how each is checked):

  BAD_INPUT          {case: (call, exception, argument)}: the call fails at once with that
                     exception, its message starting with the argument's name.
  STRIDED_CASES      {op: make_case(device) -> (run, tensors)}: on every backend the op has, a
                     strided view of any one tensor argument gives the dense copy's answer,
                     forward and backward.
  ROWS_PAST_2_TO_31  {op: read_rows(tokens, index, gate, backend)}, for the ops that read token
                     rows through an index: rows past 2^31 elements of a reserved input read right.

A test's id names the op's file and the case, e.g. test_op_rejects_bad_input[theme_dispatch-
dispatch_gate_shape], test_strided_views_give_the_dense_answer[theme_gather-theme_scatter-triton].
"""
from __future__ import annotations

import pytest

from mos_kernels.backend import IMPLEMENTED
from tests.input_cases import check_rows_past_2_to_31, check_strided_views, named, strided_params
from tests.kernel_cases import ON_GPU
from tests.ops import test_expert_target_attention as expert_target_attention
from tests.ops import test_grouped_linear as grouped_linear
from tests.ops import test_jagged as jagged
from tests.ops import test_jagged_self_attention as jagged_self_attention
from tests.ops import test_session_pool_route as session_pool_route
from tests.ops import test_sessionize as sessionize
from tests.ops import test_theme_dispatch as theme_dispatch
from tests.ops import test_theme_gather as theme_gather

# The op test files, by the name a test id gives them. A file without one of the tables has no
# case of that kind (the jagged helpers: bad arguments only).
OPS = {module.__name__.rpartition(".test_")[2]: module for module in (
    sessionize, session_pool_route, theme_dispatch, theme_gather, grouped_linear, expert_target_attention,
    jagged_self_attention, jagged)}


def _table(name):
    return {op: getattr(module, name) for op, module in OPS.items() if hasattr(module, name)}


BAD_INPUT, STRIDED_CASES, ROWS_PAST_2_TO_31 = (_table(name) for name in ("BAD_INPUT", "STRIDED_CASES",
                                                                           "ROWS_PAST_2_TO_31"))


@pytest.mark.parametrize("op,case", [pytest.param(op, case, id=f"{op}-{case}")
                                     for op, table in BAD_INPUT.items() for case in table])
def test_op_rejects_bad_input(op, case):
    """The op refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[op][case]
    with pytest.raises(error, match=named(name)):
        fn()


@pytest.mark.parametrize("op,case,backend", [pytest.param(op, case, backend, id=f"{op}-{case}-{backend}")
                                             for op, table in STRIDED_CASES.items()
                                             for case, backend in strided_params(table)])
def test_strided_views_give_the_dense_answer(op, case, backend, device):
    check_strided_views(case, STRIDED_CASES[op][case], backend, device)


@pytest.mark.skipif(ON_GPU, reason="CPU memory trick; the GPU run allocates for real")
@pytest.mark.parametrize("op,case,backend", [pytest.param(op, case, backend, id=f"{op}-{case}-{backend}")
                                             for op, table in ROWS_PAST_2_TO_31.items()
                                             for case in table for backend in IMPLEMENTED[case]])
def test_rows_past_2_to_31_elements_read_through_an_index(op, case, backend):
    check_rows_past_2_to_31(case, ROWS_PAST_2_TO_31[op][case], backend)


def test_every_op_with_a_backend_has_a_strided_case():
    """A new op (or backend table entry) cannot miss the strided-view check: every op the backend
    table lists, and sessionize, has a case."""
    cases = {case for table in STRIDED_CASES.values() for case in table}
    assert cases == set(IMPLEMENTED) | {"sessionize"}, cases ^ (set(IMPLEMENTED) | {"sessionize"})
