"""expert_target_attention at the benchmarks' target point (B = 256, L = 1000 ± 50 %, d = 64,
K = 8 themes) on a CUDA device, Triton against the fp32 reference in fp32 / fp16 / bf16 (skipped
without CUDA; the GPU check runs it).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.gpu_cases import GPU_DTYPES, RELATIVE_ERROR, cotangent, relative_error, rounded_leaves, theme_layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _target_attention_run(values, dispatch, params, backend, dtype, run_dtype):
    names = sorted(params)
    tokens, gate, *weights = rounded_leaves([values, dispatch.row_gate] + [params[k] for k in names], dtype, run_dtype)
    p = dict(zip(names, weights))
    out = mk.expert_target_attention(tokens, p["query"], p["w_key"], p["b_key"], p["w_value"], p["b_value"],
                                     dispatch.theme_offsets, num_heads=2, gather_index=dispatch.gather_index,
                                     row_gate=gate, inverse_index=dispatch.inverse_index, backend=backend)
    (out.float() * cotangent(out.shape, dtype, 3)).sum().backward()
    return [out, tokens.grad, gate.grad] + [p[k].grad for k in names]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_expert_target_attention_large(dtype):
    dispatch, values = theme_layout(256, 1000, 64, torch.float32)
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
        assert relative_error(g, w) < RELATIVE_ERROR[dtype], f"{name}: relative error {relative_error(g, w):.2e}"
