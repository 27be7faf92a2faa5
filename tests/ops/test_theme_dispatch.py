"""theme_dispatch: tokens to (theme, example) segments, checked every way the op is checked.

Against the loop oracle (tests/oracles.py) in float64 on awkward lengths, and on random shapes
(hypothesis); against its invariants (a permutation for top_k = 1, counts by theme and example,
time order in every segment), which need no oracle; every kernel backend against the reference,
bit for bit, with the gate's gradient; and the operator registration (opcheck). Kernel outputs
are poisoned before they run (tests/ops/conftest.py). Bad arguments and strided views: the
tables at the end, run by test_contract.py; 4M tokens on the GPU: the tests marked gpu.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from tests import oracles
from tests.gpu_cases import needs_cuda, workload
from tests.input_cases import NUM_THEMES, STRIDED_LENGTHS, strided_layout
from tests.kernel_cases import (DISPATCH_CASES, LENGTH_IDS, LENGTHS, SESSION_LEN, SHAPES, assert_matches, backends,
                                dispatch_inputs, grads_of, make_sessions, opcheck_inputs, random_themes,
                                run_dispatch)
from tests.oracles import generator, randn


# ---- against the loop oracle ------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends("theme_dispatch"))
@pytest.mark.parametrize("case", LENGTH_IDS)
@pytest.mark.parametrize("num_themes,top_k,pattern", DISPATCH_CASES)
@pytest.mark.parametrize("max_theme_tokens", [None, 1, 3])
def test_theme_dispatch_matches_oracle(case, num_themes, top_k, pattern, max_theme_tokens, backend, device):
    """gather_index, theme_offsets, inverse_index, expert_offsets and row_gate equal the loop
    oracle's, and the gate's gradient is the sum of its rows' cotangents."""
    lengths, session_len = LENGTHS[case], SESSION_LEN[case]
    gen = generator(len(lengths) * 31 + num_themes)
    themes, gate, so, se = dispatch_inputs(lengths, session_len, num_themes, top_k, pattern, gen, device)
    gate = gate.requires_grad_()
    b = len(lengths)
    got = run_dispatch(themes, gate, so, se, b, num_themes, max_theme_tokens, backend)
    ref_gate = gate.detach().cpu().requires_grad_()
    index, row_gate, theme_offsets, inverse = oracles.theme_dispatch(themes.cpu(), ref_gate, so.cpu(), se.cpu(),
                                                                     num_examples=b, num_themes=num_themes,
                                                                     max_theme_tokens=max_theme_tokens)
    assert torch.equal(got.gather_index.cpu(), index)
    assert torch.equal(got.theme_offsets.cpu(), theme_offsets)
    assert torch.equal(got.inverse_index.cpu(), inverse)
    assert torch.equal(got.expert_offsets.cpu(), theme_offsets[::b])
    assert torch.equal(got.segment_lengths.cpu(), (theme_offsets[1:] - theme_offsets[:-1]).view(num_themes, b))
    assert_matches(got.row_gate, row_gate, "float64")
    w = randn(gen, index.numel())
    (g_lib,) = grads_of([got.row_gate], [w], [gate])
    (g_ref,) = grads_of([row_gate], [w], [ref_gate])
    assert_matches(g_lib, g_ref, "float64")


@pytest.mark.parametrize("backend", backends("theme_dispatch"))
@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5), session_len=st.integers(1, 4),
       num_themes=st.integers(1, 4), top_k=st.integers(1, 2), max_theme_tokens=st.one_of(st.none(), st.integers(1, 4)),
       seed=st.integers(0, 2**16))
def test_theme_dispatch_sweep(backend, lengths, session_len, num_themes, top_k, max_theme_tokens, seed):
    """Random shapes: dispatch equals the oracle (on the test device; hypothesis takes no fixtures)."""
    top_k = min(top_k, num_themes)
    gen = generator(seed)
    themes, gate, so, se = dispatch_inputs(lengths, session_len, num_themes, top_k, "random", gen, "cpu")
    device = os.environ.get("MOS_TEST_DEVICE", "cpu")
    got = run_dispatch(themes.to(device), gate.to(device), so.to(device), se.to(device), len(lengths), num_themes,
                       max_theme_tokens, backend)
    index, row_gate, theme_offsets, inverse = oracles.theme_dispatch(
        themes, gate, so, se, num_examples=len(lengths), num_themes=num_themes, max_theme_tokens=max_theme_tokens)
    assert torch.equal(got.gather_index.cpu(), index)
    assert torch.equal(got.theme_offsets.cpu(), theme_offsets)
    assert torch.equal(got.inverse_index.cpu(), inverse)
    assert torch.equal(got.row_gate.cpu(), row_gate)


def _segments(dispatch):
    o = dispatch.theme_offsets.cpu().tolist()
    index = dispatch.gather_index.cpu().tolist()
    return [index[o[g]:o[g + 1]] for g in range(len(o) - 1)]


@pytest.mark.parametrize("backend", backends("theme_dispatch"))
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
@pytest.mark.parametrize("num_themes,top_k,pattern", DISPATCH_CASES)
def test_theme_dispatch_invariants(lengths, num_themes, top_k, pattern, backend, device):
    """Without max_theme_tokens: every token appears top_k times, once per chosen theme (top_k = 1: a
    permutation, inverse checked, and inverse_index is that inverse); theme_offsets' steps count
    the tokens of (theme, example); every segment keeps time order; expert_offsets =
    theme_offsets[::B]."""
    gen = generator(7)
    themes, gate, so, se = dispatch_inputs(lengths, 3, num_themes, top_k, pattern, gen, device)
    b, total = len(lengths), sum(lengths)
    got = run_dispatch(themes, gate, so, se, b, num_themes, None, backend)
    index = got.gather_index.cpu()
    assert index.numel() == total * top_k
    if top_k == 1:
        assert torch.equal(index.sort().values, torch.arange(total))
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(total)
        assert torch.equal(index[inverse], torch.arange(total))
        assert torch.equal(inverse[index], torch.arange(total))
        assert torch.equal(got.inverse_index.cpu(), inverse[:, None])
    else:
        assert torch.equal(torch.bincount(index, minlength=total), torch.full((total,), top_k))
    rows = got.inverse_index.cpu()
    assert torch.equal(index[rows], torch.arange(total)[:, None].expand(total, top_k))
    # Counts by (theme, example), from the tokens' own sessions.
    token_example = torch.repeat_interleave(torch.arange(b), torch.tensor(lengths))
    token_session = torch.repeat_interleave(torch.arange(se.numel()), (so[1:] - so[:-1]).cpu())
    counts = torch.zeros(num_themes, b, dtype=torch.int64)
    for t in range(total):
        for k in themes[token_session[t]].tolist():
            counts[k, token_example[t]] += 1
    assert torch.equal(got.segment_lengths.cpu(), counts)
    for g, rows in enumerate(_segments(got)):
        k, ex = divmod(g, b)
        assert all(r0 < r1 for r0, r1 in zip(rows, rows[1:])), f"segment {g} out of time order: {rows}"
        assert all(int(token_example[r]) == ex for r in rows), f"segment {g} holds another example's token"
        assert all(k in themes[token_session[r]].tolist() for r in rows), f"segment {g} holds another theme"
    assert torch.equal(got.expert_offsets, got.theme_offsets[::b])
    if pattern == "one":
        assert int(got.segment_lengths[top_k:].sum()) == 0


@pytest.mark.parametrize("backend", backends("theme_dispatch"))
@pytest.mark.parametrize("max_theme_tokens", [1, 2, 5])
def test_theme_dispatch_max_theme_tokens_keeps_newest(max_theme_tokens, backend, device):
    """Capacity keeps the newest tokens of each subsequence: one example, sessions of 2 tokens
    alternating themes 0,1,0,1 -> theme 0 holds tokens 0,1,4,5, theme 1 holds 2,3,6,7."""
    so = torch.tensor([0, 2, 4, 6, 8], device=device)
    se = torch.zeros(4, dtype=torch.int64, device=device)
    themes = torch.tensor([[0], [1], [0], [1]], device=device)
    got = run_dispatch(themes, torch.ones(4, 1, device=device), so, se, 1, 2, max_theme_tokens, backend)
    expected = [[0, 1, 4, 5][-max_theme_tokens:], [2, 3, 6, 7][-max_theme_tokens:]]
    assert _segments(got) == expected


@pytest.mark.parametrize("backend", backends("theme_dispatch"))
def test_theme_dispatch_no_examples(backend, device):
    """B = 0: no rows, K*B+1 = 1 theme offset, K+1 zero expert offsets."""
    got = run_dispatch(torch.zeros(0, 1, dtype=torch.int64, device=device), torch.zeros(0, 1, device=device),
                       torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64,
                                                                                      device=device), 0, 3, None)
    assert got.gather_index.numel() == 0 and got.theme_offsets.cpu().tolist() == [0]
    assert got.expert_offsets.cpu().tolist() == [0, 0, 0, 0]



# ---- kernel backends against the reference ----------------------------------------------------


def _random_dispatch(lengths, session_len, num_themes, top_k, max_theme_tokens, device):
    """Sessions of `lengths`, random themes and gates in [0, 1): (sessions, theme_dispatch's
    positional arguments, its keyword arguments)."""
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, device=device)
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    return sessions, args, dict(num_examples=len(lengths), num_themes=num_themes, max_theme_tokens=max_theme_tokens)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_themes,top_k", [(1, 1), (3, 2), (16, 1), (5, 5), (40, 2)])
@pytest.mark.parametrize("max_theme_tokens", [None, 1, 5])
def test_theme_dispatch_is_identical(shape, num_themes, top_k, max_theme_tokens, device, kernel_backend):
    lengths, session_len = SHAPES[shape]
    _, args, kwargs = _random_dispatch(lengths, session_len, num_themes, top_k, max_theme_tokens, device)
    ref = mk.theme_dispatch(*args, backend="reference", **kwargs)
    out = mk.theme_dispatch(*args, backend=kernel_backend, **kwargs)
    for name in ("gather_index", "row_gate", "inverse_index", "theme_offsets"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_dispatch_all_sessions_on_one_theme(device, kernel_backend):
    _, sessions = make_sessions([9, 0, 20], 4, device)
    themes = torch.full((sessions.num_sessions, 1), 2, dtype=torch.int64, device=device)
    gate = torch.ones(themes.shape, device=device)
    out = mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                            num_examples=3, num_themes=4, backend=kernel_backend)
    assert torch.equal(out.gather_index, torch.arange(29, device=device))
    assert out.segment_lengths.tolist() == [[0, 0, 0], [0, 0, 0], [9, 0, 20], [0, 0, 0]]


def _dispatch_both(args, kwargs, backend):
    """Every Dispatch field, and the gate's gradient under a fixed random cotangent."""
    gate = args[1].detach().requires_grad_()
    out = mk.theme_dispatch(args[0], gate, *args[2:], backend=backend, **kwargs)
    w = torch.randn(out.row_gate.shape, generator=torch.Generator().manual_seed(3)).to(gate)
    (g_gate,) = torch.autograd.grad((out.row_gate * w).sum(), gate) if out.row_gate.numel() else (gate * 0,)
    return [out.gather_index, out.row_gate, out.inverse_index, out.theme_offsets, g_gate]


# Blocks of sessions whose rows span several fill tiles, examples whose sessions take several
# count steps (550 sessions; 16 to 512 sessions a step by K), and top_k from 1 to 12 (8 of 8
# themes; 12 launches the 16-choice fill with 64-row tiles).
DISPATCH_LAYOUTS = {
    "tiles_crossed": ([300, 0, 517, 1], 5),
    "count_steps_crossed": ([1100, 3], 2),
    "shapes": ([0, 5, 0, 17, 3, 0], 4),
}


@pytest.mark.parametrize("layout", list(DISPATCH_LAYOUTS))
@pytest.mark.parametrize("num_themes,top_k", [(8, 8), (9, 3), (2, 1), (64, 2), (20, 12)])
@pytest.mark.parametrize("max_theme_tokens", [None, 2, 50])
def test_dispatch_given_example_session_offsets_matches_reference(layout, num_themes, top_k, max_theme_tokens, device,
                                                                  kernel_backend):
    """Sessions.example_session_offsets given or built from session_example: the same Dispatch
    (and gate gradient) as the reference, bit for bit."""
    lengths, session_len = DISPATCH_LAYOUTS[layout]
    sessions, args, kwargs = _random_dispatch(lengths, session_len, num_themes, top_k, max_theme_tokens, device)
    ref = _dispatch_both(args, kwargs, "reference")
    built = _dispatch_both(args, kwargs, kernel_backend)
    given = _dispatch_both(args, dict(kwargs, example_session_offsets=sessions.example_session_offsets),
                           kernel_backend)
    for name, r, b, g in zip(("gather_index", "row_gate", "inverse_index", "theme_offsets", "gate grad"),
                             ref, built, given):
        assert torch.equal(b, r), name
        assert torch.equal(g, r), name


@pytest.mark.parametrize("max_theme_tokens", [None, 1])
def test_dispatch_empty_sessions_and_themes(max_theme_tokens, device, kernel_backend):
    """Empty sessions (repeated offsets) inside a block, examples without sessions, themes no
    session chose, and a float64 gate: equal to the reference."""
    so = torch.tensor([0, 3, 3, 3, 7, 7, 12, 12], device=device)
    se = torch.tensor([1, 1, 1, 1, 3, 3, 3], device=device)
    themes = torch.tensor([[4, 0], [1, 4], [0, 2], [4, 1], [2, 4], [0, 1], [4, 0]], device=device)
    gate = torch.rand(themes.shape, dtype=torch.float64, device=device)
    eso = torch.tensor([0, 0, 4, 4, 7, 7], device=device)
    kwargs = dict(num_examples=5, num_themes=6, max_theme_tokens=max_theme_tokens)
    ref = _dispatch_both((themes, gate, so, se), kwargs, "reference")
    got = _dispatch_both((themes, gate, so, se), dict(kwargs, example_session_offsets=eso), kernel_backend)
    for r, g in zip(ref, got):
        assert torch.equal(g, r)


def test_dispatch_is_bitwise_deterministic(device, kernel_backend):
    """Two runs give the same bits: outputs and the gate's (bf16) gradient."""
    _, sessions = make_sessions([300, 0, 517, 1], 5, device)
    themes = random_themes(sessions.num_sessions, 8, 4, device)
    gate = torch.rand(themes.shape, device=device).to(torch.bfloat16)
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=4, num_themes=8, max_theme_tokens=40,
                  example_session_offsets=sessions.example_session_offsets)
    first, second = _dispatch_both(args, kwargs, kernel_backend), _dispatch_both(args, kwargs, kernel_backend)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                  b.view(torch.uint8) if b.is_floating_point() else b)


def test_dispatch_refuses_rows_past_32_bits(device, kernel_backend):
    """T * top_k >= 2^31 theme rows: a clear error before any kernel (the kernels count in int32)."""
    themes = torch.tensor([[0, 1]], device=device)
    so = torch.tensor([0, 2**30], device=device)
    with mk.data_checks(False), pytest.raises(ValueError, match=r"num_tokens: expected num_tokens \* top_k < 2\^31"):
        mk.theme_dispatch(themes, torch.ones(1, 2, device=device), so, torch.zeros(1, dtype=torch.int64, device=device),
                          num_examples=1, num_themes=2, num_tokens=2**30, backend=kernel_backend)



# ---- operator registration --------------------------------------------------------------------

@pytest.mark.parametrize("max_theme_tokens", [0, 2])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_opcheck_theme_dispatch(max_theme_tokens, gate_dtype, device, kernel_backend):
    """Schema, fake and autograd: the gate's gradient comes through the op's registered backward."""
    sessions, _, _, themes = opcheck_inputs(device)
    gate = torch.rand(themes.shape, dtype=gate_dtype, device=device).requires_grad_()
    eso = sessions.example_session_offsets
    # opcheck's AOT test adds every output into one sum that starts as the int64 gather_index and
    # cannot take the float row_gate; test_layer_compile.py traces the op forward and backward.
    torch.library.opcheck(kernel_ops(kernel_backend).theme_dispatch.default,
                          (themes, gate, sessions.session_offsets, sessions.session_example, eso, 19, 3,
                           max_theme_tokens),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---- at GPU scale (marked gpu: the GPU check selects them with -m gpu; skipped without CUDA) ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 64)])
def test_dispatch_large_is_identical(top_k, max_theme_tokens, kernel_backend):
    offsets, sessions, _, _ = workload(4_000_000, 8, 8, top_k, torch.float32)
    themes = random_themes(sessions.num_sessions, 8, top_k, "cuda")
    gate = torch.rand(themes.shape, device="cuda")
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=offsets.numel() - 1, num_themes=8, max_theme_tokens=max_theme_tokens)
    ref = mk.theme_dispatch(*args, backend="reference", **kwargs)
    out = mk.theme_dispatch(*args, backend=kernel_backend, **kwargs)
    for name in ("gather_index", "row_gate", "inverse_index", "theme_offsets"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

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
    "dispatch_float_num_themes": (lambda: _dispatch(num_themes=3.0), TypeError, "num_themes"),
    "dispatch_float_max_theme_tokens": (lambda: _dispatch(max_theme_tokens=2.5), TypeError, "max_theme_tokens"),
    "dispatch_nan_gate": (lambda: _dispatch(gate=torch.tensor([[1.0], [math.nan], [1.0]])), ValueError, "gate"),
    "dispatch_no_examples_for_sessions": (lambda: _dispatch(num_examples=0), ValueError, "num_examples"),
    "dispatch_segments_past_int64": (lambda: _dispatch(num_examples=2 ** 62), ValueError, "num_examples"),
}


def _dispatch_case(device):
    _, sessions, themes, gate, _ = strided_layout(device)

    def run(backend, themes, gate, session_offsets, session_example):
        d = mk.theme_dispatch(themes, gate, session_offsets, session_example, num_examples=len(STRIDED_LENGTHS),
                              num_themes=NUM_THEMES, backend=backend)
        return d.gather_index, d.row_gate, d.inverse_index, d.theme_offsets
    return run, dict(themes=themes, gate=gate, session_offsets=sessions.session_offsets,
                     session_example=sessions.session_example)


STRIDED_CASES = {"theme_dispatch": _dispatch_case}
