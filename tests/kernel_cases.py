"""Awkward jagged inputs shared by the op tests (tests/ops/, one file per op).

The first part builds inputs for the kernel-backend comparisons (a kernel against the
reference, in fp32 / fp16 / bf16); the second the float64 cases and the helpers that compare
an op with its loop oracle (tests/oracles.py), forward and backward; the third compares a
Triton kernel with the reference in the kernel's dtype, forward and backward.
"""
from __future__ import annotations

import os

import torch

import mos_kernels as mk
from mos_kernels.backend import IMPLEMENTED
from mos_kernels.routing import normalized
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


# ---- A kernel against the reference, in the kernel's dtype ------------------------------------
# The reference runs on fp32 copies of the same (dtype-representable) inputs; cotangents are
# representable in the kernel's dtype too, so the kernel sees exactly the reference's numbers and
# differs from it by its own roundings only.

def fresh_leaves(tensors, dtype=None):
    """Fresh leaves requiring grad (None stays None), optionally upcast to `dtype`."""
    return {name: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
            for name, t in tensors.items()}


def output_and_grads(fn, leaves, dtype, seed=9):
    """Output and the gradient of every leaf for one random cotangent representable in `dtype`."""
    out = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=gen).to(dtype).to(device=out.device, dtype=torch.float32)
    if not out.requires_grad:     # the reference's output on no rows at all is a constant
        return out, {name: torch.zeros_like(t) for name, t in leaves.items() if t is not None}
    (out.float() * cotangent).sum().backward()
    return out, {name: t.grad for name, t in leaves.items() if t is not None}


def compare_to_reference(fn_triton, fn_reference, inputs, dtype, kind, grad_kind):
    """fn(**leaves) on `inputs` in `dtype` (Triton) and on fp32 copies (reference)."""
    out, grads = output_and_grads(fn_triton, fresh_leaves(inputs), dtype)
    ref, ref_grads = output_and_grads(fn_reference, fresh_leaves(inputs, torch.float32), dtype)
    assert out.dtype == dtype
    assert_close(out.float(), ref, kind, dtype=dtype, msg="output")
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all(), f"gradient of {name} is not finite"
        assert_close(grad.float(), ref_grads[name], grad_kind, dtype=dtype, msg=f"gradient of {name}")
    return out


def attention_kinds(dtype):
    """(output kind, gradient kind): fp32 gradients of a softmax subtract nearly equal terms."""
    return ("attention", "attention_grad" if dtype == torch.float32 else "attention")


def reference_dispatch(lengths, num_themes, top_k, max_theme_tokens, device, session_len=2):
    """The reference dispatch of random themes (gates in [0.5, 1.5)) over sessions of `lengths`."""
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, generator=torch.Generator().manual_seed(4)).to(device) + 0.5
    return mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                             num_examples=len(lengths), num_themes=num_themes, max_theme_tokens=max_theme_tokens,
                             backend="reference")


# ---- The block sizes a kernel launches with ---------------------------------------------------

POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def is_compiled(kernel, ptr_arg, dtype, wanted):
    """Whether compile_check lists a configuration of `kernel` whose pointer `ptr_arg` has `dtype`
    and whose constexprs include `wanted`."""
    from tools import compile_check

    return any(sig[ptr_arg] == POINTER_TYPES[dtype] and all(const.get(k) == v for k, v in wanted.items())
               for name, sig, const in compile_check.all_configs() if name == kernel)


def _grads_for_cotangent(fn, inputs, dtype, seed=3):
    """Output and gradients for one random cotangent representable in `dtype` (the kernel's)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (out.float() * cotangent.to(device=out.device, dtype=torch.float32)).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}


def compare_in_dtype(triton_fn, reference_fn, inputs, dtype, kind):
    """The Triton op in `dtype` against the reference on fp32 copies of the same inputs."""
    out, grads = _grads_for_cotangent(triton_fn, inputs, dtype)
    ref, ref_grads = _grads_for_cotangent(reference_fn, {k: v.float() for k, v in inputs.items()}, dtype)
    assert_close(out.float(), ref, kind, dtype=dtype, msg="output")
    for name, grad in grads.items():
        assert_close(grad.float(), ref_grads[name], kind if kind != "attention" or dtype != torch.float32
                     else "attention_grad", dtype=dtype, msg=f"gradient of {name}")
