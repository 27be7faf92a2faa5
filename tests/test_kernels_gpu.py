"""GPU-only checks: large token counts and bitwise determinism (the GPU check script runs these).

Skipped on machines without CUDA. The same comparisons as test_kernels_triton.py, at sizes the
interpreter cannot reach (up to 4M tokens), in fp32, fp16 and bf16.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.kernel_cases import random_themes
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
def test_pool_route_large(dtype, num_tokens):
    """Against the reference on the same `dtype` values: both route on the mean rounded to `dtype`
    (an fp32 oracle would route on the unrounded mean and flip ~0.3 % of near-ties in bf16)."""
    _, sessions, values, prototypes = _workload(num_tokens, 128, 8, 2, dtype)
    pooled, routing, g_values, g_protos = _pool_route_run(values, sessions, prototypes, 2, "triton")
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


@pytest.mark.parametrize("top_k,capacity", [(1, None), (2, None), (2, 64)])
def test_dispatch_large_is_identical(top_k, capacity):
    offsets, sessions, _, _ = _workload(4_000_000, 8, 8, top_k, torch.float32)
    themes = random_themes(sessions.num_sessions, 8, top_k, "cuda")
    gate = torch.rand(themes.shape, device="cuda")
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=offsets.numel() - 1, num_themes=8, capacity=capacity)
    ref = mk.theme_dispatch(*args, backend="reference", **kwargs)
    out = mk.theme_dispatch(*args, backend="triton", **kwargs)
    for name in ("gather_index", "row_gate", "inverse_index", "theme_offsets"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_scatter_large(dtype):
    offsets, sessions, values, _ = _workload(4_000_000, 128, 8, 2, dtype)
    themes = random_themes(sessions.num_sessions, 8, 2, "cuda")
    dispatch = mk.theme_dispatch(themes, torch.rand(themes.shape, device="cuda") + 0.5, sessions.session_offsets,
                                 sessions.session_example, num_examples=offsets.numel() - 1, num_themes=8)
    gate = dispatch.row_gate.to(dtype)
    rows = mk.theme_gather(values, dispatch.gather_index, gate, inverse_index=dispatch.inverse_index, backend="triton")
    ref_rows = mk.theme_gather(values.float(), dispatch.gather_index, gate.float(), backend="reference")
    assert_close(rows.float(), ref_rows, "reduction", dtype=dtype)
    back = mk.theme_scatter(rows, dispatch.gather_index, gate, num_tokens=values.shape[0],
                            inverse_index=dispatch.inverse_index, backend="triton")
    ref_back = mk.theme_scatter(rows.float(), dispatch.gather_index, gate.float(), num_tokens=values.shape[0],
                                backend="reference")
    assert_close(back.float(), ref_back, "reduction", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(dtype):
    """Same inputs, same bits: forward and backward of every kernel, run twice."""
    offsets, sessions, values, prototypes = _workload(1_000_000, 128, 8, 2, dtype, seed=1)

    def run():
        pooled, routing, g_values, g_protos = _pool_route_run(values, sessions, prototypes, 2, "triton")
        dispatch = mk.theme_dispatch(routing.themes, routing.gate, sessions.session_offsets,
                                     sessions.session_example, num_examples=offsets.numel() - 1, num_themes=8,
                                     backend="triton")
        x = values.detach().requires_grad_()
        rows = mk.theme_gather(x, dispatch.gather_index, dispatch.row_gate.detach(),
                               inverse_index=dispatch.inverse_index, backend="triton")
        rows.float().square().sum().backward()
        return [pooled, routing.probs, routing.themes, g_values, g_protos, dispatch.gather_index,
                dispatch.inverse_index, rows, x.grad]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"
