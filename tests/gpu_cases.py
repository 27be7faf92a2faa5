"""Workloads and comparisons shared by the GPU-scale tests (in tests/ops/test_<op>.py, marked `gpu`;
the layer's in tests/test_layer_backends.py): token counts the interpreter cannot reach, on a CUDA
device."""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests.kernel_cases import random_themes

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# With `@pytest.mark.gpu` on every GPU-scale test: `-m gpu` selects them (the GPU check), and on a
# machine without CUDA they are skipped, not failed.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(got, want):
    """‖got − want‖ / ‖want‖ in float64 (0/0 taken as 0)."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ---- pooling, routing, dispatch and gather ----------------------------------------------------

def workload(num_tokens, dim, num_themes, top_k, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mean_len = 1000
    lengths = torch.randint(0, 2 * mean_len, (num_tokens // mean_len,), device="cuda", generator=gen)
    offsets = mk.offsets_from_lengths(lengths)
    sessions = mk.sessionize(offsets, session_len=8)
    values = torch.randn(int(offsets[-1]), dim, device="cuda", generator=gen).to(dtype)
    prototypes = torch.randn(num_themes, dim, device="cuda", generator=gen)
    return offsets, sessions, values, prototypes


def pool_route_run(values, sessions, prototypes, top_k, backend):
    values = values.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    pooled, routing = mk.session_pool_route(values, sessions.session_offsets, prototypes, temperature=0.1,
                                            top_k=top_k, backend=backend)
    loss = pooled.float().square().sum() * 1e-3 + (routing.probs * torch.arange(
        routing.probs.shape[1], device="cuda")).sum() + routing.gate.float().sum()
    loss.backward()
    return pooled, routing, values.grad, prototypes.grad


# ---- the attention and grouped-GEMM ops ------------------------------------------------------
# The benchmarks' target point (B = 256, L = 1000 ± 50 %, d = 64, K = 8 themes) for the ops whose
# reference fits in memory there; self-attention against the padded reference at B = 64, L = 512
# (the reference pads every theme subsequence to the longest: [K·B, H, L, L] scores).

def theme_layout(num_examples, mean_len, dim, dtype, num_themes=8, top_k=1, seed=0):
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


# ‖kernel − fp32 reference‖ / ‖reference‖ on the same (dtype-rounded) inputs. fp32: products as
# three TF32 products (~fp32) summed in another order, the attention rows of tolerances.py;
# half precision also rounds outputs, probabilities and the softmax gradient to the dtype
# (relative step 2^-11 / 2^-8), a few roundings deep.
RELATIVE_ERROR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def cotangent(shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", generator=gen).to(dtype).float()


def rounded_leaves(tensors, dtype, run_dtype):
    """Inputs rounded to the kernel's dtype first, so both backends read the same numbers."""
    return [t.detach().to(dtype).to(run_dtype).requires_grad_() for t in tensors]
