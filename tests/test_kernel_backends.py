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


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_themes,top_k", [(1, 1), (3, 2), (16, 1), (5, 5), (40, 2)])
@pytest.mark.parametrize("capacity", [None, 1, 5])
def test_theme_dispatch_is_identical(shape, num_themes, top_k, capacity, device, kernel_backend):
    lengths, session_len = SHAPES[shape]
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, device=device)
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=len(lengths), num_themes=num_themes, capacity=capacity)
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
@pytest.mark.parametrize("capacity", [None, 2, 50])
def test_dispatch_given_example_session_offsets_matches_reference(layout, num_themes, top_k, capacity, device,
                                                                  kernel_backend):
    """Sessions.example_session_offsets given or built from session_example: the same Dispatch
    (and gate gradient) as the reference, bit for bit."""
    lengths, session_len = DISPATCH_LAYOUTS[layout]
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, device=device)
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=len(lengths), num_themes=num_themes, capacity=capacity)
    ref = _dispatch_both(args, kwargs, "reference")
    built = _dispatch_both(args, kwargs, kernel_backend)
    given = _dispatch_both(args, dict(kwargs, example_session_offsets=sessions.example_session_offsets),
                           kernel_backend)
    for name, r, b, g in zip(("gather_index", "row_gate", "inverse_index", "theme_offsets", "gate grad"),
                             ref, built, given):
        assert torch.equal(b, r), name
        assert torch.equal(g, r), name


@pytest.mark.parametrize("capacity", [None, 1])
def test_dispatch_empty_sessions_and_themes(capacity, device, kernel_backend):
    """Empty sessions (repeated offsets) inside a block, examples without sessions, themes no
    session chose, and a float64 gate: equal to the reference."""
    so = torch.tensor([0, 3, 3, 3, 7, 7, 12, 12], device=device)
    se = torch.tensor([1, 1, 1, 1, 3, 3, 3], device=device)
    themes = torch.tensor([[4, 0], [1, 4], [0, 2], [4, 1], [2, 4], [0, 1], [4, 0]], device=device)
    gate = torch.rand(themes.shape, dtype=torch.float64, device=device)
    eso = torch.tensor([0, 0, 4, 4, 7, 7], device=device)
    kwargs = dict(num_examples=5, num_themes=6, capacity=capacity)
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
    kwargs = dict(num_examples=4, num_themes=8, capacity=40, example_session_offsets=sessions.example_session_offsets)
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
