"""MoSLayer on bad input fails at once, naming the argument the caller passed (the message starts
with it: tests/input_cases.py); each op's own cases are the BAD_INPUT tables of
tests/ops/test_<op>.py (run by tests/ops/test_contract.py), the config's in tests/test_config.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from mos import MoSLayer
from mos.config import MoSConfig
from tests.conftest import require_cuda_ext
from tests.input_cases import DIM, call_session_pool_route, named, with_value_at


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return MoSLayer(MoSConfig(dim=DIM, num_heads=2, num_themes=3, session_len=2, session_mode="gap",
                              gap_seconds=10.0))


def good_batch():
    """Two examples of lengths 3 and 2, with times non-decreasing inside each example."""
    values = torch.randn(5, DIM)
    target = torch.randn(2, DIM)
    offsets = torch.tensor([0, 3, 5])
    timestamps = torch.tensor([0.0, 5.0, 50.0, 1.0, 2.0])
    return dict(values=values, target=target, offsets=offsets, timestamps=timestamps)


def call(layer, values, target, offsets=None, **kwargs):
    return layer(values, target, offsets, **kwargs)


def test_good_batch_runs(layer):
    """The batch the cases below spoil is itself accepted (so each failure is the spoiled part)."""
    out = call(layer, **good_batch())
    assert torch.isfinite(out.output).all()


def test_jagged_values_take_int32_offsets_or_lengths(layer):
    """torchrec's jagged tensors carry lengths (and int32 offsets): both give the int64 offsets' output."""
    batch = good_batch()
    want = call(layer, **batch).output
    offsets = batch.pop("offsets")
    assert torch.equal(call(layer, offsets=offsets.int(), **batch).output, want)
    for dtype in (torch.int64, torch.int32):
        assert torch.equal(call(layer, lengths=(offsets[1:] - offsets[:-1]).to(dtype), **batch).output, want)


LAYER_CASES = {
    # name: (change to good_batch, exception, argument named)
    "float_offsets": (lambda b: b.update(offsets=b["offsets"].float()), TypeError, "offsets"),
    "int_values": (lambda b: b.update(values=b["values"].long()), TypeError, "values"),
    "int_target": (lambda b: b.update(target=b["target"].long()), TypeError, "target"),
    "values_1d": (lambda b: b.update(values=b["values"].reshape(-1)), ValueError, "values"),
    "values_4d": (lambda b: b.update(values=b["values"].reshape(1, 1, 5, DIM)), ValueError, "values"),
    "values_wrong_width": (lambda b: b.update(values=torch.randn(5, DIM + 1)), ValueError, "values"),
    "target_1d": (lambda b: b.update(target=b["target"].reshape(-1)), ValueError, "target"),
    "target_wrong_width": (lambda b: b.update(target=torch.randn(2, DIM + 2)), ValueError, "target"),
    "offsets_2d": (lambda b: b.update(offsets=b["offsets"].view(1, 3)), ValueError, "offsets"),
    "offsets_not_monotone": (lambda b: b.update(offsets=torch.tensor([0, 4, 3, 5]), target=torch.randn(3, DIM)),
                             ValueError, "offsets"),
    "offsets_short_of_T": (lambda b: b.update(offsets=torch.tensor([0, 3, 4])), ValueError, "offsets"),
    "offsets_past_T": (lambda b: b.update(offsets=torch.tensor([0, 3, 6])), ValueError, "offsets"),
    "offsets_not_from_0": (lambda b: b.update(offsets=torch.tensor([1, 3, 5])), ValueError, "offsets"),
    "offsets_missing": (lambda b: b.update(offsets=None), ValueError, "offsets"),
    "offsets_empty": (lambda b: b.update(offsets=torch.zeros(0, dtype=torch.int64), target=torch.randn(0, DIM)),
                      ValueError, "offsets"),
    "lengths_and_offsets_with_jagged": (lambda b: b.update(lengths=torch.tensor([3, 2])), ValueError, "lengths"),
    "lengths_short_of_T": (lambda b: b.update(offsets=None, lengths=torch.tensor([3, 1])), ValueError, "lengths"),
    "lengths_float": (lambda b: b.update(offsets=None, lengths=torch.tensor([3.0, 2.0])), TypeError, "lengths"),
    "lengths_2d_with_jagged": (lambda b: b.update(offsets=None, lengths=torch.tensor([[3, 2]])), ValueError,
                               "lengths"),
    "timestamps_back_in_time": (lambda b: b.update(timestamps=torch.tensor([0.0, 5.0, 4.0, 1.0, 2.0])),
                                ValueError, "timestamps"),
    "timestamps_missing_for_gap": (lambda b: b.update(timestamps=None), ValueError, "timestamps"),
    "timestamps_wrong_length": (lambda b: b.update(timestamps=torch.arange(4.0)), ValueError, "timestamps"),
    "timestamps_2d_with_jagged": (lambda b: b.update(timestamps=torch.arange(5.0).view(5, 1)), ValueError,
                                  "timestamps"),
    "nan_values": (lambda b: b.update(values=with_value_at(b["values"], (2, 1), math.nan)), ValueError, "values"),
    "inf_values": (lambda b: b.update(values=with_value_at(b["values"], (4, 0), -math.inf)), ValueError, "values"),
    "nan_target": (lambda b: b.update(target=with_value_at(b["target"], (1, 3), math.nan)), ValueError, "target"),
    "inf_target": (lambda b: b.update(target=with_value_at(b["target"], (0, 0), math.inf)), ValueError, "target"),
    "target_rows_mismatch": (lambda b: b.update(target=torch.randn(3, DIM)), ValueError, "target"),
    # Dtypes against the layer's float32 parameters (torch.autocast is the supported way to mix).
    "float64_values_and_target": (lambda b: b.update(values=b["values"].double(), target=b["target"].double()),
                                  TypeError, "values"),
    "bfloat16_values": (lambda b: b.update(values=b["values"].bfloat16(), target=b["target"].bfloat16()),
                        TypeError, "values"),
    "target_dtype_unlike_values": (lambda b: b.update(target=b["target"].double()), TypeError, "target"),
    # Timestamps in gap mode: finite, of a type that holds them, in order whatever their dtype.
    "nan_timestamp": (lambda b: b.update(timestamps=torch.tensor([0.0, 5.0, math.nan, 1.0, 2.0])), ValueError,
                      "timestamps"),
    "inf_timestamp": (lambda b: b.update(timestamps=torch.tensor([0.0, 5.0, math.inf, 1.0, 2.0])), ValueError,
                      "timestamps"),
    "float16_epoch_seconds": (lambda b: b.update(timestamps=torch.full((5,), 1.7e9).half()), ValueError,
                              "timestamps"),
    "unsigned_back_in_time": (lambda b: b.update(timestamps=torch.tensor([0, 5, 4, 1, 2], dtype=torch.uint8)),
                              ValueError, "timestamps"),
    "bool_timestamps": (lambda b: b.update(timestamps=torch.ones(5, dtype=torch.bool)), TypeError, "timestamps"),
    "bfloat16_epoch_seconds": (lambda b: b.update(timestamps=(torch.tensor([0, 50, 90, 0, 20]) + 1_700_000_000)
                                                  .bfloat16()), ValueError, "timestamps"),
    "times_past_2_to_62": (lambda b: b.update(timestamps=torch.tensor([-9 * 10 ** 18, 0, 9 * 10 ** 18, 1, 2])),
                           ValueError, "timestamps"),
    # The meta device stands in for a second device on a CPU-only machine.
    "target_on_another_device": (lambda b: b.update(target=b["target"].to("meta")), ValueError, "target"),
    "timestamps_on_another_device": (lambda b: b.update(timestamps=b["timestamps"].to("meta")), ValueError,
                                     "timestamps"),
    # Jagged timestamps are checked in fixed mode too, where the layer reads none of them (the
    # padded form's shape is too): a caller passing the wrong ones has a bug to hear about.
    "timestamps_wrong_length_fixed_mode": (lambda b: b.update(timestamps=torch.arange(3.0), fixed=True), ValueError,
                                           "timestamps"),
    "timestamps_2d_fixed_mode": (lambda b: b.update(timestamps=torch.arange(5.0).view(5, 1), fixed=True),
                                 ValueError, "timestamps"),
    # A bound below the longest history would cut it where attention pads to max_len.
    "max_len_below_the_longest": (lambda b: b.update(max_len=2), ValueError, "max_len"),
    "max_len_float": (lambda b: b.update(max_len=3.0), TypeError, "max_len"),
    "max_len_negative": (lambda b: b.update(max_len=-1), ValueError, "max_len"),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_rejects_bad_jagged_input(case, layer):
    """MoSLayer on a spoiled jagged batch raises, naming the spoiled argument."""
    spoil, error, name = LAYER_CASES[case]
    batch = good_batch()
    spoil(batch)
    if batch.pop("fixed", False):
        layer = MoSLayer(MoSConfig(dim=DIM, num_heads=2, num_themes=3, session_len=2, session_mode="fixed"))
    with pytest.raises(error, match=named(name)):
        call(layer, **batch)


@pytest.mark.parametrize("name", ["values", "target"])
def test_float64_under_autocast_is_refused_by_name(layer, name):
    """Autocast casts float32 and leaves float64 alone, which then fails inside an op: refused
    first, naming the input (float32, float16 and bfloat16 inputs run under it)."""
    batch = good_batch()
    batch[name] = batch[name].double()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=named(name) + ".*float64"):
        call(layer, **batch)



def test_a_float64_layer_takes_float64_inputs_under_autocast(layer):
    """The refusal above is for float64 inputs into a layer that is not float64: a float64 layer
    under autocast (which leaves float64 alone) runs them."""
    batch = good_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(layer.double(), **{**batch, "values": batch["values"].double(), "target": batch["target"].double()})
    assert out.output.dtype == torch.float64 and torch.isfinite(out.output).all()


def test_autocast_and_every_timestamp_type_that_holds_the_times_work(layer):
    """Under torch.autocast the layer takes inputs unlike its parameters (the reference path casts
    per op); int32, uint8, float16 and float64 timestamps that hold the times are accepted, and
    cut the same sessions as int64 ones."""
    batch = good_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(layer, **{**batch, "values": batch["values"].bfloat16(), "target": batch["target"].bfloat16()})
    assert torch.isfinite(out.output.float()).all()
    times = torch.tensor([0, 5, 50, 1, 2])
    want = call(layer, **{**batch, "timestamps": times}).output
    for dtype in (torch.int32, torch.uint8, torch.float16, torch.float64):
        torch.testing.assert_close(call(layer, **{**batch, "timestamps": times.to(dtype)}).output, want, rtol=0, atol=0)


def test_a_max_len_at_or_above_the_longest_history_changes_nothing(layer):
    """max_len only saves reading the longest length back: any bound that holds gives the output
    of none (the CPU reference pads by length bucket whatever the bound)."""
    batch = good_batch()
    want = call(layer, **batch).output
    for max_len in (3, 4, 100):
        torch.testing.assert_close(call(layer, **batch, max_len=max_len).output, want, rtol=0, atol=0)


@pytest.mark.parametrize("offsets", [[0, 3, 4], [0, 3, 6]], ids=["short_of_T", "past_T"])
def test_fixed_mode_offsets_not_ending_at_T(offsets):
    """Without timestamps to trip over first, offsets that do not end at T are still refused as
    `offsets` (not as an internal tensor such as session_offsets)."""
    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(dim=DIM, num_heads=2, num_themes=3, session_len=2))
    with pytest.raises(ValueError, match=named("offsets")):
        layer(torch.randn(5, DIM), torch.randn(2, DIM), torch.tensor(offsets))


def padded_batch():
    values = torch.randn(2, 4, DIM)
    return dict(values=values, target=torch.randn(2, DIM), lengths=torch.tensor([3, 2]),
                timestamps=torch.tensor([[0.0, 5.0, 50.0, 0.0], [1.0, 2.0, 0.0, 0.0]]))


PADDED_CASES = {
    "lengths_missing": (lambda b: b.update(lengths=None), ValueError, "lengths"),
    "lengths_negative": (lambda b: b.update(lengths=torch.tensor([3, -1])), ValueError, "lengths"),
    "lengths_past_width": (lambda b: b.update(lengths=torch.tensor([5, 2])), ValueError, "lengths"),
    "lengths_float": (lambda b: b.update(lengths=torch.tensor([3.0, 2.0])), TypeError, "lengths"),
    "lengths_wrong_count": (lambda b: b.update(lengths=torch.tensor([3, 2, 1])), ValueError, "lengths"),
    "offsets_with_padded": (lambda b: b.update(offsets=torch.tensor([0, 3, 5])), ValueError, "offsets"),
    "timestamps_wrong_shape": (lambda b: b.update(timestamps=torch.zeros(2, 3)), ValueError, "timestamps"),
    "timestamps_back_in_time": (lambda b: b.update(timestamps=torch.tensor([[0.0, 5.0, 50.0, 0.0],
                                                                            [2.0, 1.0, 0.0, 0.0]])),
                                ValueError, "timestamps"),
    "nan_in_a_sequence": (lambda b: b.update(values=with_value_at(b["values"], (1, 1, 2), math.nan)), ValueError,
                          "values"),
    "timestamps_on_another_device": (lambda b: b.update(timestamps=b["timestamps"].to("meta")), ValueError,
                                     "timestamps"),
}


@pytest.mark.parametrize("case", PADDED_CASES)
def test_layer_rejects_bad_padded_input(case, layer):
    """MoSLayer on a spoiled padded batch [B, L, d] + lengths raises, naming the argument."""
    spoil, error, name = PADDED_CASES[case]
    batch = padded_batch()
    call(layer, **batch)  # the unspoiled batch is accepted
    spoil(batch)
    with pytest.raises(error, match=named(name)):
        call(layer, **batch)


def test_wrong_device_names_the_argument(layer):
    """Offsets on another device than values are refused by name (needs a second device)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: the CPU has no second device to mismatch")
    batch = good_batch()
    batch["offsets"] = batch["offsets"].cuda()
    with pytest.raises(ValueError, match=named("offsets")):
        call(layer, **batch)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_non_finite_prototypes_are_refused(backend, value):
    """The router's parameters get the inputs' finiteness check, by name, on every backend (layer
    and ops); with the data checks switched off the layer does not look (validate_inputs)."""
    if backend == "cuda":
        require_cuda_ext()
    spoiled = with_value_at(torch.randn(3, DIM), (1, 2), value)
    with pytest.raises(ValueError, match=named("prototypes") + ": expected finite values, got NaN or inf"):
        call_session_pool_route(prototypes=spoiled, backend=backend)
    torch.manual_seed(0)
    config = dict(dim=DIM, num_heads=2, num_themes=3, session_len=2, backend=backend)
    layer = MoSLayer(MoSConfig(**config))
    with torch.no_grad():
        layer.prototypes[1, 2] = value
    with pytest.raises(ValueError, match=named("prototypes")):
        call(layer, **good_batch())
    if backend == "reference":   # unchecked NaN scores are the caller's risk; the reference is safe with them
        unchecked = MoSLayer(MoSConfig(**config, validate_inputs=False))
        unchecked.load_state_dict(layer.state_dict())
        call(unchecked, **good_batch())


def test_layer_overrides_with_config():
    """MoSLayer(config, **overrides) is ambiguous and refused."""
    with pytest.raises(ValueError, match=named("overrides")):
        MoSLayer(MoSConfig(dim=DIM, num_heads=2), num_themes=2)


@pytest.mark.parametrize("backend, variable, wanted", [
    ("triton", "TRITON_INTERPRET", r"CUDA tensors \(or TRITON_INTERPRET=1\)"),
    ("cuda", "MOS_CUDA_EMULATE", "CUDA tensors"),
])
def test_a_kernel_backend_on_cpu_tensors_is_named_as_the_layers_option(monkeypatch, backend, variable, wanted):
    """Each op would name itself (session_pool_route, ...), which a layer's user never called."""
    monkeypatch.delenv(variable, raising=False)
    layer = MoSLayer(MoSConfig(dim=DIM, num_heads=2, num_themes=3, session_len=2, backend=backend))
    with pytest.raises(ValueError, match=rf"^MoSConfig\.backend: '{backend}' runs on {wanted}, got values on cpu; "
                                         r"build the layer with backend='auto'"):
        call(layer, **{k: v for k, v in good_batch().items() if k != "timestamps"})
