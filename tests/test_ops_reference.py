"""The grouped-GEMM and attention ops (grouped_linear, expert_target_attention,
jagged_self_attention) against their loop oracles (tests/oracles.py), forward and backward; the
other ops' oracle tests are in their files under tests/ops/.

Inputs are fresh random numbers on deliberately awkward shapes: empty segments first, in the
middle and last, one-token segments, prime sizes, empty experts, top_k = 2, capacity. Every
backend an op has is compared (Triton under TRITON_INTERPRET=1), with kernel outputs poisoned
(NaN / sentinel) before they run, so an element a kernel forgets to write fails.
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
import oracles
from mos_kernels._alloc import poisoned_outputs
from oracles import generator, randn
from tests.kernel_cases import assert_matches, backends, check_forward_backward, jagged, precision, routed
from tolerances import assert_close


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    with poisoned_outputs():
        yield


# ---- grouped_linear ---------------------------------------------------------------------------

GROUP_BLOCKS = [[0], [5], [13], [0, 4, 0], [3, 0, 7, 1, 0], [2, 2, 2], [0, 0, 0]]


@pytest.mark.parametrize("backend", backends("grouped_linear"))
@pytest.mark.parametrize("blocks", GROUP_BLOCKS, ids=str)
@pytest.mark.parametrize("d_in,d_out", [(3, 5), (7, 2), (1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_linear_matches_oracle(blocks, d_in, d_out, with_bias, backend, device):
    """Each expert's block times its own weight (+ bias), forward and backward (float64 on the
    reference, fp32 on the kernels)."""
    gen = generator(sum(blocks) + d_in)
    dtype, kind = precision(backend)
    num_experts = len(blocks)
    inputs = {"x": randn(gen, sum(blocks), d_in, dtype=dtype, device=device),
              "weight": randn(gen, num_experts, d_in, d_out, dtype=dtype, device=device)}
    if with_bias:
        inputs["bias"] = randn(gen, num_experts, d_out, dtype=dtype, device=device)
    offsets = oracles.offsets_of(blocks).to(device)
    check_forward_backward(
        lambda x, weight, bias=None: mk.grouped_linear(x, weight, bias, offsets, backend=backend),
        lambda x, weight, bias=None: oracles.grouped_linear(x, weight, bias, offsets),
        inputs, kind=kind, grad_kind=kind, gen=gen)


@pytest.mark.parametrize("backend", backends("grouped_linear"))
def test_grouped_linear_max_rows_bound(backend, device):
    """A max_rows larger than the longest block (a bound known in advance) changes nothing."""
    gen = generator(13)
    dtype, kind = precision(backend)
    x, w, b = (randn(gen, *shape, dtype=dtype, device=device) for shape in ((9, 3), (2, 3, 4), (2, 4)))
    offsets = torch.tensor([0, 4, 9], device=device)
    assert_close(mk.grouped_linear(x, w, b, offsets, max_rows=16, backend=backend),
                 mk.grouped_linear(x, w, b, offsets, backend=backend), kind)


# ---- expert_target_attention ------------------------------------------------------------------

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
@pytest.mark.parametrize("top_k,capacity", [(1, None), (2, None), (2, 2)])
def test_expert_target_attention_over_dispatch(lengths, top_k, capacity, backend, device):
    """Theme experts read the dispatched rows through gather_index and row_gate: same as the
    oracle, including the gradient of the gate."""
    gen = generator(14)
    num_themes, dim = 3, 4
    d = routed(lengths, gen, top_k, capacity, device, num_themes)
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


# ---- jagged_self_attention --------------------------------------------------------------------

SELF_ATTENTION_LENGTHS = [[1], [0], [7], [0, 5, 0, 7, 1, 0], [3, 11, 2], [0, 0, 0]]


@pytest.mark.parametrize("backend", backends("jagged_self_attention"))
@pytest.mark.parametrize("lengths", SELF_ATTENTION_LENGTHS, ids=str)
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_jagged_self_attention_matches_oracle(lengths, num_heads, causal, backend, device):
    """Per segment and head, row i attends to rows j <= i (causal) or all rows of its segment;
    fp32 against the float64 oracle, forward and backward (q, k, v)."""
    gen = generator(len(lengths) * 3 + num_heads)
    total, dim = sum(lengths), 6
    inputs = {name: randn(gen, total, dim, dtype=torch.float32, device=device) for name in ("q", "k", "v")}
    offsets = oracles.offsets_of(lengths).to(device)
    check_forward_backward(
        lambda q, k, v: mk.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, causal=causal,
                                                 backend=backend),
        lambda q, k, v: oracles.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, causal=causal),
        inputs, kind="attention", grad_kind="attention_grad", gen=gen)


@pytest.mark.parametrize("backend", backends("jagged_self_attention"))
def test_jagged_self_attention_max_len_bound(backend, device):
    """A max_len bound above the longest segment changes nothing (padding is masked)."""
    gen = generator(16)
    q, k, v = (randn(gen, 12, 4, dtype=torch.float32, device=device) for _ in range(3))
    offsets = torch.tensor([0, 0, 5, 12], device=device)
    assert_close(mk.jagged_self_attention(q, k, v, offsets, num_heads=2, max_len=20, backend=backend),
                 mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend=backend), "attention")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("one_bucket", [False, True], ids=["length_buckets", "one_bucket"])
def test_padded_attention_matches_oracle_on_long_uneven_segments(causal, one_bucket):
    """The reference's two paddings (length buckets on the CPU, one bucket padded to max_len
    elsewhere) against the float64 oracle, forward and the written-out backward, on segments
    that share buckets (9 and 10 pad to 10, 33 and 40 to 40), empty ones and a single row."""
    from mos_kernels._padded_attention import padded_attention_backward, padded_attention_forward
    lengths = [0, 9, 10, 17, 33, 1, 40, 0, 3]
    gen = generator(44)
    q, k, v, g_out = (randn(gen, sum(lengths), 8, dtype=torch.float32) for _ in range(4))
    offsets = oracles.offsets_of(lengths)
    got = padded_attention_forward(q, k, v, offsets, 2, 40, causal, one_bucket=one_bucket)
    got_grads = padded_attention_backward(g_out, q, k, v, offsets, 2, 40, causal, one_bucket=one_bucket)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = oracles.jagged_self_attention(*leaves, offsets, num_heads=2, causal=causal)
    expected_grads = torch.autograd.grad(expected, leaves, g_out.double())
    assert_matches(got, expected, "attention")
    for name, g, e in zip("qkv", got_grads, expected_grads):
        assert_matches(g, e, "attention_grad", msg=name)


def test_bucket_lengths_pad_by_less_than_a_quarter():
    """Every length fits its bucket with under 25 % padding, and 1..1000 take few buckets."""
    from mos_kernels._padded_attention import bucket_length
    lengths = torch.arange(0, 5001)
    padded = bucket_length(lengths)
    assert padded[0] == 0 and bool((padded >= lengths).all())
    assert bool((padded[1:] < 1.25 * lengths[1:]).all()), int((padded[1:] / lengths[1:]).argmax()) + 1
    assert torch.unique(padded[1:1001]).numel() <= 40


def test_jagged_self_attention_reference_gradcheck():
    """float64 finite differences through the reference custom op (its backward is written out)."""
    gen = generator(45)
    offsets = oracles.offsets_of([3, 0, 5, 1])
    q, k, v = (randn(gen, 9, 4, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend="reference"), (q, k, v))


def test_jagged_self_attention_reference_counts_jagged_flops():
    """FLOP counters see the jagged pairs (4·d forward, 10·d backward per causal pair), not the
    padding of the reference's dense products."""
    from torch.utils.flop_counter import FlopCounterMode
    lengths, dim = [30, 2, 0, 7], 8
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    q, k, v = (torch.randn(sum(lengths), dim, requires_grad=True) for _ in range(3))
    offsets = oracles.offsets_of(lengths)
    with FlopCounterMode(display=False) as forward:
        out = mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend="reference")
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    assert forward.get_total_flops() == 4 * dim * pairs
    assert backward.get_total_flops() == 10 * dim * pairs


@pytest.mark.parametrize("max_len", [None, 12])
def test_opcheck_jagged_self_attention_reference(max_len):
    """Schema, fake tensor and autograd registration of the reference custom op."""
    gen = generator(46)
    q, k, v = (randn(gen, 12, 4, dtype=torch.float32).requires_grad_() for _ in range(3))
    offsets = oracles.offsets_of([5, 0, 7])
    torch.library.opcheck(torch.ops.mos.jagged_self_attention_reference.default, (q, k, v, offsets, 2, max_len, True))


def test_jagged_self_attention_max_len_too_small_is_refused():
    q = torch.randn(6, 4)
    with pytest.raises(ValueError, match="max_len"):
        mk.jagged_self_attention(q, q, q, torch.tensor([0, 5, 6]), num_heads=2, max_len=4, backend="reference")


# ---- float64 precision of the attention references --------------------------------------------

def float64_attention_inputs(device):
    gen = generator(17)
    lengths, dim = [0, 9, 4, 1], 6
    return (randn(gen, sum(lengths), dim, device=device), randn(gen, len(lengths), dim, device=device),
            randn(gen, 2, dim, dim, device=device), randn(gen, 2, dim, dim, device=device),
            oracles.offsets_of(lengths).to(device))


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


@pytest.mark.parametrize("backend", ["reference"])   # the kernels compute in fp32 at most
def test_jagged_self_attention_keeps_float64_precision(backend, device):
    """Run in float64, the reference agrees with the float64 oracle to float64 precision."""
    tokens, _, w_key, w_value, offsets = float64_attention_inputs(device)
    q, k, v = tokens, tokens @ w_key[0], tokens @ w_value[0]
    got = mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend=backend)
    expected = oracles.jagged_self_attention(q.cpu(), k.cpu(), v.cpu(), offsets.cpu(), num_heads=2)
    assert_matches(got, expected, "float64")
