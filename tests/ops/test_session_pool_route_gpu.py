"""session_pool_route at 2M and 4M tokens on a CUDA device, in fp32 / fp16 / bf16, on both kernel
backends against the reference (skipped without CUDA; the GPU check runs it).
"""
from __future__ import annotations

import pytest
import torch

from tests.gpu_cases import GPU_DTYPES, pool_route_run, workload
from tests.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", [2_000_000, 4_000_000])
def test_pool_route_large(dtype, num_tokens, kernel_backend):
    """Against the reference on the same `dtype` values: both route on the mean rounded to `dtype`
    (an fp32 oracle would route on the unrounded mean and flip ~0.3 % of near-ties in bf16)."""
    _, sessions, values, prototypes = workload(num_tokens, 128, 8, 2, dtype)
    pooled, routing, g_values, g_protos = pool_route_run(values, sessions, prototypes, 2, kernel_backend)
    ref_pooled, ref_routing, ref_g_values, ref_g_protos = pool_route_run(values, sessions, prototypes, 2,
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
