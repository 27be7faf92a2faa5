"""grouped_linear at the benchmarks' target point (B = 256, L = 1000 ± 50 %, d = 64, K = 8 themes)
on a CUDA device, Triton against the fp32 reference in fp32 / fp16 / bf16 (skipped without CUDA;
the GPU check runs it).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.gpu_cases import GPU_DTYPES, RELATIVE_ERROR, cotangent, relative_error, rounded_leaves, theme_layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_grouped_linear_large(dtype):
    dispatch, values = theme_layout(256, 1000, 64, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(2)
    weight = torch.randn(8, 64, 192, device="cuda", generator=gen) / 8
    bias = torch.randn(8, 192, device="cuda", generator=gen)
    results = []
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        x, w, b = rounded_leaves([values, weight, bias], dtype, run_dtype)
        rows = mk.theme_gather(x, dispatch.gather_index, inverse_index=dispatch.inverse_index, backend=backend)
        out = mk.grouped_linear(rows, w, b, dispatch.expert_offsets, backend=backend)
        (out.float() * cotangent(out.shape, dtype, 5)).sum().backward()
        results.append([out, x.grad, w.grad, b.grad])
    for name, got, want in zip(("out", "x", "weight", "bias"), *results):
        error = relative_error(got, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"
