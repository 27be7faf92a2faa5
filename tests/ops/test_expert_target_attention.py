"""expert_target_attention: each example's target attending over its tokens of each expert's
segment, against the loop oracle (tests/oracles.py) on awkward segments, over a real dispatch,
with empty segments (never NaN) and in float64 (the reference keeps its precision). Kernel
outputs are poisoned before they run (tests/ops/conftest.py). The Triton kernel against the
reference in fp32 / fp16 / bf16, its opcheck and FLOP formula: test_attention_triton.py; bad
arguments: test_bad_input.py; strided views: test_hostile_inputs.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from tests import oracles
from tests.kernel_cases import (assert_matches, backends, check_forward_backward, float64_attention_inputs, precision,
                                routed)
from tests.oracles import generator, randn


ATTENTION_SEGMENTS = [  # (E, segment lengths of the E*B segments)
    (1, [5]), (1, [0]), (1, [1, 0, 13]), (2, [0, 3, 7, 0]), (3, [2, 0, 1, 0, 11, 0]), (2, [0, 0, 0, 0]),
]


@pytest.mark.parametrize("backend", backends("expert_target_attention"))
@pytest.mark.parametrize("num_experts,lengths", ATTENTION_SEGMENTS)
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_expert_target_attention_matches_oracle(num_experts, lengths, num_heads, with_bias, backend, device):
    """Per segment and head: softmax(q k / sqrt(dh)) v with K/V of expert g // B; fp32 against the
    float64 oracle, forward and backward (tokens, query, all weights and biases)."""
    gen = generator(len(lengths) + num_heads)
    dim = 6
    inputs = {"tokens": randn(gen, sum(lengths), dim, dtype=torch.float32, device=device),
              "query": randn(gen, len(lengths), dim, dtype=torch.float32, device=device),
              "w_key": randn(gen, num_experts, dim, dim, dtype=torch.float32, device=device) / math.sqrt(dim),
              "w_value": randn(gen, num_experts, dim, dim, dtype=torch.float32, device=device)}
    if with_bias:
        inputs["b_key"] = randn(gen, num_experts, dim, dtype=torch.float32, device=device)
        inputs["b_value"] = randn(gen, num_experts, dim, dtype=torch.float32, device=device)
    offsets = oracles.offsets_of(lengths).to(device)

    def lib(tokens, query, w_key, w_value, b_key=None, b_value=None):
        return mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, offsets,
                                          num_heads=num_heads, backend=backend)

    def oracle(tokens, query, w_key, w_value, b_key=None, b_value=None):
        return oracles.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, offsets,
                                               num_heads=num_heads)

    out = check_forward_backward(lib, oracle, inputs, kind="attention", grad_kind="attention_grad", gen=gen)[0]
    empty = torch.tensor(lengths, device=device) == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty segments must give exact zeros"


@pytest.mark.parametrize("backend", backends("expert_target_attention"))
@pytest.mark.parametrize("lengths", [[0, 5, 0, 7, 1, 0], [13], [3, 11, 2, 7, 5]], ids=str)
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 2)])
def test_expert_target_attention_over_dispatch(lengths, top_k, max_theme_tokens, backend, device):
    """Theme experts read the dispatched rows through gather_index and row_gate: same as the
    oracle, including the gradient of the gate."""
    gen = generator(14)
    num_themes, dim = 3, 4
    d = routed(lengths, gen, top_k, max_theme_tokens, device, num_themes)
    index, theme_offsets, total = d.gather_index, d.theme_offsets, sum(lengths)
    inputs = {"tokens": randn(gen, total, dim, dtype=torch.float32, device=device),
              "query": randn(gen, num_themes * len(lengths), dim, dtype=torch.float32, device=device),
              "w_key": randn(gen, num_themes, dim, dim, dtype=torch.float32, device=device) / 2,
              "w_value": randn(gen, num_themes, dim, dim, dtype=torch.float32, device=device),
              "gate": d.row_gate.detach().float()}

    def lib(tokens, query, w_key, w_value, gate):
        return mk.expert_target_attention(tokens, query, w_key, None, w_value, None, theme_offsets, num_heads=2,
                                          gather_index=index, row_gate=gate, inverse_index=d.inverse_index,
                                          backend=backend)

    def oracle(tokens, query, w_key, w_value, gate):
        return oracles.expert_target_attention(tokens, query, w_key, None, w_value, None, theme_offsets.cpu(),
                                               num_heads=2, gather_index=index.cpu(), row_gate=gate)

    check_forward_backward(lib, oracle, inputs, kind="attention", grad_kind="attention_grad", gen=gen)


@pytest.mark.parametrize("backend", backends("expert_target_attention"))
def test_expert_target_attention_empty_segments_never_nan(backend, device):
    """All segments empty, or all but one: outputs of empty segments are exactly zero and every
    gradient is finite (no 0/0 from an empty softmax)."""
    gen = generator(15)
    for lengths in ([0, 0, 0, 0], [0, 0, 4, 0]):
        tokens = randn(gen, sum(lengths), 4, dtype=torch.float32, device=device).requires_grad_()
        query = randn(gen, 4, 4, dtype=torch.float32, device=device).requires_grad_()
        w = randn(gen, 2, 4, 4, dtype=torch.float32, device=device).requires_grad_()
        out = mk.expert_target_attention(tokens, query, w, None, w, None, oracles.offsets_of(lengths).to(device),
                                         num_heads=2, backend=backend)
        empty = torch.tensor(lengths, device=device) == 0
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
        out.sum().backward()
        for t in (tokens, query, w):
            assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["reference"])   # the kernels compute in fp32 at most
def test_expert_target_attention_keeps_float64_precision(backend, device):
    """Run in float64, the reference agrees with the float64 oracle to float64 precision, so it can
    serve as the float64 reference the kernels' errors are measured against (as session_pool and
    grouped_linear do: they compute in at least the input's dtype)."""
    tokens, query, w_key, w_value, offsets = float64_attention_inputs(device)
    got = mk.expert_target_attention(tokens, query, w_key, None, w_value, None, offsets, num_heads=2,
                                     backend=backend)
    expected = oracles.expert_target_attention(tokens.cpu(), query.cpu(), w_key.cpu(), None, w_value.cpu(), None,
                                               offsets.cpu(), num_heads=2)
    assert_matches(got, expected, "float64")

