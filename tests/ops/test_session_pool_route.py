"""session_pool_route (and session_pool): session means and their routing to themes.

Against the loop oracle (tests/oracles.py) in float64 on awkward lengths: the pooling, the fused
op (pooling and routing: themes, gate, probabilities, scores), and the router's gradient through
dispatch and gather; every kernel backend against the reference: the common shapes, many themes
(one program's per-theme loop at K = 33 and 64), uneven sessions (one long session among short
and empty ones in a block), the norm floor, the straight-through gate and its gradient, bitwise
repeatability; and the operator registration (opcheck, FLOP formula). Kernel outputs are
poisoned before they run (tests/ops/conftest.py). Bad arguments and strided views: the tables
at the end, run by test_contract.py; 4M tokens on the GPU: test_session_pool_route_gpu.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from tests import oracles
from tests.input_cases import (DIM, NUM_THEMES, STRIDED_DIM, TOP_K, call_session_pool_route, call_theme_route,
                               strided_layout)
from tests.kernel_cases import (ALL_DTYPES, LENGTH_IDS, LENGTHS, SESSION_LEN, SHAPES, assert_matches, backends,
                                check_forward_backward, jagged, make_sessions, opcheck_inputs, precision,
                                random_values, run_dispatch, skip_interpreted_bf16, upcast)
from tests.oracles import generator, randn
from tests.tolerances import assert_close


def _pool_route(values, session_offsets, prototypes, backend, top_k=1):
    pooled, routing = mk.session_pool_route(values, session_offsets, prototypes, temperature=0.2, top_k=top_k,
                                            backend=backend)
    return pooled, routing


def _loss(pooled, routing, seed=1):
    """A random linear functional of every differentiable output, so each gradient path is exercised."""
    gen = torch.Generator().manual_seed(seed)
    w_pooled = torch.randn(pooled.shape, generator=gen).to(pooled.device)
    w_probs = torch.randn(routing.probs.shape, generator=gen).to(pooled.device)
    w_scores = torch.randn(routing.scores.shape, generator=gen).to(pooled.device)
    w_gate = torch.randn(routing.gate.shape, generator=gen).to(pooled.device)
    return ((pooled.float() * w_pooled).sum() + (routing.probs * w_probs).sum()
            + (routing.scores * w_scores).sum() * 0.1 + (routing.gate.float() * w_gate).sum())


def _assert_same_themes(actual, reference_scores, reference_themes):
    """Themes agree except on a near-tie of the reference scores (rounding may break it either way)."""
    differ = (actual != reference_themes).any(dim=1)
    if differ.any():
        top = reference_scores[differ].sort(dim=1, descending=True).values
        k = actual.shape[1]
        gaps = top[:, k - 1] - top[:, k] if top.shape[1] > k else torch.zeros(0, device=top.device)
        assert (gaps.abs() < 1e-3).all(), f"themes differ on {int(differ.sum())} sessions that are no ties"


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
        return (pooled,) + oracles.theme_route(pooled, prototypes, temperature=0.3, top_k=top_k)[1:]

    check_forward_backward(fused, oracle, inputs, kind="attention", grad_kind="attention_grad", gen=gen)
    _, routing = mk.session_pool_route(values, so.to(device), inputs["prototypes"], temperature=0.3, top_k=top_k,
                                       backend=backend)
    expected = oracles.theme_route(oracles.session_pool(values.double().cpu(), so),
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
        themes, gate, _, _ = oracles.theme_route(pooled, prototypes, temperature=0.5, top_k=top_k)
        index, row_gate, _, _ = oracles.theme_dispatch(themes, gate, so, se, num_examples=len(lengths),
                                                       num_themes=num_themes, max_theme_tokens=max_theme_tokens)
        return oracles.theme_gather(values, index, row_gate)

    check_forward_backward(pipeline, oracle, {"values": values, "prototypes": prototypes},
                           kind="attention", grad_kind="attention_grad", gen=gen)
    leaf = prototypes.clone().requires_grad_()
    rows = pipeline(values, leaf)
    rows.mul(randn(gen, *rows.shape, dtype=torch.float32, device=device)).sum().backward()
    assert leaf.grad.abs().sum() > 0, "no gradient reached the prototypes through the gate"



# ---- kernel backends against the reference ----------------------------------------------------

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dim,num_themes,top_k", [(13, 1, 1), (32, 3, 2), (16, 16, 1), (24, 40, 2)])
def test_session_pool_route(shape, dtype, dim, num_themes, top_k, device, kernel_backend):
    skip_interpreted_bf16(kernel_backend, dtype)
    lengths, session_len = SHAPES[shape]
    _, sessions = make_sessions(lengths, session_len, device)
    so = sessions.session_offsets
    values = random_values(int(so[-1]), dim, dtype, device).requires_grad_()
    prototypes = random_values(num_themes, dim, torch.float32, device, seed=3).requires_grad_()

    ref_values, ref_protos = upcast(values), upcast(prototypes)
    ref_pooled, ref_routing = _pool_route(ref_values, so, ref_protos, "reference", top_k)
    _loss(ref_pooled, ref_routing).backward()
    pooled, routing = _pool_route(values, so, prototypes, kernel_backend, top_k)
    _loss(pooled, routing).backward()

    # Routing reads the pooled mean rounded to `dtype`; the fp32 oracle does not round it.
    assert_close(pooled.float(), ref_pooled, "reduction", dtype=dtype)
    assert_close(routing.scores, ref_routing.scores, "attention", dtype=dtype)
    assert_close(routing.probs, ref_routing.probs, "attention", dtype=dtype)
    _assert_same_themes(routing.themes, ref_routing.scores, ref_routing.themes)
    assert torch.equal(routing.gate.float(), torch.ones_like(routing.gate.float()))
    assert_close(values.grad.float(), ref_values.grad, "attention_grad" if dtype == torch.float32 else "attention",
                 dtype=dtype)
    assert_close(prototypes.grad, ref_protos.grad, "attention_grad" if dtype == torch.float32 else "attention",
                 dtype=dtype)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_session_pool_alone(shape, device, kernel_backend):
    lengths, session_len = SHAPES[shape]
    _, sessions = make_sessions(lengths, session_len, device)
    values = random_values(int(sessions.session_offsets[-1]), 24, torch.float32, device).requires_grad_()
    ref = mk.session_pool(values, sessions.session_offsets, backend="reference")
    out = mk.session_pool(values, sessions.session_offsets, backend=kernel_backend)
    assert_close(out, ref, "reduction")
    weight = torch.randn(ref.shape, device=device)
    (ref_grad,) = torch.autograd.grad((ref * weight).sum(), values)
    (grad,) = torch.autograd.grad((out * weight).sum(), values)
    assert_close(grad, ref_grad, "reduction")


def test_empty_sessions_pool_to_zero(device, kernel_backend):
    """Offsets with empty sessions (not produced by sessionize, but valid input) give zeros, no NaN."""
    session_offsets = torch.tensor([0, 0, 3, 3, 5, 5], device=device)
    values = random_values(5, 8, torch.float32, device).requires_grad_()
    prototypes = random_values(4, 8, torch.float32, device, seed=2).requires_grad_()
    pooled, routing = mk.session_pool_route(values, session_offsets, prototypes, top_k=2, backend=kernel_backend)
    assert torch.equal(pooled[[0, 2, 4]], torch.zeros(3, 8, device=device))
    assert torch.isfinite(routing.probs).all() and torch.isfinite(routing.scores).all()
    _loss(pooled, routing).backward()
    assert torch.isfinite(values.grad).all() and torch.isfinite(prototypes.grad).all()


@pytest.mark.parametrize("dim", [8, 13])
def test_pool_route_through_the_norm_floor(dim, device, kernel_backend):
    """Sessions whose mean is exactly 0 ([x, -x]) or tiny (~1e-8): normalisation clamped by eps,
    whose backward is g_unit / eps, not the radial projection. fp32 against the reference."""
    x = random_values(1, dim, torch.float32, device)
    tiny = random_values(2, dim, torch.float32, device, seed=1) * 1e-8
    rows = torch.cat([x, -x, tiny, random_values(3, dim, torch.float32, device, seed=2)])
    session_offsets = torch.tensor([0, 2, 4, 7], device=device)
    prototypes = random_values(5, dim, torch.float32, device, seed=3)
    grads = {}
    for backend in ("reference", kernel_backend):
        values, protos = rows.clone().requires_grad_(), prototypes.clone().requires_grad_()
        pooled, routing = _pool_route(values, session_offsets, protos, backend, top_k=2)
        _loss(pooled, routing).backward()
        grads[backend] = (values.grad, protos.grad)
    # The clamped sessions' gradients are ~1/eps = 1e6 times the others': relative to the largest.
    for got, want in zip(grads[kernel_backend], grads["reference"]):
        scale = want.abs().max()
        assert_close(got / scale, want / scale, "attention_grad")



def _uneven_offsets(device):
    """40 sessions: empty ones first, in the middle and last, one of 150 rows among 1-3-row ones
    (gap-mode sessionization), so one block walks 150 steps for mostly masked rows."""
    lengths = [0, 0, 2, 1, 150, 3, 0, 1] + [1, 2, 3, 0] * 7 + [5, 0, 0, 0]
    return mk.offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64, device=device))


def _run(values, offsets, prototypes, backend, top_k):
    values, prototypes = values.detach().requires_grad_(), prototypes.detach().requires_grad_()
    pooled, routing = _pool_route(values, offsets, prototypes, backend, top_k)
    _loss(pooled, routing).backward()
    return pooled, routing, values.grad, prototypes.grad


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dim,num_themes,top_k", [(24, 33, 3), (40, 64, 8), (130, 64, 1)])
def test_many_themes_uneven_sessions(dtype, dim, num_themes, top_k, device, kernel_backend):
    skip_interpreted_bf16(kernel_backend, dtype)
    offsets = _uneven_offsets(device)
    values = random_values(int(offsets[-1]), dim, dtype, device)
    prototypes = random_values(num_themes, dim, torch.float32, device, seed=3)
    # The reference runs in `dtype` too, so that it routes on the same rounded means: with 33-64
    # themes, a mean rounded to bf16 moves scores by more than the gap between some themes.
    ref_pooled, ref_routing, ref_g_values, ref_g_protos = _run(values, offsets, prototypes, "reference", top_k)
    pooled, routing, g_values, g_protos = _run(values, offsets, prototypes, kernel_backend, top_k)

    empty = (offsets[1:] == offsets[:-1]).nonzero().flatten()
    assert torch.equal(pooled[empty].float(), torch.zeros(len(empty), dim, device=device))
    assert_close(pooled.float(), ref_pooled.float(), "reduction", dtype=dtype)
    assert_close(routing.scores, ref_routing.scores, "attention", dtype=dtype)
    assert_close(routing.probs, ref_routing.probs, "attention", dtype=dtype)
    _assert_same_themes(routing.themes, ref_routing.scores, ref_routing.themes)
    grad_kind = "attention_grad" if dtype == torch.float32 else "attention"
    assert_close(g_values.float(), ref_g_values.float(), grad_kind, dtype=dtype)
    assert_close(g_protos, ref_g_protos, grad_kind, dtype=dtype)

    # The fp32 sums run in time order and the prototypes' gradient adds its per-program shares in
    # one fixed order: a second run gives the same bits.
    again = _run(values, offsets, prototypes, kernel_backend, top_k)
    for first, second in zip((pooled, routing.scores, routing.probs, routing.themes, g_values, g_protos),
                             (again[0], again[1].scores, again[1].probs, again[1].themes, again[2], again[3])):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gate_is_one_and_its_gradient_reaches_the_router(dtype, device, kernel_backend):
    """A loss of the gate alone: its forward value is exactly 1, and its gradient (d gate / d p = 1
    at each chosen theme) is the only one reaching values and prototypes, as in the reference."""
    offsets = _uneven_offsets(device)
    values = random_values(int(offsets[-1]), 16, dtype, device)
    prototypes = random_values(5, 16, torch.float32, device, seed=3)
    weights = random_values(offsets.numel() - 1, 2, torch.float32, device, seed=4)
    grads = {}
    for backend in ("reference", kernel_backend):
        v = (upcast(values) if backend == "reference" else values.clone()).requires_grad_()
        c = prototypes.clone().requires_grad_()
        _, routing = mk.session_pool_route(v, offsets, c, temperature=0.2, top_k=2, backend=backend)
        assert routing.gate.dtype == v.dtype
        assert torch.equal(routing.gate, torch.ones_like(routing.gate))
        (routing.gate.float() * weights).sum().backward()
        grads[backend] = (v.grad, c.grad)
    g_values, g_protos = grads[kernel_backend]
    assert g_protos.abs().max() > 0          # the gate's gradient does arrive
    assert_close(g_values.float(), grads["reference"][0], "attention", dtype=dtype)
    assert_close(g_protos, grads["reference"][1], "attention", dtype=dtype)


# ---- operator registration --------------------------------------------------------------------

def test_opcheck_session_pool_route(device, kernel_backend):
    ops = kernel_ops(kernel_backend)
    sessions, values, prototypes, _ = opcheck_inputs(device)
    torch.library.opcheck(ops.session_pool_route.default,
                          (values, sessions.session_offsets, prototypes, 5.0, 2))
    torch.library.opcheck(ops.session_pool_route.default,
                          (values, sessions.session_offsets, prototypes[:0].detach(), 1.0, 0))



def test_flop_formula_matches_a_hand_count(device, kernel_backend):
    """The registered operator's FLOP formula (torch.ops.mos: Triton, torch.ops.mos_cuda: the CUDA
    extension, on the CPU its emulation) against a hand count."""
    ops = kernel_ops(kernel_backend)
    dim, num_themes, top_k = 12, 3, 2
    sessions, values, prototypes, themes = opcheck_inputs(device, dim, num_themes, top_k)
    num_tokens, num_sessions = values.shape[0], sessions.num_sessions
    with FlopCounterMode(display=False) as counter:
        ops.session_pool_route(values, sessions.session_offsets, prototypes.detach(), 5.0, top_k)
    # sum T*d, divide S*d, normalise 3*S*d, K dot products 2*K*d per session
    expected = num_tokens * dim + num_sessions * dim + num_sessions * (3 * dim + 2 * num_themes * dim)
    assert counter.get_total_flops() == expected


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

BAD_INPUT = {
    # name: (call, exception, argument named)
    "route_zero_prototypes": (lambda: call_theme_route(prototypes=torch.randn(0, DIM)), ValueError, "prototypes"),
    "route_top_k_above_K": (lambda: call_theme_route(top_k=4), ValueError, "top_k"),
    "route_top_k_0": (lambda: call_theme_route(top_k=0), ValueError, "top_k"),
    "route_prototype_width": (lambda: call_theme_route(prototypes=torch.randn(3, DIM + 1)), ValueError, "prototypes"),
    "route_nan_pooled": (lambda: call_theme_route(pooled=torch.full((2, DIM), math.nan)), ValueError, "pooled"),
    "route_int_prototypes": (lambda: call_theme_route(prototypes=torch.ones(3, DIM, dtype=torch.int64)), TypeError,
                             "prototypes"),
    "route_temperature_0": (lambda: call_theme_route(temperature=0.0), ValueError, "temperature"),
    "pool_route_zero_prototypes": (lambda: call_session_pool_route(prototypes=torch.randn(0, DIM)), ValueError,
                                   "prototypes"),
    "pool_route_top_k_above_K": (lambda: call_session_pool_route(top_k=4), ValueError, "top_k"),
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


def _route_case(device):
    def run(backend, pooled, prototypes):
        r = mk.theme_route(pooled, prototypes, temperature=0.5, top_k=TOP_K, backend=backend)
        return r.scores, r.probs, r.themes, r.gate
    return run, dict(pooled=random_values(6, STRIDED_DIM, torch.float32, device),
                     prototypes=random_values(NUM_THEMES, STRIDED_DIM, torch.float32, device, seed=1))


STRIDED_CASES = {"session_pool": _pool_case, "session_pool_route": _pool_route_case, "theme_route": _route_case}
