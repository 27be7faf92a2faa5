"""theme_gather and theme_scatter on a CUDA device, both kernel backends: 4M tokens in fp32 / fp16 /
bf16 against the reference, and an output past 2^31 elements (skipped without CUDA; the GPU check
runs it).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels.theme_gather import inverse_of
from tests.gpu_cases import GPU_DTYPES, workload
from tests.kernel_cases import random_themes
from tests.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gather_scatter_large(dtype, kernel_backend):
    offsets, sessions, values, _ = workload(4_000_000, 128, 8, 2, dtype)
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
    """Addresses past 2^31 elements, computed in 64 bits (on the CPU: tests/ops/test_theme_gather_inputs.py)."""
    check_gather_past(WIDE_ROWS, WIDE_DIM, kernel_backend)
