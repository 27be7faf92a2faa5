"""sessionize: jagged sequences cut into sessions, fixed-length (aligned to the newest item) or by
time gaps, against the loop oracle (tests/oracles.py) on awkward lengths and by hand. Its bad
arguments and strided views are the tables at the end, run by test_contract.py.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests import oracles
from tests.input_cases import STRIDED_LENGTHS
from tests.kernel_cases import LENGTH_IDS, LENGTHS
from tests.oracles import generator, increasing_times


def assert_same_sessions(got: mk.Sessions, expected):
    so, se, eso = expected
    assert torch.equal(got.session_offsets.cpu(), so), (got.session_offsets, so)
    assert torch.equal(got.session_example.cpu(), se), (got.session_example, se)
    assert torch.equal(got.example_session_offsets.cpu(), eso), (got.example_session_offsets, eso)
    assert got.num_sessions == se.numel()


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
@pytest.mark.parametrize("session_len", [1, 3, 4, 64])
def test_sessionize_fixed_matches_oracle(lengths, session_len, device):
    """Fixed sessions are chunks aligned to the newest item (newest full, oldest shorter)."""
    offsets = oracles.offsets_of(lengths)
    got = mk.sessionize(offsets.to(device), mode="fixed", session_len=session_len)
    assert_same_sessions(got, oracles.sessionize(offsets, mode="fixed", session_len=session_len))


def test_sessionize_fixed_newest_session_is_full(device):
    """Length 10, session_len 4: sessions [0,2) [2,6) [6,10)."""
    got = mk.sessionize(torch.tensor([0, 10], device=device), mode="fixed", session_len=4)
    assert got.session_offsets.cpu().tolist() == [0, 2, 6, 10]


def test_sessionize_no_examples(device):
    """B = 0 (offsets [0]) gives no sessions and an [1] per-example offsets tensor."""
    got = mk.sessionize(torch.zeros(1, dtype=torch.int64, device=device), mode="fixed", session_len=3)
    assert got.session_offsets.cpu().tolist() == [0] and got.num_sessions == 0
    assert got.example_session_offsets.cpu().tolist() == [0]


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
@pytest.mark.parametrize("max_session_len", [1, 2, 3, 64])
@pytest.mark.parametrize("time_dtype", [torch.float64, torch.int64])
@pytest.mark.parametrize("seed", [0, 1])
def test_sessionize_gap_matches_oracle(lengths, max_session_len, time_dtype, seed, device):
    """Gap sessions: a new session where the step exceeds gap_seconds (equal does not), then
    chunks of max_session_len from every session's start."""
    gen = generator(seed)
    offsets = oracles.offsets_of(lengths)
    times = increasing_times(gen, lengths, 100.0).to(time_dtype)
    got = mk.sessionize(offsets.to(device), mode="gap", timestamps=times.to(device), gap_seconds=100.0,
                        max_session_len=max_session_len)
    expected = oracles.sessionize(offsets, mode="gap", timestamps=times, gap_seconds=100.0,
                                  max_session_len=max_session_len)
    assert_same_sessions(got, expected)


def test_sessionize_gap_hand_case(device):
    """Gaps [_, 5, 100(=gap), 101, 0] with max_session_len 2: sessions [0,2) [2,3) [3,5)."""
    times = torch.tensor([0.0, 5.0, 105.0, 206.0, 206.0], device=device)
    got = mk.sessionize(torch.tensor([0, 5], device=device), mode="gap", timestamps=times,
                        gap_seconds=100.0, max_session_len=2)
    # 0,5,105 are one gap-session (5 and 100 do not exceed 100), split [0,2) [2,3); 206,206 another.
    assert got.session_offsets.cpu().tolist() == [0, 2, 3, 5]


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

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
    "sessionize_float_session_len": (lambda: mk.sessionize(torch.tensor([0, 6]), session_len=2.5), TypeError,
                                     "session_len"),
    "sessionize_float_num_tokens": (lambda: mk.sessionize(torch.tensor([0, 3]), num_tokens=3.0), TypeError,
                                    "num_tokens"),
    # bfloat16 epoch seconds are millions of seconds apart: every gap would vanish.
    "sessionize_bfloat16_epoch_seconds": (lambda: mk.sessionize(
        torch.tensor([0, 3]), mode="gap", timestamps=(torch.tensor([0, 5000, 20000]) + 1_700_000_000).bfloat16()),
        ValueError, "timestamps"),
    # A span past 2^63 would wrap its int64 step to a negative gap: one session.
    "sessionize_times_past_2_to_62": (lambda: mk.sessionize(torch.tensor([0, 2]), mode="gap",
                                                            timestamps=torch.tensor([-9 * 10 ** 18, 9 * 10 ** 18])),
                                      ValueError, "timestamps"),
    "sessionize_int64_min_time": (lambda: mk.sessionize(torch.tensor([0, 2]), mode="gap",
                                                        timestamps=torch.tensor([-2 ** 63, 0])), ValueError,
                                  "timestamps"),
    "sessionize_uint64_timestamps": (lambda: mk.sessionize(torch.tensor([0, 2]), mode="gap",
                                                           timestamps=torch.tensor([1, 2], dtype=torch.uint64)),
                                     TypeError, "timestamps"),
}


def _sessionize_case(device):
    offsets = mk.offsets_from_lengths(torch.tensor(STRIDED_LENGTHS, device=device))
    # A pause longer than gap_seconds before every third event.
    gaps = torch.where(torch.arange(int(offsets[-1]), device=device) % 3 == 0, 5000.0, 1.0)

    def run(backend, offsets, timestamps):
        s = mk.sessionize(offsets, mode="gap", timestamps=timestamps, gap_seconds=1800.0, max_session_len=4)
        return s.session_offsets, s.session_example, s.example_session_offsets
    return run, dict(offsets=offsets, timestamps=torch.cumsum(gaps, 0))


STRIDED_CASES = {"sessionize": _sessionize_case}
