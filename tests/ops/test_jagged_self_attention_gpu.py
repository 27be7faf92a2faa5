"""jagged_self_attention on a CUDA device against the padded reference at B = 64, L = 512 (the
reference pads every theme subsequence to the longest: [K·B, H, L, L] scores), Triton in fp32 /
fp16 / bf16 (skipped without CUDA; the GPU check runs it).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.gpu_cases import GPU_DTYPES, RELATIVE_ERROR, cotangent, relative_error, rounded_leaves, theme_layout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_jagged_self_attention_large(dtype):
    dispatch, values = theme_layout(64, 512, 192, torch.float32)
    results = []
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        (qkv,) = rounded_leaves([values], dtype, run_dtype)
        q, k, v = qkv.split(64, dim=1)
        out = mk.jagged_self_attention(q, k, v, dispatch.theme_offsets, num_heads=2, backend=backend)
        (out.float() * cotangent(out.shape, dtype, 4)).sum().backward()
        results.append((out, qkv.grad))
    for name, got, want in zip(("out", "qkv gradient"), *results):
        error = relative_error(got, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"
