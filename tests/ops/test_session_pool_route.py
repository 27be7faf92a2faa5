"""session_pool_route (and session_pool): session means and their routing to themes.

Against the loop oracle (tests/oracles.py) in float64 on awkward lengths, on every backend: the
pooling, the fused op (pooling and routing: themes, gate, probabilities, scores), and the router's
gradient through dispatch and gather; the routing alone on one-token sessions (whose means are
their tokens): temperatures, top-k up to 3 of 7 themes, no sessions, the forward gate exactly 1
in every dtype, a zero session vector. Kernel outputs are poisoned before they run
(tests/ops/conftest.py). Each kernel backend against the reference and the operator registration:
test_session_pool_route_kernels.py. Bad arguments and strided views: the tables at the end, run by
test_contract.py; 2M and 4M tokens on the GPU: the tests marked gpu.
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from tests import oracles
from tests.gpu_cases import GPU_DTYPES, needs_cuda, pool_route_run, workload
from tests.input_cases import DIM, NUM_THEMES, STRIDED_DIM, TOP_K, call_session_pool_route, strided_layout
from tests.kernel_cases import (ALL_DTYPES, LENGTH_IDS, LENGTHS, SESSION_LEN, assert_matches, backends,
                                check_forward_backward, jagged, precision, random_values, run_dispatch,
                                skip_interpreted_bf16)
from tests.oracles import generator, randn
from tests.tolerances import assert_close


# ---- against the loop oracle ------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends("session_pool"))
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTH_IDS)
@pytest.mark.parametrize("session_len", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_session_pool_matches_oracle(lengths, session_len, seed, backend, device):
    """Mean of every session, forward and backward."""
    gen = generator(seed)
    dtype, kind = precision(backend)
    values, offsets = jagged(lengths, 5, gen, dtype=dtype, device=device)
    session_offsets = oracles.sessionize(offsets.cpu(), mode="fixed", session_len=session_len)[0].to(device)
    check_forward_backward(lambda values: mk.session_pool(values, session_offsets, backend=backend),
                           lambda values: oracles.session_pool(values, session_offsets.cpu()),
                           {"values": values}, kind=kind, grad_kind=kind, gen=gen)


@pytest.mark.parametrize("backend", backends("session_pool"))
def test_session_pool_empty_sessions_are_zero(backend, device):
    """Empty sessions (first, middle, last) pool to exact zeros; gradients stay finite."""
    gen = generator(3)
    values = randn(gen, 6, 4, device=device).float().requires_grad_()   # fp32: every backend's dtype
    session_offsets = torch.tensor([0, 0, 2, 2, 6, 6], device=device)
    out = mk.session_pool(values, session_offsets, backend=backend)
    assert torch.equal(out[[0, 2, 4]], torch.zeros(3, 4, dtype=out.dtype, device=device))
    out.sum().backward()
    assert torch.isfinite(values.grad).all()


@pytest.mark.parametrize("backend", backends("session_pool"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_session_pool_low_precision(dtype, backend, device):
    """fp32/fp16/bf16 means are within one rounding of the float64 oracle (fp32 accumulation)."""
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong; the GPU check covers it")
    gen = generator(4)
    values, offsets = jagged([0, 37, 5, 1], 7, gen, device=device)
    session_offsets = oracles.sessionize(offsets.cpu(), mode="fixed", session_len=16)[0].to(device)
    low = values.to(dtype)
    got = mk.session_pool(low, session_offsets, backend=backend)
    assert got.dtype == dtype
    assert_matches(got, oracles.session_pool(low.double().cpu(), session_offsets), "reduction")


@pytest.mark.parametrize("backend", backends("session_pool_route"))
@pytest.mark.parametrize("case", LENGTH_IDS)
@pytest.mark.parametrize("num_themes,top_k", [(1, 1), (3, 1), (5, 2), (2, 2)])
def test_session_pool_route_matches_oracle(case, num_themes, top_k, backend, device):
    """Fused pooling + routing: the session means and their routing (themes, gate, probs,
    scores), forward and backward (values and prototypes), fp32 against the float64 oracle."""
    lengths, session_len = LENGTHS[case], SESSION_LEN[case]
    gen = generator(sum(lengths) + num_themes)
    values, offsets = jagged(lengths, 6, gen, dtype=torch.float32, device=device)
    so = oracles.sessionize(offsets.cpu(), mode="fixed", session_len=session_len)[0]
    inputs = {"values": values, "prototypes": randn(gen, num_themes, 6, dtype=torch.float32, device=device)}

    def fused(values, prototypes):
        pooled, r = mk.session_pool_route(values, so.to(device), prototypes, temperature=0.3, top_k=top_k,
                                          backend=backend)
        return pooled, r.gate, r.probs, r.scores

    def oracle(values, prototypes):
        pooled = oracles.session_pool(values, so)
        return (pooled,) + oracles.route(pooled, prototypes, temperature=0.3, top_k=top_k)[1:]

    check_forward_backward(fused, oracle, inputs, kind="attention", grad_kind="attention_grad", gen=gen)
    _, routing = mk.session_pool_route(values, so.to(device), inputs["prototypes"], temperature=0.3, top_k=top_k,
                                       backend=backend)
    expected = oracles.route(oracles.session_pool(values.double().cpu(), so),
                             inputs["prototypes"].double().cpu(), temperature=0.3, top_k=top_k)[0]
    assert torch.equal(routing.themes.cpu(), expected)


@pytest.mark.parametrize("backend", backends("session_pool_route"))
@pytest.mark.parametrize("top_k", [1, 2])
def test_routed_row_gate_is_one_forward(top_k, backend, device):
    """row_gate is 1 in the forward pass when it comes from the router: dispatch copies each
    session's gate to its rows."""
    gen = generator(8)
    values, offsets = jagged([0, 40, 13, 1, 29], 8, gen, dtype=torch.float32, device=device)
    sessions = mk.sessionize(offsets, mode="fixed", session_len=3)
    prototypes = randn(gen, 4, 8, dtype=torch.float32, device=device).requires_grad_()
    _, r = mk.session_pool_route(values, sessions.session_offsets, prototypes, top_k=top_k, backend=backend)
    d = run_dispatch(r.themes, r.gate, sessions.session_offsets, sessions.session_example, 5, 4, None)
    assert torch.equal(d.row_gate, torch.ones_like(d.row_gate))


@pytest.mark.parametrize("backend", backends("session_pool_route"))
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 2)])
def test_router_gradient_through_gather(top_k, max_theme_tokens, backend, device):
    """Straight-through: a loss on the gathered theme rows alone gives the prototypes (and the
    pooled tokens) a nonzero gradient, equal to the loop pipeline's
    (pool -> route -> dispatch -> gather)."""
    gen = generator(9)
    lengths, num_themes = [0, 11, 1, 7], 3
    values, offsets = jagged(lengths, 6, gen, dtype=torch.float32, device=device)
    so, se, _ = oracles.sessionize(offsets.cpu(), mode="fixed", session_len=2)
    prototypes = randn(gen, num_themes, 6, dtype=torch.float32, device=device)

    def pipeline(values, prototypes):
        _, r = mk.session_pool_route(values, so.to(device), prototypes, temperature=0.5, top_k=top_k,
                                     backend=backend)
        d = run_dispatch(r.themes, r.gate, so.to(device), se.to(device), len(lengths), num_themes, max_theme_tokens)
        return mk.theme_gather(values, d.gather_index, d.row_gate)

    def oracle(values, prototypes):
        pooled = oracles.session_pool(values, so)
        themes, gate, _, _ = oracles.route(pooled, prototypes, temperature=0.5, top_k=top_k)
        index, row_gate, _, _ = oracles.theme_dispatch(themes, gate, so, se, num_examples=len(lengths),
                                                       num_themes=num_themes, max_theme_tokens=max_theme_tokens)
        return oracles.theme_gather(values, index, row_gate)

    check_forward_backward(pipeline, oracle, {"values": values, "prototypes": prototypes},
                           kind="attention", grad_kind="attention_grad", gen=gen)
    leaf = prototypes.clone().requires_grad_()
    rows = pipeline(values, leaf)
    rows.mul(randn(gen, *rows.shape, dtype=torch.float32, device=device)).sum().backward()
    assert leaf.grad.abs().sum() > 0, "no gradient reached the prototypes through the gate"


# ---- the routing alone: one-token sessions, each pooled to its token exactly (a row over 1) ----

ROUTE_CASES = [  # (sessions, K, top_k)
    (0, 3, 1), (1, 1, 1), (13, 1, 1), (13, 3, 1), (7, 5, 2), (29, 2, 2), (11, 7, 3),
]
GATE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _route(values, prototypes, backend, **kw):
    """The routing of every row of `values`: each row a session of its own."""
    one_token_sessions = torch.arange(values.shape[0] + 1, device=values.device)
    return mk.session_pool_route(values, one_token_sessions, prototypes, backend=backend, **kw)[1]


@pytest.mark.parametrize("backend", backends("session_pool_route"))
@pytest.mark.parametrize("num_sessions,num_themes,top_k", ROUTE_CASES)
@pytest.mark.parametrize("temperature", [0.1, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_routing_matches_oracle(num_sessions, num_themes, top_k, temperature, seed, backend, device):
    """Chosen themes (best first), cosine scores / temperature, softmax probabilities and the
    straight-through gate, forward and backward (fp32 by design: Routing says scores are fp32)."""
    gen = generator(seed)
    inputs = {"values": randn(gen, num_sessions, 6, dtype=torch.float32, device=device),
              "prototypes": randn(gen, num_themes, 6, dtype=torch.float32, device=device)}
    got = _route(inputs["values"], inputs["prototypes"], backend, temperature=temperature, top_k=top_k)
    expected = oracles.route(inputs["values"].double().cpu(), inputs["prototypes"].double().cpu(),
                             temperature=temperature, top_k=top_k)
    assert torch.equal(got.themes.cpu(), expected[0])

    def route(values, prototypes):
        r = _route(values, prototypes, backend, temperature=temperature, top_k=top_k)
        return r.gate, r.probs, r.scores

    def oracle(values, prototypes):
        return oracles.route(values, prototypes, temperature=temperature, top_k=top_k)[1:]

    check_forward_backward(route, oracle, inputs, kind="attention", grad_kind="attention_grad", gen=gen)


@pytest.mark.parametrize("backend,dtype", [(backend, dtype) for backend in backends("session_pool_route")
                                           for dtype in GATE_DTYPES if backend == "reference" or dtype in ALL_DTYPES],
                         ids=str)
def test_routing_gate_is_exactly_one_forward(dtype, backend, device):
    """The forward gate is hard: exactly 1 for every chosen theme (the router's straight-through gate), so gating a row
    moves it without changing a bit."""
    skip_interpreted_bf16(backend, dtype)
    gen = generator(5)
    values = randn(gen, 200, 8, dtype=dtype, device=device).requires_grad_()
    prototypes = randn(gen, 6, 8, dtype=dtype, device=device).requires_grad_()
    gate = _route(values, prototypes, backend, top_k=2).gate
    off = gate != 1
    assert not off.any(), (f"{int(off.sum())} of {gate.numel()} gates differ from 1, e.g. "
                           f"1 - {(1 - gate[off][0].double()).item():.3g}")


@pytest.mark.parametrize("backend", backends("session_pool_route"))
def test_routing_zero_session_scores_zero(backend, device):
    """A zero session vector scores 0 for every theme (uniform probabilities) and keeps finite
    gradients."""
    gen = generator(6)
    values = torch.cat([torch.zeros(1, 4), randn(gen, 2, 4, dtype=torch.float32)]).to(device).requires_grad_()
    prototypes = randn(gen, 3, 4, dtype=torch.float32, device=device).requires_grad_()
    r = _route(values, prototypes, backend)
    assert torch.equal(r.scores[0], torch.zeros(3, device=device))
    assert_close(r.probs[0], torch.full((3,), 1 / 3, device=device), "reduction")
    (r.gate.sum() + r.probs[:, 0].sum()).backward()
    assert torch.isfinite(values.grad).all() and torch.isfinite(prototypes.grad).all()


# ---- at GPU scale (marked gpu: the GPU check selects them with -m gpu; skipped without CUDA) ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [2_000_000, 4_000_000])
def test_pool_route_large(dtype, num_tokens, kernel_backend):
    """Against the reference on the same `dtype` values: both route on the mean rounded to `dtype`
    (an fp32 oracle would route on the unrounded mean and flip ~0.3 % of near-ties in bf16)."""
    _, sessions, values, prototypes = workload(num_tokens, 128, 8, 2, dtype)
    pooled, routing, g_values, g_protos = pool_route_run(values, sessions, prototypes, 2, kernel_backend)
    ref_pooled, ref_routing, ref_g_values, ref_g_protos = pool_route_run(values, sessions, prototypes, 2,
                                                                          "reference")
    assert_close(pooled.float(), ref_pooled.float(), "reduction", dtype=dtype)
    # Summation order can still move a mean by one rounding step and flip an exact near-tie.
    same = (routing.themes == ref_routing.themes).all(dim=1)
    assert same.float().mean().item() > 0.9999, f"top-k themes agree on only {same.float().mean().item():.6f}"
    assert_close(routing.probs[same], ref_routing.probs[same], "attention", dtype=dtype)
    # Tokens of sessions routed alike get the same gradient up to the dtype's rounding.
    token_same = torch.repeat_interleave(same, sessions.session_offsets.diff(), output_size=values.shape[0])
    assert_close(g_values[token_same].float(), ref_g_values[token_same].float(), "attention", dtype=dtype)
    # The prototype gradient sums over ~10^5 sessions: compare relative to its norm.
    rel = ((g_protos - ref_g_protos).norm() / ref_g_protos.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

BAD_INPUT = {
    # name: (call, exception, argument named)
    "pool_route_zero_prototypes": (lambda: call_session_pool_route(prototypes=torch.randn(0, DIM)), ValueError,
                                   "prototypes"),
    "pool_route_top_k_above_K": (lambda: call_session_pool_route(top_k=4), ValueError, "top_k"),
    "pool_route_top_k_0": (lambda: call_session_pool_route(top_k=0), ValueError, "top_k"),
    "pool_route_prototype_width": (lambda: call_session_pool_route(prototypes=torch.randn(3, DIM + 1)), ValueError,
                                   "prototypes"),
    "pool_route_nan_values": (lambda: call_session_pool_route(values=torch.full((5, DIM), math.nan)), ValueError,
                              "values"),
    "pool_route_int_prototypes": (lambda: call_session_pool_route(prototypes=torch.ones(3, DIM, dtype=torch.int64)),
                                  TypeError, "prototypes"),
    "pool_route_temperature_0": (lambda: call_session_pool_route(temperature=0.0), ValueError, "temperature"),
    "pool_route_offsets_short": (lambda: call_session_pool_route(session_offsets=torch.tensor([0, 2, 4])), ValueError,
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
    "unknown_backend": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0, 3]), backend="rocm"),
                        ValueError, "session_pool: backend"),
    # cos / 1e-40 is inf in fp32: every score, and so the routing, would be NaN.
    "pool_route_tiny_temperature": (lambda: call_session_pool_route(temperature=1e-40), ValueError, "temperature"),
}


def _pool_case(device):
    _, sessions, _, _, _ = strided_layout(device)
    values = random_values(int(sessions.session_offsets[-1]), STRIDED_DIM, torch.float32, device)

    def run(backend, values, session_offsets):
        return (mk.session_pool(values, session_offsets, backend=backend),)
    return run, dict(values=values, session_offsets=sessions.session_offsets)


def _pool_route_case(device):
    _, sessions, _, _, _ = strided_layout(device)
    values = random_values(int(sessions.session_offsets[-1]), STRIDED_DIM, torch.float32, device)

    def run(backend, values, session_offsets, prototypes):
        pooled, r = mk.session_pool_route(values, session_offsets, prototypes, temperature=0.5, top_k=TOP_K,
                                          backend=backend)
        return pooled, r.scores, r.probs, r.themes, r.gate
    return run, dict(values=values, session_offsets=sessions.session_offsets,
                     prototypes=random_values(NUM_THEMES, STRIDED_DIM, torch.float32, device, seed=1))


STRIDED_CASES = {"session_pool": _pool_case, "session_pool_route": _pool_route_case}
