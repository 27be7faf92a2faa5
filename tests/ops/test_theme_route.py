"""theme_route: a session vector's cosine scores against the theme prototypes, its top-k themes,
softmax probabilities and straight-through gate.

Against the loop oracle (tests/oracles.py) in float64, forward and backward; the forward gate
exactly 1; a zero session vector. The fused pooling and routing op: test_session_pool_route.py;
bad arguments and strided views: test_session_pool_route_inputs.py.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from tests import oracles
from tests.kernel_cases import backends, check_forward_backward
from tests.oracles import generator, randn
from tests.tolerances import assert_close


ROUTE_CASES = [  # (sessions, K, top_k)
    (0, 3, 1), (1, 1, 1), (13, 1, 1), (13, 3, 1), (7, 5, 2), (29, 2, 2), (11, 7, 3),
]


@pytest.mark.parametrize("backend", backends("theme_route"))
@pytest.mark.parametrize("num_sessions,num_themes,top_k", ROUTE_CASES)
@pytest.mark.parametrize("temperature", [0.1, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_theme_route_matches_oracle(num_sessions, num_themes, top_k, temperature, seed, backend, device):
    """Chosen themes (best first), cosine scores / temperature, softmax probabilities and the
    straight-through gate, forward and backward (fp32 by design: Routing says scores are fp32)."""
    gen = generator(seed)
    inputs = {"pooled": randn(gen, num_sessions, 6, dtype=torch.float32, device=device),
              "prototypes": randn(gen, num_themes, 6, dtype=torch.float32, device=device)}
    got = mk.theme_route(inputs["pooled"], inputs["prototypes"], temperature=temperature, top_k=top_k,
                         backend=backend)
    expected = oracles.theme_route(inputs["pooled"].double().cpu(), inputs["prototypes"].double().cpu(),
                                   temperature=temperature, top_k=top_k)
    assert torch.equal(got.themes.cpu(), expected[0])

    def route(pooled, prototypes):
        r = mk.theme_route(pooled, prototypes, temperature=temperature, top_k=top_k, backend=backend)
        return r.gate, r.probs, r.scores

    def oracle(pooled, prototypes):
        return oracles.theme_route(pooled, prototypes, temperature=temperature, top_k=top_k)[1:]

    check_forward_backward(route, oracle, inputs, kind="attention", grad_kind="attention_grad", gen=gen)


@pytest.mark.parametrize("backend", backends("theme_route"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_theme_route_gate_is_exactly_one_forward(dtype, backend, device):
    """The forward gate is hard: exactly 1 for every chosen theme (the router's straight-through gate), so gating a row
    moves it without changing a bit."""
    gen = generator(5)
    pooled = randn(gen, 200, 8, dtype=dtype, device=device).requires_grad_()
    prototypes = randn(gen, 6, 8, dtype=dtype, device=device).requires_grad_()
    gate = mk.theme_route(pooled, prototypes, top_k=2, backend=backend).gate
    off = gate != 1
    assert not off.any(), (f"{int(off.sum())} of {gate.numel()} gates differ from 1, e.g. "
                           f"1 - {(1 - gate[off][0].double()).item():.3g}")


@pytest.mark.parametrize("backend", backends("theme_route"))
def test_theme_route_zero_session_scores_zero(backend, device):
    """A zero session vector scores 0 for every theme (uniform probabilities) and keeps finite
    gradients."""
    gen = generator(6)
    pooled = torch.cat([torch.zeros(1, 4), randn(gen, 2, 4, dtype=torch.float32)]).to(device).requires_grad_()
    prototypes = randn(gen, 3, 4, dtype=torch.float32, device=device).requires_grad_()
    r = mk.theme_route(pooled, prototypes, backend=backend)
    assert torch.equal(r.scores[0], torch.zeros(3, device=device))
    assert_close(r.probs[0], torch.full((3,), 1 / 3, device=device), "reduction")
    (r.gate.sum() + r.probs[:, 0].sum()).backward()
    assert torch.isfinite(pooled.grad).all() and torch.isfinite(prototypes.grad).all()
