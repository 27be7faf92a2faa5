"""Awkward jagged inputs shared by the kernel tests (see kernels.md, "Test recipe")."""
from __future__ import annotations

import os

import torch

import mos_kernels as mk

ON_GPU = os.environ.get("MOS_TEST_DEVICE", "cpu") == "cuda"

# name -> (sequence lengths, session_len)
SHAPES = {
    "empty_first_middle_last": ([0, 5, 0, 17, 3, 0], 4),
    "single_example": ([23], 8),
    "all_empty": ([0, 0, 0], 8),
    "prime_lengths": ([13, 7, 29, 2, 11], 3),
    "one_token_sessions": ([3, 1, 4], 1),
    "sessions_longer_than_a_block": ([40, 41, 97], 40),
}

# Interpreter tests run fp32 and fp16 (bf16 arithmetic is garbage there); the GPU adds bf16.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# The CUDA extension's CPU emulation converts bf16 as the GPU does (c10::BFloat16, round to
# nearest even; not bit-identical: the host build does not contract multiply-adds into FMAs):
# tests taking `kernel_backend` run all three dtypes and skip bf16 for the Triton interpreter.
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_interpreted_bf16(kernel_backend, dtype):
    import pytest
    if kernel_backend == "triton" and dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong (kernels.md); the GPU check covers it")


def make_sessions(lengths, session_len, device):
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64, device=device))
    return offsets, mk.sessionize(offsets, session_len=session_len)


def random_values(num_rows, dim, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(num_rows, dim, generator=gen).to(device=device, dtype=dtype)


def random_themes(num_sessions, num_themes, top_k, device, seed=0):
    """Distinct top-k themes per session, uniformly random."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(num_sessions, num_themes, generator=gen)
    return scores.argsort(dim=1)[:, :top_k].to(device)
