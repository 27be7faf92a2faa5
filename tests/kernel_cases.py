"""Awkward jagged inputs shared by the op tests (tests/ops/, one file per op).

The first part builds inputs for the kernel-backend comparisons (a kernel against the
reference, in fp32 / fp16 / bf16); the second the float64 cases and the helpers that compare
an op with its loop oracle (tests/oracles.py), forward and backward.
"""
from __future__ import annotations

import os

import torch

import mos_kernels as mk
from mos_kernels.backend import IMPLEMENTED
from mos_kernels.theme_route import normalized
from tests import oracles
from tests.oracles import generator, randn
from tests.tolerances import assert_close

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
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong; the GPU check covers it")


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


def opcheck_inputs(device, dim=12, num_themes=3, top_k=2):
    """Four examples cut in sessions of 3, 19 fp32 tokens, unit prototypes and random top-k themes."""
    _, sessions = make_sessions([5, 0, 11, 3], 3, device)
    values = random_values(19, dim, torch.float32, device).requires_grad_()
    prototypes = normalized(random_values(num_themes, dim, torch.float32, device, seed=2)).requires_grad_()
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    return sessions, values, prototypes, themes


def upcast(t):
    """A float32 leaf copy of t (the reference run of a low-precision comparison)."""
    return t.detach().float().requires_grad_(t.requires_grad)


# ---- Op against its loop oracle ------------------------------------------------------------

def backends(op: str):
    """Every concrete backend `op` has (Triton runs under TRITON_INTERPRET=1 on the CPU)."""
    return IMPLEMENTED[op]


LENGTHS = {
    "empty_first_middle_last": [0, 5, 0, 7, 1, 0],
    "single_token": [1],
    "single_prime": [13],
    "primes": [3, 11, 2, 7, 5],
    "all_empty": [0, 0, 0],
    "long_and_ones": [17, 1, 1, 0, 23],
}


LENGTH_IDS = list(LENGTHS)


# The session length each case is cut with where a test does not sweep it: "primes" gets
# one-token sessions, the others sessions that split their sequences unevenly.
SESSION_LEN = {"empty_first_middle_last": 3, "single_token": 1, "single_prime": 4, "primes": 1, "all_empty": 3,
               "long_and_ones": 3}


def assert_matches(actual, expected, kind, msg=""):
    """assert_close against an oracle result computed on the CPU, possibly in another dtype."""
    assert_close(actual, expected.detach().to(actual.device, actual.dtype), kind, msg=msg)


def grads_of(outputs, cotangents, leaves):
    pairs = [(o, w.to(o.device, o.dtype)) for o, w in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in leaves]
    loss = sum((o * w).sum() for o, w in pairs)
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def check_forward_backward(fn, oracle_fn, inputs, *, kind, grad_kind, gen):
    """Run `fn` on `inputs` and `oracle_fn` on float64 CPU copies; compare every float output,
    then the gradients of every input for one random cotangent per output."""
    lib = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    ref = {name: t.detach().cpu().double().requires_grad_() for name, t in inputs.items()}
    out, expected = fn(**lib), oracle_fn(**ref)
    out = out if isinstance(out, tuple) else (out,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (a, e) in enumerate(zip(out, expected)):
        assert a.shape == e.shape, f"output {i}: shape {tuple(a.shape)}, oracle {tuple(e.shape)}"
        assert_matches(a, e, kind, msg=f"output {i}")
    cotangents = [randn(gen, *e.shape) for e in expected]
    for name, a, e in zip(lib, grads_of(out, cotangents, list(lib.values())),
                          grads_of(expected, cotangents, list(ref.values()))):
        assert torch.isfinite(a).all(), f"gradient of {name} is not finite"
        assert_matches(a, e, grad_kind, msg=f"gradient of {name}")
    return out


def precision(backend):
    """(dtype, tolerance kind) a data-movement or pooling backend is compared in: the reference
    keeps float64; the Triton kernels accumulate in fp32 (fp32/fp16/bf16 inputs on the GPU)."""
    return (torch.float64, "float64") if backend == "reference" else (torch.float32, "reduction")


def jagged(lengths, dim, gen, *, dtype=torch.float64, device="cpu"):
    offsets = oracles.offsets_of(lengths).to(device)
    return randn(gen, sum(lengths), dim, dtype=dtype, device=device), offsets


def themes_by_pattern(gen, num_sessions, num_themes, top_k, pattern):
    """[S, top_k] distinct themes per session. pattern: "random" over all K, "one" (every session
    on themes 0..top_k-1, so the others are empty), "sparse" (only even themes: empty odd ones)."""
    rows = []
    for _ in range(num_sessions):
        if pattern == "one":
            rows.append(list(range(top_k)))
            continue
        pool = list(range(num_themes)) if pattern == "random" else list(range(0, num_themes, 2))
        if len(pool) < top_k:
            pool = list(range(num_themes))
        perm = torch.randperm(len(pool), generator=gen)[:top_k]
        rows.append([pool[int(i)] for i in perm])
    return torch.tensor(rows, dtype=torch.int64).view(num_sessions, top_k)


DISPATCH_CASES = [  # (K, top_k, pattern)
    (1, 1, "random"), (3, 1, "random"), (4, 1, "one"), (5, 1, "sparse"),
    (3, 2, "random"), (4, 2, "one"), (5, 2, "sparse"), (2, 2, "random"),
]


def dispatch_inputs(lengths, session_len, num_themes, top_k, pattern, gen, device):
    offsets = oracles.offsets_of(lengths)
    so, se, _ = oracles.sessionize(offsets, mode="fixed", session_len=session_len)
    themes = themes_by_pattern(gen, se.numel(), num_themes, top_k, pattern)
    gate = 1.0 + randn(gen, se.numel(), top_k)  # not 1, so a wrong row's gate shows
    return themes.to(device), gate.to(device), so.to(device), se.to(device)


def run_dispatch(themes, gate, so, se, num_examples, num_themes, max_theme_tokens, backend="reference"):
    return mk.theme_dispatch(themes, gate, so, se, num_examples=num_examples, num_themes=num_themes,
                             max_theme_tokens=max_theme_tokens, backend=backend)


def routed(lengths, gen, top_k, max_theme_tokens, device, num_themes=3):
    """A real dispatch over `lengths` (sessions of 2, random themes, gates not 1)."""
    themes, gate, so, se = dispatch_inputs(lengths, 2, num_themes, top_k, "random", gen, device)
    return run_dispatch(themes, gate, so, se, len(lengths), num_themes, max_theme_tokens)


def float64_attention_inputs(device):
    """Tokens, queries and key/value weights in float64 over segments [0, 9, 4, 1]."""
    gen = generator(17)
    lengths, dim = [0, 9, 4, 1], 6
    return (randn(gen, sum(lengths), dim, device=device), randn(gen, len(lengths), dim, device=device),
            randn(gen, 2, dim, dim, device=device), randn(gen, 2, dim, dim, device=device),
            oracles.offsets_of(lengths).to(device))
