"""expert_target_attention: each example's target attending over its tokens of each expert's
segment, against the loop oracle (tests/oracles.py) on awkward segments, over a real dispatch,
with empty segments (never NaN) and in float64 (the reference keeps its precision). Kernel
outputs are poisoned before they run (tests/ops/conftest.py). The Triton kernel against the
reference in fp32 / fp16 / bf16, the key bias's fold, its opcheck and FLOP formula; the
block-size rule, its compiled configurations and each block against the reference. Bad
arguments, strided views, rows past 2^31 elements: the tables at the end, run by
test_contract.py; the target point on the GPU: the tests marked gpu.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.expert_target_attention_kernels import attention_blocks
from mos_kernels.theme_gather import inverse_of
from tests import oracles
from tests.gpu_cases import (GPU_DTYPES, RELATIVE_ERROR, cotangent, needs_cuda, relative_error, rounded_leaves,
                             theme_layout)
from tests.input_cases import (DIM, NUM_THEMES, STRIDED_DIM, STRIDED_LENGTHS, strided_gather_args, strided_layout,
                               two_experts)
from tests.kernel_cases import (ALL_DTYPES, DTYPES, assert_matches, attention_kinds, backends, check_forward_backward,
                                compare_in_dtype, compare_to_reference, float64_attention_inputs, fresh_leaves,
                                is_compiled, random_values, reference_dispatch, routed)
from tests.oracles import generator, randn
from tests.tolerances import assert_close


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


# ---- the Triton kernel against the reference in fp32 / fp16 / bf16 --------------------------------

TARGET_SEGMENTS = {  # E, segment lengths of the E*B segments
    "one_expert_long": (1, [70]),
    "empty_first_middle_last": (2, [0, 3, 1, 0, 66, 0]),
    "all_empty": (2, [0, 0, 0, 0]),
    "three_experts": (3, [2, 0, 1, 0, 11, 5]),
}


def _target_inputs(num_experts, num_segments, num_tokens, dim, dtype, device, bias):
    return {"tokens": random_values(num_tokens, dim, dtype, device),
            "query": random_values(num_segments, dim, dtype, device, seed=1),
            "w_key": random_values(num_experts * dim, dim, dtype, device, seed=2).view(num_experts, dim, dim)
            / math.sqrt(dim),
            "b_key": random_values(num_experts, dim, dtype, device, seed=3) if bias else None,
            "w_value": random_values(num_experts * dim, dim, dtype, device, seed=4).view(num_experts, dim, dim),
            "b_value": random_values(num_experts, dim, dtype, device, seed=5) if bias else None}


def _target_attention(offsets, num_heads, backend, **dispatch):
    def fn(tokens, query, w_key, b_key, w_value, b_value, gate=None):
        return mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, offsets, num_heads=num_heads,
                                          row_gate=gate, backend=backend, **dispatch)
    return fn


@pytest.mark.parametrize("case", list(TARGET_SEGMENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim,num_heads", [(6, 3), (32, 4), (16, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_target_attention(case, dtype, dim, num_heads, bias, device):
    """Every segment's output and the gradients of tokens, query and all four projections; empty
    segments give exact zeros."""
    num_experts, lengths = TARGET_SEGMENTS[case]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = _target_inputs(num_experts, len(lengths), sum(lengths), dim, dtype, device, bias)
    out = compare_to_reference(_target_attention(offsets, num_heads, "triton"),
                               _target_attention(offsets, num_heads, "reference"), inputs, dtype,
                               *attention_kinds(dtype))
    empty = torch.tensor(lengths, device=device) == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty segments must give exact zeros"


@pytest.mark.parametrize("lengths", [[0, 5, 0, 17, 3, 0], [40, 41, 97]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 3)])
def test_expert_target_attention_triton_over_dispatch(lengths, dtype, top_k, max_theme_tokens, device):
    """Theme experts read the dispatched rows through gather_index and row_gate, fused into the
    loads: same as the reference, the gate's gradient included."""
    num_themes, dim = 3, 16
    dispatch = reference_dispatch(lengths, num_themes, top_k, max_theme_tokens, device)
    inputs = _target_inputs(num_themes, num_themes * len(lengths), sum(lengths), dim, dtype, device, True)
    inputs["gate"] = dispatch.row_gate.detach().to(dtype)
    kwargs = dict(gather_index=dispatch.gather_index, inverse_index=dispatch.inverse_index)
    compare_to_reference(_target_attention(dispatch.theme_offsets, 2, "triton", **kwargs),
                         _target_attention(dispatch.theme_offsets, 2, "reference", **kwargs), inputs, dtype,
                         *attention_kinds(dtype))


def test_key_bias_folds_away(device):
    """The fold (module docstring): b_k adds b_k . q to every score of a segment, which the
    softmax cancels. The Triton output does not depend on b_k at all, its gradient is exactly
    zero, and it equals the reference, which projects the keys with the bias."""
    lengths = [4, 0, 9]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = _target_inputs(1, 3, 13, 8, torch.float32, device, True)
    leaves = fresh_leaves(inputs)
    out = _target_attention(offsets, 2, "triton")(**leaves)
    shifted = dict(leaves, b_key=leaves["b_key"].detach() * 100)
    assert torch.equal(_target_attention(offsets, 2, "triton")(**shifted), out)
    assert_close(out, _target_attention(offsets, 2, "reference")(**shifted), "attention")
    out.square().sum().backward()
    assert torch.equal(leaves["b_key"].grad, torch.zeros_like(leaves["b_key"]))


def test_expert_target_attention_rejects_too_many_heads(device):
    inputs = _target_inputs(1, 1, 3, 32, torch.float32, device, False)
    with pytest.raises(ValueError, match="num_heads"):
        _target_attention(torch.tensor([0, 3], device=device), 32, "triton")(**inputs)


# ---- operator registration: opcheck, FLOP formula ---------------------------------------------

def _registration_inputs(device):
    dispatch = reference_dispatch([5, 0, 11, 3], 3, 2, None, device)
    inputs = _target_inputs(3, 12, 19, 8, torch.float32, device, True)
    return dispatch, {k: v.requires_grad_() for k, v in inputs.items()}


@pytest.mark.parametrize("gathered", [True, False])
def test_opcheck_expert_target_attention(gathered, device):
    dispatch, t = _registration_inputs(device)
    if gathered:
        gate = dispatch.row_gate.detach().float().requires_grad_()
        args = (t["tokens"], t["query"], t["w_key"], t["b_key"], t["w_value"], t["b_value"], dispatch.theme_offsets,
                dispatch.gather_index, gate, dispatch.inverse_index, 2)
    else:
        offsets = torch.tensor([0, 0, 4, 4, 9, 9, 10, 12, 12, 12, 19, 19, 19], device=device)
        args = (t["tokens"], t["query"], t["w_key"], None, t["w_value"], None, offsets, None, None, None, 2)
    torch.library.opcheck(torch.ops.mos.expert_target_attention.default, args)


def test_opcheck_expert_target_attention_backward(device):
    """The backward kernel is a custom op too (no autograd of its own): schema, fake, tracing."""
    dispatch, t = _registration_inputs(device)
    tokens, query, w_key, w_value = (t[k].detach() for k in ("tokens", "query", "w_key", "w_value"))
    gate = dispatch.row_gate.detach().float()
    out, pooled, lse = torch.ops.mos.expert_target_attention(tokens, query, w_key, None, w_value, None,
                                                            dispatch.theme_offsets, dispatch.gather_index, gate,
                                                            dispatch.inverse_index, 2)
    torch.library.opcheck(torch.ops.mos.expert_target_attention_backward.default,
                          (torch.randn_like(out), tokens, query, w_key, w_value, dispatch.theme_offsets,
                           dispatch.gather_index, gate, pooled, lse, 2))


def test_flop_formula_expert_target_attention(device):
    """FlopCounterMode counts the kernel: 4·N·H·d + 4·G·d²."""
    lengths, dim, heads = [5, 0, 11], 8, 2
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    t = _target_inputs(1, 3, 16, dim, torch.float32, device, False)
    with FlopCounterMode(display=False) as counter:
        torch.ops.mos.expert_target_attention(t["tokens"], t["query"], t["w_key"], None, t["w_value"], None, offsets,
                                              None, None, None, heads)
    assert counter.get_total_flops() == 4 * 16 * heads * dim + 4 * 3 * dim * dim


# ---- block sizes: the rule, its compiled configurations, each choice against the reference ----

@pytest.mark.parametrize("dim,dtype,backward,expected", [
    (64, torch.bfloat16, False, (32, 64, 4, 3)), (64, torch.bfloat16, True, (16, 64, 4, 3)),
    (128, torch.bfloat16, True, (16, 128, 4, 3)), (256, torch.bfloat16, True, (16, 256, 8, 3)),
    (64, torch.float32, False, (32, 64, 4, 3)), (128, torch.float32, False, (16, 128, 4, 3)),
    (256, torch.float32, False, (16, 256, 8, 3)), (128, torch.float32, True, (16, 128, 8, 3)),
    (6, torch.float16, False, (32, 16, 4, 3))])
def test_target_attention_blocks(dim, dtype, backward, expected):
    assert attention_blocks(dim, dtype, backward) == expected


def test_every_target_attention_block_is_compiled():
    for dtype in ALL_DTYPES:
        for dim in (16, 32, 64, 128, 256) if dtype != torch.float16 else (64,):
            for kernel, backward in (("_target_attention_fwd", False), ("_target_attention_bwd", True)):
                block_t, block_d, warps, stages = attention_blocks(dim, dtype, backward)
                wanted = {"BLOCK_T": block_t, "BLOCK_D": block_d, "NUM_STAGES": stages, "num_warps": warps,
                          "num_stages": stages}
                assert is_compiled(kernel, "tokens_ptr", dtype, wanted), (kernel, dtype, dim)


@pytest.mark.parametrize("dim,num_heads", [(16, 1), (64, 4), (256, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[0, 3, 16, 0], [0, 95, 33, 130]], ids=["short", "long"])
def test_target_attention_blocks_against_reference(dim, num_heads, dtype, lengths, device):
    """Gathered, gated rows over short and long segments (partial, whole and several tiles of
    the forward's 32 / 16 rows and the backward's 16), with empty ones, at every width rule."""
    num_experts, num_tokens = 2, 150
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, num_tokens, (sum(lengths),), generator=gen).to(device)
    inverse = inverse_of(index, num_tokens)
    inputs = {"tokens": random_values(num_tokens, dim, dtype, device),
              "query": random_values(len(lengths), dim, dtype, device, seed=1),
              "w_key": random_values(num_experts * dim, dim, dtype, device, seed=2).view(num_experts, dim, dim)
              / math.sqrt(dim),
              "w_value": random_values(num_experts * dim, dim, dtype, device, seed=4).view(num_experts, dim, dim)
              / math.sqrt(dim),
              "gate": (torch.rand(sum(lengths), generator=gen) + 0.5).to(device=device, dtype=dtype)}

    def run(backend):
        def fn(tokens, query, w_key, w_value, gate):
            return mk.expert_target_attention(tokens, query, w_key, None, w_value, None, offsets, num_heads=num_heads,
                                              gather_index=index, row_gate=gate, inverse_index=inverse,
                                              backend=backend)
        return fn
    compare_in_dtype(run("triton"), run("reference"), inputs, dtype, "attention")


# ---- at GPU scale (marked gpu: the GPU check selects them with -m gpu; skipped without CUDA) ----

def _target_attention_run(values, dispatch, params, backend, dtype, run_dtype):
    names = sorted(params)
    tokens, gate, *weights = rounded_leaves([values, dispatch.row_gate] + [params[k] for k in names], dtype, run_dtype)
    p = dict(zip(names, weights))
    out = mk.expert_target_attention(tokens, p["query"], p["w_key"], p["b_key"], p["w_value"], p["b_value"],
                                     dispatch.theme_offsets, num_heads=2, gather_index=dispatch.gather_index,
                                     row_gate=gate, inverse_index=dispatch.inverse_index, backend=backend)
    (out.float() * cotangent(out.shape, dtype, 3)).sum().backward()
    return [out, tokens.grad, gate.grad] + [p[k].grad for k in names]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_expert_target_attention_large(dtype):
    dispatch, values = theme_layout(256, 1000, 64, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    params = {"query": torch.randn(8 * 256, 64, device="cuda", generator=gen),
              "w_key": torch.randn(8, 64, 64, device="cuda", generator=gen) / 8,
              "b_key": torch.randn(8, 64, device="cuda", generator=gen),
              "w_value": torch.randn(8, 64, 64, device="cuda", generator=gen) / 8,
              "b_value": torch.randn(8, 64, device="cuda", generator=gen)}
    got = _target_attention_run(values, dispatch, params, "triton", dtype, dtype)
    want = _target_attention_run(values, dispatch, params, "reference", dtype, torch.float32)
    names = ["out", "tokens", "gate", "b_key", "b_value", "query", "w_key", "w_value"]
    for name, g, w in zip(names, got, want):
        if name == "b_key":   # exactly zero (the fold); the reference's is rounding noise
            assert torch.equal(g, torch.zeros_like(g))
            continue
        assert relative_error(g, w) < RELATIVE_ERROR[dtype], f"{name}: relative error {relative_error(g, w):.2e}"


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

def _attention(**kw):
    args = dict(tokens=torch.randn(5, DIM), query=torch.randn(4, DIM), w_key=torch.randn(2, DIM, DIM), b_key=None,
                w_value=torch.randn(2, DIM, DIM), b_value=None, segment_offsets=torch.tensor([0, 1, 3, 3, 5]),
                num_heads=2)
    args.update(kw)
    return mk.expert_target_attention(**args)


BAD_INPUT = {
    # name: (call, exception, argument named)
    "attention_heads_not_dividing": (lambda: _attention(num_heads=3), ValueError, "num_heads"),
    "attention_query_rows": (lambda: _attention(query=torch.randn(3, DIM)), ValueError, "query"),
    "attention_segments_count": (lambda: _attention(segment_offsets=torch.tensor([0, 1, 5])), ValueError,
                                 "segment_offsets"),
    "attention_gate_without_index": (lambda: _attention(row_gate=torch.ones(5)), ValueError, "row_gate"),
    "attention_nan_tokens": (lambda: _attention(tokens=torch.full((5, DIM), math.nan)), ValueError, "tokens"),
    "attention_no_key_weight": (lambda: _attention(w_key=None), TypeError, "w_key"),
    "attention_no_value_weight": (lambda: _attention(w_value=None), TypeError, "w_value"),
    "attention_int_value_bias": (lambda: _attention(b_value=torch.ones(2, DIM, dtype=torch.int64)), TypeError,
                                 "b_value"),
    "attention_nan_query": (lambda: _attention(query=torch.full((2, DIM), math.nan)), ValueError, "query"),
    "attention_inf_key_weight": (lambda: _attention(w_key=torch.full((2, DIM, DIM), math.inf)), ValueError, "w_key"),
    "attention_nan_value_bias": (lambda: _attention(b_value=torch.full((2, DIM), math.nan)), ValueError, "b_value"),
    "attention_float_heads": (lambda: _attention(num_heads=2.0), TypeError, "num_heads"),
}


def _target_attention_case(device):
    tokens, gather_index, row_gate, inverse_index, _ = strided_gather_args(device, rows=False)
    _, _, _, _, d = strided_layout(device)
    weights = {name: random_values(NUM_THEMES * STRIDED_DIM, STRIDED_DIM, torch.float32, device, seed)
               .view(NUM_THEMES, STRIDED_DIM, STRIDED_DIM)
               for seed, name in enumerate(("w_key", "w_value"), start=2)}
    biases = {name: random_values(NUM_THEMES, STRIDED_DIM, torch.float32, device, seed)
              for seed, name in enumerate(("b_key", "b_value"), start=4)}

    def run(backend, tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate,
            inverse_index):
        return (mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, segment_offsets,
                                           num_heads=2, gather_index=gather_index, row_gate=row_gate,
                                           inverse_index=inverse_index, backend=backend),)
    query = random_values(NUM_THEMES * len(STRIDED_LENGTHS), STRIDED_DIM, torch.float32, device, 6)
    return run, dict(tokens=tokens, query=query,
                     **weights, **biases, segment_offsets=d.theme_offsets, gather_index=gather_index,
                     row_gate=row_gate, inverse_index=inverse_index)


STRIDED_CASES = {"expert_target_attention": _target_attention_case}


# Rows past 2^31 elements of a reserved input, read through an index.

def _read_rows(tokens, index, gate, backend):
    weights, offsets = two_experts(index)
    return mk.expert_target_attention(tokens, weights[:, 1], weights, None, weights.flip(0), None, offsets,
                                      num_heads=4, gather_index=index, row_gate=gate, backend=backend)


ROWS_PAST_2_TO_31 = {"expert_target_attention": _read_rows}
