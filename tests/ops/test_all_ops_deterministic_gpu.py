"""Every kernel, run twice on the same inputs on a CUDA device, gives the same bits, forward and
backward: the routing chain (pooling+routing, dispatch, gather) on both kernel backends, and the
expert chain (grouped linear, self-attention, target attention) on Triton, in fp32 / fp16 / bf16
(skipped without CUDA; the GPU check runs it).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.gpu_cases import GPU_DTYPES, pool_route_run, theme_layout, workload

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_pooling_routing_dispatch_gather_bitwise_deterministic(dtype, kernel_backend):
    """Same inputs, same bits: forward and backward of every kernel, run twice."""
    offsets, sessions, values, prototypes = workload(1_000_000, 128, 8, 2, dtype, seed=1)

    def run():
        pooled, routing, g_values, g_protos = pool_route_run(values, sessions, prototypes, 2, kernel_backend)
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


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_grouped_linear_and_attention_bitwise_deterministic(dtype):
    """Forward and backward of the three ops, twice on the same inputs: the same bits."""
    dispatch, values = theme_layout(256, 1000, 64, dtype, seed=5)
    gen = torch.Generator(device="cuda").manual_seed(6)
    weight = (torch.randn(8, 64, 192, device="cuda", generator=gen) / 8).to(dtype)
    query = torch.randn(8 * 256, 64, device="cuda", generator=gen).to(dtype)

    def run():
        x = values.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        rows = mk.theme_gather(x, dispatch.gather_index, inverse_index=dispatch.inverse_index, backend="triton")
        qkv = mk.grouped_linear(rows, w, None, dispatch.expert_offsets, backend="triton")
        q, k, v = qkv.split(64, dim=1)
        rows = mk.jagged_self_attention(q, k, v, dispatch.theme_offsets, num_heads=2, backend="triton")
        out = mk.expert_target_attention(rows, query, w[:, :, :64].contiguous(), None, w[:, :, 64:128].contiguous(),
                                         None, dispatch.theme_offsets, num_heads=2, backend="triton")
        out.float().square().sum().backward()
        return [qkv, rows, out, x.grad, w.grad]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"
