"""GPU-only checks: large token counts and bitwise determinism (the GPU check script runs these).

Skipped on machines without CUDA. The same comparisons as tests/ops, at sizes the
interpreter cannot reach (up to 4M tokens), in fp32, fp16 and bf16. The pooling, dispatch and
gather ops run on both kernel backends (`kernel_backend`: Triton and the CUDA extension).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels.theme_gather import inverse_of
from tests.kernel_cases import random_themes
from tests.oracles import live_extras
from tests.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _workload(num_tokens, dim, num_themes, top_k, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mean_len = 1000
    lengths = torch.randint(0, 2 * mean_len, (num_tokens // mean_len,), device="cuda", generator=gen)
    offsets = mk.offsets_from_lengths(lengths)
    sessions = mk.sessionize(offsets, session_len=8)
    values = torch.randn(int(offsets[-1]), dim, device="cuda", generator=gen).to(dtype)
    prototypes = torch.randn(num_themes, dim, device="cuda", generator=gen)
    return offsets, sessions, values, prototypes


def _pool_route_run(values, sessions, prototypes, top_k, backend):
    values = values.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    pooled, routing = mk.session_pool_route(values, sessions.session_offsets, prototypes, temperature=0.1,
                                            top_k=top_k, backend=backend)
    loss = pooled.float().square().sum() * 1e-3 + (routing.probs * torch.arange(
        routing.probs.shape[1], device="cuda")).sum() + routing.gate.float().sum()
    loss.backward()
    return pooled, routing, values.grad, prototypes.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [2_000_000, 4_000_000])
def test_pool_route_large(dtype, num_tokens, kernel_backend):
    """Against the reference on the same `dtype` values: both route on the mean rounded to `dtype`
    (an fp32 oracle would route on the unrounded mean and flip ~0.3 % of near-ties in bf16)."""
    _, sessions, values, prototypes = _workload(num_tokens, 128, 8, 2, dtype)
    pooled, routing, g_values, g_protos = _pool_route_run(values, sessions, prototypes, 2, kernel_backend)
    ref_pooled, ref_routing, ref_g_values, ref_g_protos = _pool_route_run(values, sessions, prototypes, 2,
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


@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 64)])
def test_dispatch_large_is_identical(top_k, max_theme_tokens, kernel_backend):
    offsets, sessions, _, _ = _workload(4_000_000, 8, 8, top_k, torch.float32)
    themes = random_themes(sessions.num_sessions, 8, top_k, "cuda")
    gate = torch.rand(themes.shape, device="cuda")
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=offsets.numel() - 1, num_themes=8, max_theme_tokens=max_theme_tokens)
    ref = mk.theme_dispatch(*args, backend="reference", **kwargs)
    out = mk.theme_dispatch(*args, backend=kernel_backend, **kwargs)
    for name in ("gather_index", "row_gate", "inverse_index", "theme_offsets"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_scatter_large(dtype, kernel_backend):
    offsets, sessions, values, _ = _workload(4_000_000, 128, 8, 2, dtype)
    themes = random_themes(sessions.num_sessions, 8, 2, "cuda")
    dispatch = mk.theme_dispatch(themes, torch.rand(themes.shape, device="cuda") + 0.5, sessions.session_offsets,
                                 sessions.session_example, num_examples=offsets.numel() - 1, num_themes=8)
    gate = dispatch.row_gate.to(dtype)
    rows = mk.theme_gather(values, dispatch.gather_index, gate, inverse_index=dispatch.inverse_index,
                           backend=kernel_backend)
    ref_rows = mk.theme_gather(values.float(), dispatch.gather_index, gate.float(), backend="reference")
    assert_close(rows.float(), ref_rows, "reduction", dtype=dtype)
    back = mk.theme_scatter(rows, dispatch.gather_index, gate, num_tokens=values.shape[0],
                            inverse_index=dispatch.inverse_index, backend=kernel_backend)
    ref_back = mk.theme_scatter(rows.float(), dispatch.gather_index, gate.float(), num_tokens=values.shape[0],
                                backend="reference")
    assert_close(back.float(), ref_back, "reduction", dtype=dtype)


# The gather's output holds WIDE_ROWS x WIDE_DIM = 2^31 + 8,192 elements (4.3 GB in fp16): its
# last rows lie past what 32-bit address arithmetic reaches. Every token is read twice.
WIDE_ROWS, WIDE_DIM = 8_388_640, 256


def check_gather_past(num_rows, dim, backend, device="cuda"):
    """theme_gather into num_rows x dim rows, then its backward (the scatter into the tokens'
    gradient and the gate's gradient, which read those rows back); checked on the last 64 rows
    against the reference on those rows. Returns nothing; asserts."""
    gen = torch.Generator(device=device).manual_seed(0)
    num_tokens = num_rows // 2
    values = torch.randn(num_tokens, dim, device=device, generator=gen).half().requires_grad_()
    gather_index = torch.randperm(num_rows, device=device, generator=gen) % num_tokens
    # Gates exact in fp16: the reference rounds the gate to the rows' dtype, the kernels do not.
    gate = (torch.randint(1, 8, (num_rows,), device=device, generator=gen) * 0.25).requires_grad_()
    inverse = inverse_of(gather_index, num_tokens)
    rows = mk.theme_gather(values, gather_index, gate, inverse_index=inverse, backend=backend)
    tail = slice(num_rows - 64, num_rows)
    index, tail_gate = gather_index[tail], gate.detach()[tail]
    assert torch.equal(rows[tail], mk.theme_gather(values.detach(), index, tail_gate, backend="reference"))
    cotangent = torch.randn(64, dim, device=device, generator=gen).half()
    (rows[tail].float() * cotangent.float()).sum().backward()
    rows_of = values.detach()[index].float()
    assert_close(gate.grad[tail], (cotangent.float() * rows_of).sum(1), "reduction")
    assert not gate.grad[:num_rows - 64].any()
    expected = torch.zeros(num_tokens, dim, device=device).index_add_(0, index, cotangent.float() * tail_gate[:, None])
    assert_close(values.grad.float(), expected, "reduction", dtype=torch.float16)


def test_gather_scatter_past_2_to_31_elements(kernel_backend):
    """Addresses past 2^31 elements, computed in 64 bits (on the CPU: tests/test_wide_addresses.py)."""
    check_gather_past(WIDE_ROWS, WIDE_DIM, kernel_backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(dtype, kernel_backend):
    """Same inputs, same bits: forward and backward of every kernel, run twice."""
    offsets, sessions, values, prototypes = _workload(1_000_000, 128, 8, 2, dtype, seed=1)

    def run():
        pooled, routing, g_values, g_protos = _pool_route_run(values, sessions, prototypes, 2, kernel_backend)
        dispatch = mk.theme_dispatch(routing.themes, routing.gate, sessions.session_offsets,
                                     sessions.session_example, num_examples=offsets.numel() - 1, num_themes=8,
                                     backend=kernel_backend)
        x = values.detach().requires_grad_()
        rows = mk.theme_gather(x, dispatch.gather_index, dispatch.row_gate.detach(),
                               inverse_index=dispatch.inverse_index, backend=kernel_backend)
        rows.float().square().sum().backward()
        return [pooled, routing.probs, routing.themes, g_values, g_protos, dispatch.gather_index,
                dispatch.inverse_index, rows, x.grad]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"


# ----------------------------------------------------------------------------- attention and grouped GEMM
# The benchmarks' target point (B = 256, L = 1000 ± 50 %, d = 64, K = 8 themes) for the ops whose
# reference fits in memory there; self-attention against the padded reference at B = 64, L = 512
# (the reference pads every theme subsequence to the longest: [K·B, H, L, L] scores).

def _theme_layout(num_examples, mean_len, dim, dtype, num_themes=8, top_k=1, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(mean_len // 2, mean_len + mean_len // 2 + 1, (num_examples,), device="cuda", generator=gen)
    lengths[1::64] = 0
    offsets = mk.offsets_from_lengths(lengths)
    num_tokens = int(offsets[-1])
    sessions = mk.sessionize(offsets, session_len=8, num_tokens=num_tokens)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, "cuda", seed=seed)
    dispatch = mk.theme_dispatch(themes, torch.ones(themes.shape, device="cuda"), sessions.session_offsets,
                                 sessions.session_example, num_examples=num_examples, num_themes=num_themes,
                                 num_tokens=num_tokens)
    values = torch.randn(num_tokens, dim, device="cuda", generator=gen).to(dtype)
    return dispatch, values


def _relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ‖kernel − fp32 reference‖ / ‖reference‖ on the same (dtype-rounded) inputs. fp32: products as
# three TF32 products (~fp32) summed in another order, the attention rows of tolerances.py;
# half precision also rounds outputs, probabilities and the softmax gradient to the dtype
# (relative step 2^-11 / 2^-8), a few roundings deep.
RELATIVE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def _cotangent(shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", generator=gen).to(dtype).float()


def _leaves(tensors, dtype, run_dtype):
    """Inputs rounded to the kernel's dtype first, so both backends read the same numbers."""
    return [t.detach().to(dtype).to(run_dtype).requires_grad_() for t in tensors]


def _target_attention_run(values, dispatch, params, backend, dtype, run_dtype):
    names = sorted(params)
    tokens, gate, *weights = _leaves([values, dispatch.row_gate] + [params[k] for k in names], dtype, run_dtype)
    p = dict(zip(names, weights))
    out = mk.expert_target_attention(tokens, p["query"], p["w_key"], p["b_key"], p["w_value"], p["b_value"],
                                     dispatch.theme_offsets, num_heads=2, gather_index=dispatch.gather_index,
                                     row_gate=gate, inverse_index=dispatch.inverse_index, backend=backend)
    (out.float() * _cotangent(out.shape, dtype, 3)).sum().backward()
    return [out, tokens.grad, gate.grad] + [p[k].grad for k in names]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expert_target_attention_large(dtype):
    dispatch, values = _theme_layout(256, 1000, 64, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    params = {"query": torch.randn(8 * 256, 64, device="cuda", generator=gen),
              "w_key": torch.randn(8, 64, 64, device="cuda", generator=gen) / 8,
              "b_key": torch.randn(8, 64, device="cuda", generator=gen),
              "w_value": torch.randn(8, 64, 64, device="cuda", generator=gen) / 8,
              "b_value": torch.randn(8, 64, device="cuda", generator=gen)}
    got = _target_attention_run(values, dispatch, params, "triton", dtype, dtype)
    want = _target_attention_run(values, dispatch, params, "reference", dtype, torch.float32)
    names = ["out", "tokens", "gate", "b_key", "b_value", "query", "w_key", "w_value"]
    for name, g, w in zip(names, got, want):
        if name == "b_key":   # exactly zero (the fold); the reference's is rounding noise
            assert torch.equal(g, torch.zeros_like(g))
            continue
        assert _relative_error(g, w) < RELATIVE[dtype], f"{name}: relative error {_relative_error(g, w):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jagged_self_attention_large(dtype):
    dispatch, values = _theme_layout(64, 512, 192, torch.float32)
    results = []
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        (qkv,) = _leaves([values], dtype, run_dtype)
        q, k, v = qkv.split(64, dim=1)
        out = mk.jagged_self_attention(q, k, v, dispatch.theme_offsets, num_heads=2, backend=backend)
        (out.float() * _cotangent(out.shape, dtype, 4)).sum().backward()
        results.append((out, qkv.grad))
    for name, got, want in zip(("out", "qkv gradient"), *results):
        assert _relative_error(got, want) < RELATIVE[dtype], f"{name}: relative error {_relative_error(got, want):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_linear_large(dtype):
    dispatch, values = _theme_layout(256, 1000, 64, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(2)
    weight = torch.randn(8, 64, 192, device="cuda", generator=gen) / 8
    bias = torch.randn(8, 192, device="cuda", generator=gen)
    results = []
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        x, w, b = _leaves([values, weight, bias], dtype, run_dtype)
        out = mk.grouped_linear(x, w, b, dispatch.expert_offsets, gather_index=dispatch.gather_index,
                                inverse_index=dispatch.inverse_index, backend=backend)
        (out.float() * _cotangent(out.shape, dtype, 5)).sum().backward()
        results.append([out, x.grad, w.grad, b.grad])
    for name, got, want in zip(("out", "x", "weight", "bias"), *results):
        assert _relative_error(got, want) < RELATIVE[dtype], f"{name}: relative error {_relative_error(got, want):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_ii_bitwise_deterministic(dtype):
    """Forward and backward of the three ops, twice on the same inputs: the same bits."""
    dispatch, values = _theme_layout(256, 1000, 64, dtype, seed=5)
    gen = torch.Generator(device="cuda").manual_seed(6)
    weight = (torch.randn(8, 64, 192, device="cuda", generator=gen) / 8).to(dtype)
    query = torch.randn(8 * 256, 64, device="cuda", generator=gen).to(dtype)

    def run():
        x = values.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        qkv = mk.grouped_linear(x, w, None, dispatch.expert_offsets, gather_index=dispatch.gather_index,
                                inverse_index=dispatch.inverse_index, backend="triton")
        q, k, v = qkv.split(64, dim=1)
        rows = mk.jagged_self_attention(q, k, v, dispatch.theme_offsets, num_heads=2, backend="triton")
        out = mk.expert_target_attention(rows, query, w[:, :, :64].contiguous(), None, w[:, :, 64:128].contiguous(),
                                         None, dispatch.theme_offsets, num_heads=2, backend="triton")
        out.float().square().sum().backward()
        return [qkv, rows, out, x.grad, w.grad]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
def test_layer_kernels_match_reference_on_gpu(dtype, encoder, kernel_backend):
    """The whole layer at B = 64, L = 256: fp32 within the layer tolerance of the reference; in
    fp16/bf16 both backends are measured against the fp32 reference and the kernels (fp32 sums
    inside every kernel) are at least as accurate as the reference run in the same dtype, up to
    a factor 2 for the different rounding points."""
    from mos import MoSConfig, MoSLayer

    # Half precision: random routing drawn from the same seed in every run, so that no session
    # flips theme on a near-tie between runs (that would compare different computations).
    half = dtype != torch.float32
    config = dict(dim=64, num_heads=2, num_themes=8, encoder=encoder,
                  ablation={"router": "random" if half else "learned"})
    torch.manual_seed(0)
    exact = live_extras(MoSLayer(MoSConfig(backend="reference", **config))).cuda()
    gen = torch.Generator(device="cuda").manual_seed(7)
    lengths = torch.randint(128, 385, (64,), device="cuda", generator=gen)
    offsets = mk.offsets_from_lengths(lengths)
    values = torch.randn(int(offsets[-1]), 64, device="cuda", generator=gen)
    target = torch.randn(64, 64, device="cuda", generator=gen)

    def run(backend, run_dtype):
        layer = MoSLayer(MoSConfig(backend=backend, **config)).cuda()
        layer.load_state_dict(exact.state_dict())
        layer.to(run_dtype)
        x = values.to(dtype).to(run_dtype).requires_grad_()
        torch.manual_seed(8)
        out = layer(x, target.to(dtype).to(run_dtype), offsets)
        (out.output.float().square().sum() + out.aux_loss.float()).backward()
        return out.output, x.grad

    want = run("reference", torch.float32)
    got = run(kernel_backend, dtype)
    if not half:
        assert_close(got[0], want[0], "layer")
        assert_close(got[1], want[1], "layer")
        return
    same_dtype = run("reference", dtype)
    for name, g, s, w in zip(("output", "input gradient"), got, same_dtype, want):
        err, ref_err = _relative_error(g, w), _relative_error(s, w)
        assert err <= 2 * ref_err + 1e-4, \
            f"{name}: {kernel_backend} {err:.2e}, reference in the same dtype {ref_err:.2e}"
