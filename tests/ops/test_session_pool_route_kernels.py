"""session_pool_route and session_pool: each kernel backend (Triton, the CUDA extension) against the
reference: the common shapes, many themes (one program's per-theme loop at K = 33 and 64), uneven
sessions (one long session among short and empty ones in a block), the norm floor, the
straight-through gate and its gradient, bitwise repeatability; and the operator registration
(opcheck, FLOP formula). Kernel outputs are poisoned before they run (tests/ops/conftest.py).
The loop oracle, the GPU-scale tests and the op's input tables: test_session_pool_route.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from tests.kernel_cases import (ALL_DTYPES, SHAPES, make_sessions, opcheck_inputs, random_values,
                                skip_interpreted_bf16, upcast)
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
