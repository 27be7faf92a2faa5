"""The kernel backends (Triton, CUDA C++) against the reference, forward and backward, on awkward shapes.

Every test takes `kernel_backend` ("triton", "cuda"; conftest.py). On the CPU Triton runs under
TRITON_INTERPRET=1 and the CUDA extension's kernel code under its emulation (MOS_CUDA_EMULATE=1),
fp32 and fp16; the GPU check script runs the same file with MOS_TEST_DEVICE=cuda (fp32, fp16,
bf16). Outputs are poisoned with NaN / a sentinel before every kernel, so an element a kernel
fails to write cannot pass.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels._alloc import poisoned_outputs
from tests.kernel_cases import ALL_DTYPES, SHAPES, make_sessions, random_themes, random_values, skip_interpreted_bf16
from tests.oracles import live_extras
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def _upcast(t):
    return t.detach().float().requires_grad_(t.requires_grad)


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

    ref_values, ref_protos = _upcast(values), _upcast(prototypes)
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


def _dispatch_for(lengths, session_len, num_themes, top_k, device, capacity=None):
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, device=device) + 0.5
    return mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                             num_examples=len(lengths), num_themes=num_themes, capacity=capacity,
                             backend="reference")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("top_k,capacity,gated", [(1, None, True), (2, None, True), (2, 3, True), (1, None, False)])
def test_gather_and_scatter(shape, dtype, op, top_k, capacity, gated, device, kernel_backend):
    skip_interpreted_bf16(kernel_backend, dtype)
    lengths, session_len = SHAPES[shape]
    dispatch = _dispatch_for(lengths, session_len, 3, top_k, device, capacity)
    num_tokens, dim = dispatch.inverse_index.shape[0], 19
    num_in = num_tokens if op == "gather" else dispatch.gather_index.numel()
    num_out = dispatch.gather_index.numel() if op == "gather" else num_tokens
    data = random_values(num_in, dim, dtype, device).requires_grad_()
    gate = dispatch.row_gate.to(dtype).detach().requires_grad_() if gated else None
    # Weights representable in `dtype`: the kernel's incoming gradient is then exactly the oracle's,
    # and every result differs from the fp32 oracle by one final rounding at most.
    weight = random_values(num_out, dim, dtype, device, seed=7).float()

    def run(backend, data, gate):
        index, inverse = dispatch.gather_index, dispatch.inverse_index
        if op == "gather":
            out = mk.theme_gather(data, index, gate, inverse_index=inverse, backend=backend)
        else:
            out = mk.theme_scatter(data, index, gate, num_tokens=num_tokens, inverse_index=inverse, backend=backend)
        (out.float() * weight).sum().backward()
        return out

    ref_data, ref_gate = _upcast(data), (_upcast(gate) if gated else None)
    expected = run("reference", ref_data, ref_gate)
    out = run(kernel_backend, data, gate)
    # A plain gather moves data; everything else rounds once to `dtype`.
    assert_close(out.float(), expected, "exact" if (op == "gather" and not gated) else "reduction", dtype=dtype)
    assert_close(data.grad.float(), ref_data.grad, "reduction", dtype=dtype)
    if gated:
        assert_close(gate.grad.float(), ref_gate.grad, "reduction", dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_gather_and_scatter_whole_chunks(dtype, op, device, kernel_backend):
    """d = 32: every row splits into whole 16-byte chunks (the CUDA kernels' vector path; the
    awkward-shape test above uses d = 19, the element path)."""
    skip_interpreted_bf16(kernel_backend, dtype)
    dispatch = _dispatch_for([13, 7, 29, 2], 3, 3, 2, device)
    num_tokens = dispatch.inverse_index.shape[0]
    index, inverse, gate = dispatch.gather_index, dispatch.inverse_index, dispatch.row_gate.to(dtype)
    data = random_values(num_tokens if op == "gather" else index.numel(), 32, dtype, device)
    kwargs = dict(inverse_index=inverse)
    if op == "gather":
        out = mk.theme_gather(data, index, gate, backend=kernel_backend, **kwargs)
        want = mk.theme_gather(data.float(), index, gate.float(), backend="reference")
    else:
        out = mk.theme_scatter(data, index, gate, num_tokens=num_tokens, backend=kernel_backend, **kwargs)
        want = mk.theme_scatter(data.float(), index, gate.float(), num_tokens=num_tokens, backend="reference")
    assert_close(out.float(), want, "reduction", dtype=dtype)


def test_gather_without_inverse_builds_it(device, kernel_backend):
    """Without inverse_index a kernel backend builds one (a documented sync) and gives the same result."""
    values = random_values(11, 8, torch.float32, device).requires_grad_()
    index = torch.tensor([3, 3, 0, 10, 3, 5], device=device)
    out = mk.theme_gather(values, index, backend=kernel_backend)
    assert torch.equal(out, values.detach()[index])
    out.sum().backward()
    assert values.grad[:, 0].tolist() == [1, 0, 0, 3, 0, 1, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
@pytest.mark.parametrize("top_k,capacity", [(1, None), (2, 3)])
def test_layer_equals_reference(encoder, top_k, capacity, device, kernel_backend):
    from mos import MoSConfig, MoSLayer

    config = dict(dim=16, num_heads=2, num_themes=4, session_len=3, encoder=encoder, top_k=top_k, capacity=capacity)
    torch.manual_seed(0)
    reference = live_extras(MoSLayer(MoSConfig(backend="reference", **config))).to(device)
    kernel_layer = MoSLayer(MoSConfig(backend=kernel_backend, **config)).to(device)
    kernel_layer.load_state_dict(reference.state_dict())
    offsets = mk.offsets_from_lengths(torch.tensor([0, 9, 1, 14, 0], device=device))
    values = random_values(24, 16, torch.float32, device)
    target = random_values(5, 16, torch.float32, device, seed=1)
    outs = []
    for layer in (reference, kernel_layer):
        x = values.clone().requires_grad_()
        out = layer(x, target, offsets)
        (out.output.square().sum() + out.aux_loss).backward()
        outs.append((out.output, x.grad, layer.prototypes.grad))
    for got, want in zip(outs[1], outs[0]):
        assert_close(got, want, "layer")
