"""theme_dispatch at 4M tokens on a CUDA device: both kernel backends identical to the reference
(skipped without CUDA; the GPU check runs it).
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.gpu_cases import workload
from tests.kernel_cases import random_themes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 64)])
def test_dispatch_large_is_identical(top_k, max_theme_tokens, kernel_backend):
    offsets, sessions, _, _ = workload(4_000_000, 8, 8, top_k, torch.float32)
    themes = random_themes(sessions.num_sessions, 8, top_k, "cuda")
    gate = torch.rand(themes.shape, device="cuda")
    args = (themes, gate, sessions.session_offsets, sessions.session_example)
    kwargs = dict(num_examples=offsets.numel() - 1, num_themes=8, max_theme_tokens=max_theme_tokens)
    ref = mk.theme_dispatch(*args, backend="reference", **kwargs)
    out = mk.theme_dispatch(*args, backend=kernel_backend, **kwargs)
    for name in ("gather_index", "row_gate", "inverse_index", "theme_offsets"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
