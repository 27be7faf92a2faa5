"""Differential fuzzing of the layer: hypothesis draws layer configurations and jagged batches,
and the Triton backend (under the interpreter on a CPU) must equal the reference (output,
auxiliary loss, every gradient); the reference must treat each example alone as it does inside a
batch, and padded input as jagged.

The draws cover the encoders, K, top_k, the session modes, max_theme_tokens, global_scope,
fusion and short_sessions, with empty histories, single-token sessions, one theme, equal
timestamps (ties) and long sessions. CI runs a fixed budget, the same examples every time
(derandomised, about a minute); a long run draws more:

    MOS_FUZZ_EXAMPLES=500 MOS_FUZZ_SEED=1 TRITON_INTERPRET=1 python -m pytest tests/test_layer_fuzz.py

A failing case hypothesis finds is to become a fixed case of tests/test_layer_backends.py.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import mos_kernels as mk
from mos import MoSConfig, MoSLayer
from tests.layer_cases import compare_with_reference
from tests.tolerances import assert_close

EXAMPLES = int(os.environ.get("MOS_FUZZ_EXAMPLES", "12"))
LONG_RUN = "MOS_FUZZ_SEED" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def layer_options(draw) -> dict:
    num_themes = draw(st.integers(1, 4))
    options = dict(
        encoder=draw(st.sampled_from(["target_attention", "transformer"])),
        num_themes=num_themes,
        top_k=draw(st.integers(1, min(num_themes, 2))),
        session_mode=draw(st.sampled_from(["fixed", "gap"])),
        session_len=draw(st.integers(1, 4)),
        max_session_len=draw(st.integers(2, 8)),
        max_theme_tokens=draw(st.one_of(st.none(), st.integers(1, 5))),
        global_scope=draw(st.sampled_from(["tokens", "sessions"])),
        fusion=draw(st.sampled_from(["residual", "concat"])),
        short_sessions=draw(st.integers(1, 3)),
        theme_mass=draw(st.booleans()),
        attention_mass=draw(st.booleans()),
        gap_seconds=10.0,
    )
    options["theme_recency"] = options["top_k"] == 1 and draw(st.booleans())   # one theme per session only
    return options


@st.composite
def histories(draw, max_examples: int = 4, max_length: int = 12):
    """(lengths, timestamps [T]): empty histories allowed; gaps of 0 (ties), under and over the
    10-s session cut, so sessions of one token and long ones both occur."""
    lengths = draw(st.lists(st.integers(0, max_length), min_size=1, max_size=max_examples))
    gaps = draw(st.lists(st.sampled_from([0, 0, 3, 9, 11, 60]), min_size=sum(lengths), max_size=sum(lengths)))
    times, at = [], 0
    for length in lengths:
        clock = 1_000
        for gap in gaps[at:at + length]:
            clock += gap
            times.append(clock)
        at += length
    return lengths, torch.tensor(times, dtype=torch.int64)


@FUZZ
@seed(int(os.environ.get("MOS_FUZZ_SEED", "0")))
@given(options=layer_options(), batch=histories())
def test_triton_equals_the_reference(options, batch):
    lengths, timestamps = batch
    compare_with_reference(options, lengths, "triton", torch.device("cpu"),
                           timestamps=timestamps if options["session_mode"] == "gap" else None)


@FUZZ
@seed(int(os.environ.get("MOS_FUZZ_SEED", "0")) + 1)
@given(options=layer_options(), batch=histories())
def test_an_example_alone_equals_itself_in_a_batch_and_padded_equals_jagged(options, batch):
    lengths, timestamps = batch
    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(dim=16, num_heads=2, backend="reference", **options)).eval()
    offsets = mk.offsets_from_lengths(torch.tensor(lengths))
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(int(offsets[-1]), 16, generator=gen)
    target = torch.randn(len(lengths), 16, generator=gen)
    gap = options["session_mode"] == "gap"
    with torch.no_grad():
        batched = layer(values, target, offsets, timestamps=timestamps if gap else None).output
        for b, length in enumerate(lengths):
            rows = slice(int(offsets[b]), int(offsets[b + 1]))
            alone = layer(values[rows], target[b:b + 1], torch.tensor([0, length]),
                          timestamps=timestamps[rows] if gap else None).output
            assert_close(alone[0], batched[b], "layer", msg=f"example {b} alone")
        width = max(lengths)
        padded = torch.zeros(len(lengths), width, 16)
        padded_times = torch.zeros(len(lengths), width, dtype=torch.int64)
        for b, length in enumerate(lengths):
            padded[b, :length] = values[int(offsets[b]):int(offsets[b + 1])]
            padded_times[b, :length] = timestamps[int(offsets[b]):int(offsets[b + 1])]
        from_padded = layer(padded, target, lengths=torch.tensor(lengths),
                            timestamps=padded_times if gap else None).output
        assert_close(from_padded, batched, "layer", msg="padded")

