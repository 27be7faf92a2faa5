"""sessionize: bad arguments refused by name.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import named


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
