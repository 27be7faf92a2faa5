"""sessionize on unusual input: bad arguments refused by name, and strided views of every tensor
argument giving the dense answer (tests/input_cases.py says how).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import STRIDED_LENGTHS, check_strided_views, named, strided_params


BAD_INPUT = {
    # name: (call, exception, argument named)
    "sessionize_unknown_mode": (lambda: mk.sessionize(torch.tensor([0, 3]), mode="daily"), ValueError, "mode"),
    "sessionize_gap_without_timestamps": (lambda: mk.sessionize(torch.tensor([0, 3]), mode="gap"), ValueError,
                                          "timestamps"),
    "sessionize_back_in_time": (lambda: mk.sessionize(torch.tensor([0, 3]), mode="gap",
                                                      timestamps=torch.tensor([0.0, 2.0, 1.0])),
                                ValueError, "timestamps"),
    "sessionize_session_len_0": (lambda: mk.sessionize(torch.tensor([0, 3]), session_len=0), ValueError,
                                 "session_len"),
    "sessionize_float_offsets": (lambda: mk.sessionize(torch.tensor([0.0, 3.0])), TypeError, "offsets"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """sessionize refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _sessionize_case(device):
    offsets = mk.offsets_from_lengths(torch.tensor(STRIDED_LENGTHS, device=device))
    # A pause longer than gap_seconds before every third event.
    gaps = torch.where(torch.arange(int(offsets[-1]), device=device) % 3 == 0, 5000.0, 1.0)

    def run(backend, offsets, timestamps):
        s = mk.sessionize(offsets, mode="gap", timestamps=timestamps, gap_seconds=1800.0, max_session_len=4)
        return s.session_offsets, s.session_example, s.example_session_offsets
    return run, dict(offsets=offsets, timestamps=torch.cumsum(gaps, 0))


STRIDED_CASES = {"sessionize": _sessionize_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)
