"""Bad input fails at once, naming the argument the caller passed (style.md: errors name the
argument, what was expected and what came).

Messages start with the argument's name ("offsets: expected ..."), so every match is anchored
at the start: an error about an internal tensor (say "session_offsets" when the caller passed
"offsets") does not count.
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from mos import MoSLayer
from mos.config import MoSConfig
from tests.conftest import require_cuda_ext

DIM = 4


def named(name: str) -> str:
    """A match pattern: the message starts with `name`, as a whole word."""
    return rf"^{name}(?![\w.])"


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


def _nan_at(t, index, value):
    t = t.clone()
    t[index] = value
    return t


LAYER_CASES = {
    # name: (change to good_batch, exception, argument named)
    "float_offsets": (lambda b: b.update(offsets=b["offsets"].float()), TypeError, "offsets"),
    "int32_offsets": (lambda b: b.update(offsets=b["offsets"].int()), TypeError, "offsets"),
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
    "lengths_with_jagged": (lambda b: b.update(lengths=torch.tensor([3, 2])), ValueError, "lengths"),
    "timestamps_back_in_time": (lambda b: b.update(timestamps=torch.tensor([0.0, 5.0, 4.0, 1.0, 2.0])),
                                ValueError, "timestamps"),
    "timestamps_missing_for_gap": (lambda b: b.update(timestamps=None), ValueError, "timestamps"),
    "timestamps_wrong_length": (lambda b: b.update(timestamps=torch.arange(4.0)), ValueError, "timestamps"),
    "timestamps_2d_with_jagged": (lambda b: b.update(timestamps=torch.arange(5.0).view(5, 1)), ValueError,
                                  "timestamps"),
    "nan_values": (lambda b: b.update(values=_nan_at(b["values"], (2, 1), math.nan)), ValueError, "values"),
    "inf_values": (lambda b: b.update(values=_nan_at(b["values"], (4, 0), -math.inf)), ValueError, "values"),
    "nan_target": (lambda b: b.update(target=_nan_at(b["target"], (1, 3), math.nan)), ValueError, "target"),
    "inf_target": (lambda b: b.update(target=_nan_at(b["target"], (0, 0), math.inf)), ValueError, "target"),
    "target_rows_mismatch": (lambda b: b.update(target=torch.randn(3, DIM)), ValueError, "target"),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_rejects_bad_jagged_input(case, layer):
    """MoSLayer on a spoiled jagged batch raises, naming the spoiled argument."""
    spoil, error, name = LAYER_CASES[case]
    batch = good_batch()
    spoil(batch)
    with pytest.raises(error, match=named(name)):
        call(layer, **batch)


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
    "nan_in_a_sequence": (lambda b: b.update(values=_nan_at(b["values"], (1, 1, 2), math.nan)), ValueError,
                          "values"),
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
    spoiled = _nan_at(torch.randn(3, DIM), (1, 2), value)
    with pytest.raises(ValueError, match=named("prototypes") + ": expected finite values, got NaN or inf"):
        _pool_route(prototypes=spoiled, backend=backend)
    if backend == "reference":   # theme_route has the reference alone
        with pytest.raises(ValueError, match=named("prototypes")):
            _route(prototypes=spoiled)
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


CONFIG_CASES = {
    "num_themes_0": (dict(num_themes=0), "MoSConfig.num_themes"),
    "num_themes_negative": (dict(num_themes=-2), "MoSConfig.num_themes"),
    "top_k_above_K": (dict(num_themes=3, top_k=4), "MoSConfig.top_k"),
    "top_k_0": (dict(top_k=0), "MoSConfig.top_k"),
    "fusion_sum": (dict(fusion="sum"), "MoSConfig.fusion"),
    "encoder_lstm": (dict(encoder="lstm"), "MoSConfig.encoder"),
    "readout_max": (dict(readout="max"), "MoSConfig.readout"),
    "global_scope_items": (dict(global_scope="items"), "MoSConfig.global_scope"),
    "session_mode_daily": (dict(session_mode="daily"), "MoSConfig.session_mode"),
    "backend_rocm": (dict(backend="rocm"), "MoSConfig.backend"),
    "max_theme_tokens_0": (dict(max_theme_tokens=0), "MoSConfig.max_theme_tokens"),
    "session_len_0": (dict(session_len=0), "MoSConfig.session_len"),
    "temperature_0": (dict(temperature=0.0), "MoSConfig.temperature"),
    "gap_seconds_negative": (dict(gap_seconds=-1.0), "MoSConfig.gap_seconds"),
    "heads_not_dividing_dim": (dict(dim=10, num_heads=4), "MoSConfig.dim"),
    "negative_aux_weight": (dict(codebook_weight=-0.5), "MoSConfig.codebook_weight"),
    "nan_aux_weight": (dict(load_balance_weight=math.nan), "MoSConfig.load_balance_weight"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_rejects_bad_options(case):
    """MoSConfig refuses unknown or out-of-range option values, naming the field."""
    options, name = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=named(name.replace(".", r"\."))):
        MoSConfig(**options)


def test_layer_overrides_with_config():
    """MoSLayer(config, **overrides) is ambiguous and refused."""
    with pytest.raises(ValueError, match=named("overrides")):
        MoSLayer(MoSConfig(dim=DIM, num_heads=2), num_themes=2)


# ---- ops ---------------------------------------------------------------------------------------

def _route(pooled=None, prototypes=None, **kw):
    pooled = torch.randn(4, DIM) if pooled is None else pooled
    prototypes = torch.randn(3, DIM) if prototypes is None else prototypes
    return mk.theme_route(pooled, prototypes, **kw)


def _pool_route(values=None, session_offsets=None, prototypes=None, **kw):
    values = torch.randn(5, DIM) if values is None else values
    session_offsets = torch.tensor([0, 2, 5]) if session_offsets is None else session_offsets
    prototypes = torch.randn(3, DIM) if prototypes is None else prototypes
    return mk.session_pool_route(values, session_offsets, prototypes, **kw)


def _dispatch(themes=None, gate=None, session_offsets=None, session_example=None, **kw):
    themes = torch.tensor([[0], [2], [1]]) if themes is None else themes
    gate = torch.ones(3, 1) if gate is None else gate
    session_offsets = torch.tensor([0, 2, 3, 6]) if session_offsets is None else session_offsets
    session_example = torch.tensor([0, 0, 1]) if session_example is None else session_example
    kw = {"num_examples": 2, "num_themes": 3, **kw}
    return mk.theme_dispatch(themes, gate, session_offsets, session_example, **kw)


def _attention(**kw):
    args = dict(tokens=torch.randn(5, DIM), query=torch.randn(4, DIM), w_key=torch.randn(2, DIM, DIM), b_key=None,
                w_value=torch.randn(2, DIM, DIM), b_value=None, segment_offsets=torch.tensor([0, 1, 3, 3, 5]),
                num_heads=2)
    args.update(kw)
    return mk.expert_target_attention(**args)


OP_CASES = {
    # name: (call, exception, argument named)
    "route_zero_prototypes": (lambda: _route(prototypes=torch.randn(0, DIM)), ValueError, "prototypes"),
    "route_top_k_above_K": (lambda: _route(top_k=4), ValueError, "top_k"),
    "route_top_k_0": (lambda: _route(top_k=0), ValueError, "top_k"),
    "route_prototype_width": (lambda: _route(prototypes=torch.randn(3, DIM + 1)), ValueError, "prototypes"),
    "route_nan_pooled": (lambda: _route(pooled=torch.full((2, DIM), math.nan)), ValueError, "pooled"),
    "route_int_prototypes": (lambda: _route(prototypes=torch.ones(3, DIM, dtype=torch.int64)), TypeError,
                             "prototypes"),
    "route_temperature_0": (lambda: _route(temperature=0.0), ValueError, "temperature"),
    "pool_route_zero_prototypes": (lambda: _pool_route(prototypes=torch.randn(0, DIM)), ValueError, "prototypes"),
    "pool_route_top_k_above_K": (lambda: _pool_route(top_k=4), ValueError, "top_k"),
    "pool_route_offsets_short": (lambda: _pool_route(session_offsets=torch.tensor([0, 2, 4])), ValueError,
                                 "session_offsets"),
    "pool_int_values": (lambda: mk.session_pool(torch.ones(3, DIM, dtype=torch.int64), torch.tensor([0, 3])),
                        TypeError, "values"),
    "pool_inf_values": (lambda: mk.session_pool(torch.tensor([[math.inf] * DIM]), torch.tensor([0, 1])),
                        ValueError, "values"),
    "pool_float_offsets": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0.0, 3.0])), TypeError,
                           "session_offsets"),
    "pool_offsets_not_monotone": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0, 2, 1, 3])),
                                  ValueError, "session_offsets"),
    "pool_offsets_not_from_0": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([1, 3])), ValueError,
                                "session_offsets"),
    "pool_offsets_2d": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([[0, 3]])), ValueError,
                        "session_offsets"),
    "sessionize_unknown_mode": (lambda: mk.sessionize(torch.tensor([0, 3]), mode="daily"), ValueError, "mode"),
    "sessionize_gap_without_timestamps": (lambda: mk.sessionize(torch.tensor([0, 3]), mode="gap"), ValueError,
                                          "timestamps"),
    "sessionize_back_in_time": (lambda: mk.sessionize(torch.tensor([0, 3]), mode="gap",
                                                      timestamps=torch.tensor([0.0, 2.0, 1.0])),
                                ValueError, "timestamps"),
    "sessionize_session_len_0": (lambda: mk.sessionize(torch.tensor([0, 3]), session_len=0), ValueError,
                                 "session_len"),
    "sessionize_float_offsets": (lambda: mk.sessionize(torch.tensor([0.0, 3.0])), TypeError, "offsets"),
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
    "grouped_linear_width": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM + 1, 2), None,
                                                       torch.tensor([0, 1, 3])), ValueError, "x"),
    "grouped_linear_offsets_count": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2), None,
                                                               torch.tensor([0, 3])), ValueError, "expert_offsets"),
    "grouped_linear_offsets_short": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2), None,
                                                               torch.tensor([0, 1, 2])), ValueError,
                                     "expert_offsets"),
    "grouped_linear_bias_shape": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(2, DIM, 2),
                                                            torch.randn(2, 3), torch.tensor([0, 1, 3])),
                                  ValueError, "bias"),
    "grouped_linear_weight_2d": (lambda: mk.grouped_linear(torch.randn(3, DIM), torch.randn(DIM, 2), None,
                                                           torch.tensor([0, 3])), ValueError, "weight"),
    "attention_heads_not_dividing": (lambda: _attention(num_heads=3), ValueError, "num_heads"),
    "attention_query_rows": (lambda: _attention(query=torch.randn(3, DIM)), ValueError, "query"),
    "attention_segments_count": (lambda: _attention(segment_offsets=torch.tensor([0, 1, 5])), ValueError,
                                 "segment_offsets"),
    "attention_gate_without_index": (lambda: _attention(row_gate=torch.ones(5)), ValueError, "row_gate"),
    "attention_nan_tokens": (lambda: _attention(tokens=torch.full((5, DIM), math.nan)), ValueError, "tokens"),
    "self_attention_k_shape": (lambda: mk.jagged_self_attention(torch.randn(3, DIM), torch.randn(2, DIM),
                                                                torch.randn(3, DIM), torch.tensor([0, 3]),
                                                                num_heads=2), ValueError, "k"),
    "self_attention_offsets_short": (lambda: mk.jagged_self_attention(torch.randn(3, DIM), torch.randn(3, DIM),
                                                                      torch.randn(3, DIM), torch.tensor([0, 2]),
                                                                      num_heads=2), ValueError, "segment_offsets"),
    "to_padded_max_len_too_small": (lambda: mk.jagged_to_padded(torch.randn(5, DIM), torch.tensor([0, 4, 5]), 3),
                                    ValueError, "max_len"),
    "to_jagged_lengths_past_width": (lambda: mk.padded_to_jagged(torch.randn(2, 3, DIM), torch.tensor([4, 0])),
                                     ValueError, "lengths"),
    "to_jagged_1d": (lambda: mk.padded_to_jagged(torch.randn(3), torch.tensor([1, 1, 1])), ValueError, "padded"),
    "unknown_backend": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0, 3]), backend="rocm"),
                        ValueError, "session_pool: backend"),
}


@pytest.mark.parametrize("case", OP_CASES)
def test_op_rejects_bad_input(case):
    """Every op refuses a bad argument by name."""
    fn, error, name = OP_CASES[case]
    with pytest.raises(error, match=named(name)):
        fn()
