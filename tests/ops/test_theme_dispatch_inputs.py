"""theme_dispatch on unusual input: bad arguments refused by name, and strided views of every
tensor argument giving the dense answer (tests/input_cases.py says how).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import NUM_THEMES, STRIDED_LENGTHS, check_strided_views, named, strided_layout, strided_params


def _dispatch(themes=None, gate=None, session_offsets=None, session_example=None, **kw):
    themes = torch.tensor([[0], [2], [1]]) if themes is None else themes
    gate = torch.ones(3, 1) if gate is None else gate
    session_offsets = torch.tensor([0, 2, 3, 6]) if session_offsets is None else session_offsets
    session_example = torch.tensor([0, 0, 1]) if session_example is None else session_example
    kw = {"num_examples": 2, "num_themes": 3, **kw}
    return mk.theme_dispatch(themes, gate, session_offsets, session_example, **kw)


BAD_INPUT = {
    # name: (call, exception, argument named)
    "dispatch_theme_out_of_range": (lambda: _dispatch(themes=torch.tensor([[0], [3], [1]])), ValueError, "themes"),
    "dispatch_repeated_theme": (lambda: _dispatch(themes=torch.tensor([[0, 1], [2, 2], [1, 0]]),
                                                  gate=torch.ones(3, 2)), ValueError, "themes"),
    "dispatch_float_themes": (lambda: _dispatch(themes=torch.tensor([[0.0], [2.0], [1.0]])), TypeError, "themes"),
    "dispatch_gate_shape": (lambda: _dispatch(gate=torch.ones(3, 2)), ValueError, "gate"),
    "dispatch_session_offsets_count": (lambda: _dispatch(session_offsets=torch.tensor([0, 2, 6])), ValueError,
                                       "session_offsets"),
    "dispatch_example_out_of_range": (lambda: _dispatch(session_example=torch.tensor([0, 0, 2])), ValueError,
                                      "session_example"),
    "dispatch_examples_unordered": (lambda: _dispatch(session_example=torch.tensor([1, 0, 1])), ValueError,
                                    "session_example"),
    "dispatch_num_themes_0": (lambda: _dispatch(num_themes=0), ValueError, "num_themes"),
    "dispatch_max_theme_tokens_0": (lambda: _dispatch(max_theme_tokens=0), ValueError, "max_theme_tokens"),
    "dispatch_example_session_offsets_count": (
        lambda: _dispatch(example_session_offsets=torch.tensor([0, 2, 2, 3])), ValueError, "example_session_offsets"),
    "dispatch_example_session_offsets_wrong": (
        lambda: _dispatch(example_session_offsets=torch.tensor([0, 1, 3])), ValueError, "example_session_offsets"),
    "dispatch_example_session_offsets_total": (
        lambda: _dispatch(example_session_offsets=torch.tensor([0, 2, 4])), ValueError, "example_session_offsets"),
    "dispatch_example_session_offsets_float": (
        lambda: _dispatch(example_session_offsets=torch.tensor([0.0, 2.0, 3.0])), TypeError,
        "example_session_offsets"),
    "dispatch_int_gate": (lambda: _dispatch(gate=torch.ones(3, 1, dtype=torch.int64)), TypeError, "gate"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """theme_dispatch refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _dispatch_case(device):
    _, sessions, themes, gate, _ = strided_layout(device)

    def run(backend, themes, gate, session_offsets, session_example):
        d = mk.theme_dispatch(themes, gate, session_offsets, session_example, num_examples=len(STRIDED_LENGTHS),
                              num_themes=NUM_THEMES, backend=backend)
        return d.gather_index, d.row_gate, d.inverse_index, d.theme_offsets
    return run, dict(themes=themes, gate=gate, session_offsets=sessions.session_offsets,
                     session_example=sessions.session_example)


STRIDED_CASES = {"theme_dispatch": _dispatch_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)
