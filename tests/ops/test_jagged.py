"""The jagged helpers: jagged_to_padded and padded_to_jagged (values and gradients), segment_ids,
positions_in_segment, lengths_from_offsets, offsets_from_lengths, against the loop oracles
(tests/oracles.py) on awkward lengths; the conversions' bad arguments are a table at the end,
run by test_contract.py.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels import jagged as mk_jagged
from tests import oracles
from tests.kernel_cases import LENGTH_IDS, LENGTHS, check_forward_backward
from tests.input_cases import DIM
from tests.oracles import generator, randn


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
@pytest.mark.parametrize("trailing", [(), (2, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("padding_value", [0.0, -7.5])
def test_jagged_padded_round_trip(lengths, trailing, padding_value, device):
    """jagged_to_padded and padded_to_jagged equal their oracles, and their round trip gives the
    input back bit for bit; padding cells hold padding_value."""
    gen = generator(18)
    offsets = oracles.offsets_of(lengths).to(device)
    values = randn(gen, sum(lengths), 4, *trailing, device=device)
    max_len = max(lengths) + 2
    padded = mk.jagged_to_padded(values, offsets, max_len, padding_value)
    assert torch.equal(padded.cpu(), oracles.jagged_to_padded(values.cpu(), offsets.cpu(), max_len, padding_value))
    lengths_t = torch.tensor(lengths, device=device)
    back, back_offsets = mk.padded_to_jagged(padded, lengths_t)
    ref_values, ref_offsets = oracles.padded_to_jagged(padded.cpu(), lengths_t.cpu())
    assert torch.equal(back.cpu(), ref_values) and torch.equal(back_offsets.cpu(), ref_offsets)
    assert torch.equal(back, values) and torch.equal(back_offsets, offsets)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
def test_jagged_padded_gradients(lengths, device):
    """Gradients of both conversions equal the oracles' (float64)."""
    gen = generator(19)
    offsets = oracles.offsets_of(lengths).to(device)
    max_len = max(lengths) + 1
    check_forward_backward(lambda values: mk.jagged_to_padded(values, offsets, max_len),
                           lambda values: oracles.jagged_to_padded(values, offsets, max_len),
                           {"values": randn(gen, sum(lengths), 3, device=device)},
                           kind="float64", grad_kind="float64", gen=gen)
    lengths_t = torch.tensor(lengths, device=device)
    check_forward_backward(lambda padded: mk.padded_to_jagged(padded, lengths_t)[0],
                           lambda padded: oracles.padded_to_jagged(padded, lengths_t)[0],
                           {"padded": randn(gen, len(lengths), max_len, 3, device=device)},
                           kind="float64", grad_kind="float64", gen=gen)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
def test_segment_ids_and_positions(lengths, device):
    """segment_ids, positions_in_segment, lengths_from_offsets, offsets_from_lengths by loops."""
    offsets = oracles.offsets_of(lengths).to(device)
    seg = [g for g, n in enumerate(lengths) for _ in range(n)]
    pos = [j for n in lengths for j in range(n)]
    assert mk.segment_ids(offsets).cpu().tolist() == seg
    assert mk.segment_ids(offsets, sum(lengths)).cpu().tolist() == seg
    assert mk.positions_in_segment(offsets).cpu().tolist() == pos
    assert mk.lengths_from_offsets(offsets).cpu().tolist() == lengths
    assert torch.equal(mk.offsets_from_lengths(torch.tensor(lengths, device=device, dtype=torch.int32)), offsets)



def test_expert_offsets_take_every_bth_segment_boundary():
    """Expert e owns segments e*B .. e*B+B-1 (expert-major), so its rows are one block."""
    segment_offsets = torch.tensor([0, 2, 2, 5, 6, 6, 9])       # E = 3 experts, B = 2 examples
    assert mk_jagged.expert_offsets(segment_offsets, 3).tolist() == [0, 2, 6, 9]
    assert mk_jagged.expert_offsets(torch.tensor([0]), 4).tolist() == [0, 0, 0, 0, 0]   # no examples


# ---- the contract's table (test_contract.py): bad arguments, refused by name --------------------

BAD_INPUT = {
    # name: (call, exception, argument named)
    "to_padded_max_len_too_small": (lambda: mk.jagged_to_padded(torch.randn(5, DIM), torch.tensor([0, 4, 5]), 3),
                                    ValueError, "max_len"),
    "to_jagged_lengths_past_width": (lambda: mk.padded_to_jagged(torch.randn(2, 3, DIM), torch.tensor([4, 0])),
                                     ValueError, "lengths"),
    "to_jagged_1d": (lambda: mk.padded_to_jagged(torch.randn(3), torch.tensor([1, 1, 1])), ValueError, "padded"),
    "to_padded_negative_max_len": (lambda: mk.jagged_to_padded(torch.randn(0, DIM), torch.tensor([0]), -1),
                                   ValueError, "max_len"),
    "offsets_from_negative_lengths": (lambda: mk.offsets_from_lengths(torch.tensor([3, -2, 1])), ValueError,
                                      "lengths"),
    "offsets_from_float_lengths": (lambda: mk.offsets_from_lengths(torch.tensor([2.7, 1.5])), TypeError, "lengths"),
    "offsets_from_2d_lengths": (lambda: mk.offsets_from_lengths(torch.tensor([[1, 2]])), ValueError, "lengths"),
    "segment_ids_offsets_not_from_0": (lambda: mk.segment_ids(torch.tensor([2, 3, 5])), ValueError, "offsets"),
    "segment_ids_total": (lambda: mk.segment_ids(torch.tensor([0, 3, 5]), 4), ValueError, "offsets"),
    "positions_non_monotone": (lambda: mk.positions_in_segment(torch.tensor([0, 3, 1])), ValueError, "offsets"),
    "lengths_non_monotone": (lambda: mk.lengths_from_offsets(torch.tensor([0, 3, 1])), ValueError, "offsets"),
    "lengths_int32_offsets": (lambda: mk.lengths_from_offsets(torch.tensor([0, 3], dtype=torch.int32)), TypeError,
                              "offsets"),
}
