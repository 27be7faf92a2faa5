"""The attention and grouped-GEMM Triton kernels against the reference: grouped_linear, expert_target_attention,
jagged_self_attention, forward and backward (every input and parameter), and the fused layer.

On the CPU these run under TRITON_INTERPRET=1 in fp32 and fp16 (the interpreter's bf16 is
wrong); the GPU check runs the same file with MOS_TEST_DEVICE=cuda, adding bf16. Kernel outputs
are poisoned with NaN before every launch, so an element a kernel fails to write cannot pass.
The reference runs on fp32 copies of the same (dtype-representable) inputs; cotangents are
representable in the kernel's dtype too, so the kernel sees exactly the oracle's numbers and
differs from it by its own roundings only.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels._alloc import poisoned_outputs
from mos_kernels.theme_gather import inverse_of
from tests.kernel_cases import DTYPES, make_sessions, random_themes, random_values
from tests.oracles import live_extras
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def _leaves(tensors, dtype=None):
    """Fresh leaves requiring grad (None stays None), optionally upcast to `dtype`."""
    return {name: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
            for name, t in tensors.items()}


def _run(fn, leaves, dtype, seed=9):
    """Output and the gradient of every leaf for one random cotangent representable in `dtype`."""
    out = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=gen).to(dtype).to(device=out.device, dtype=torch.float32)
    if not out.requires_grad:     # the reference's output on no rows at all is a constant
        return out, {name: torch.zeros_like(t) for name, t in leaves.items() if t is not None}
    (out.float() * cotangent).sum().backward()
    return out, {name: t.grad for name, t in leaves.items() if t is not None}


def _compare(fn_triton, fn_reference, inputs, dtype, kind, grad_kind):
    """fn(**leaves) on `inputs` in `dtype` (Triton) and on fp32 copies (reference)."""
    out, grads = _run(fn_triton, _leaves(inputs), dtype)
    ref, ref_grads = _run(fn_reference, _leaves(inputs, torch.float32), dtype)
    assert out.dtype == dtype
    assert_close(out.float(), ref, kind, dtype=dtype, msg="output")
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert torch.isfinite(grad).all(), f"gradient of {name} is not finite"
        assert_close(grad.float(), ref_grads[name], grad_kind, dtype=dtype, msg=f"gradient of {name}")
    return out


def _kinds(dtype):
    """(output kind, gradient kind): fp32 gradients of a softmax subtract nearly equal terms."""
    return ("attention", "attention_grad" if dtype == torch.float32 else "attention")


def _dispatch(lengths, num_themes, top_k, max_theme_tokens, device, session_len=2):
    _, sessions = make_sessions(lengths, session_len, device)
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    gate = torch.rand(themes.shape, generator=torch.Generator().manual_seed(4)).to(device) + 0.5
    return mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                             num_examples=len(lengths), num_themes=num_themes, max_theme_tokens=max_theme_tokens,
                             backend="reference")


# ----------------------------------------------------------------------------- grouped_linear

GROUP_BLOCKS = {"one_expert": [13], "empty_experts": [0, 5, 0, 70, 1, 0], "all_empty": [0, 0], "primes": [3, 11, 2]}


@pytest.mark.parametrize("blocks", list(GROUP_BLOCKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_in,d_out", [(7, 5), (33, 70)])
@pytest.mark.parametrize("variant", ["plain", "no_bias", "gather", "gather_scatter", "scatter"])
def test_grouped_linear(blocks, dtype, d_in, d_out, variant, device):
    lengths = GROUP_BLOCKS[blocks]
    num_rows, num_experts = sum(lengths), len(lengths)
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    gather = variant.startswith("gather")
    num_tokens = num_rows + 3 if gather else num_rows
    inputs = {"x": random_values(num_tokens, d_in, dtype, device),
              "weight": random_values(num_experts * d_in, d_out, dtype, device, seed=1).view(num_experts, d_in, d_out)
              / math.sqrt(d_in),
              "bias": None if variant == "no_bias" else random_values(num_experts, d_out, dtype, device, seed=2),
              "gate": None}
    gen = torch.Generator().manual_seed(3)
    index = scatter = inverse = None
    if gather:
        index = torch.randint(0, num_tokens, (num_rows,), generator=gen).to(device)
        inverse = inverse_of(index, num_tokens)
        # Powers of two: gate * x is exact in every dtype. The weight gradient's tensor-core product
        # reads gated rows rounded to the dtype (as the reference's gather makes them), which an
        # fp32 oracle of any other gate would not round.
        inputs["gate"] = (2.0 ** torch.randint(-1, 2, (num_rows,), generator=gen)).to(device=device, dtype=dtype)
    if variant.endswith("scatter"):
        scatter = torch.randperm(num_rows, generator=gen).to(device)

    def run(backend):
        return lambda x, weight, bias, gate: mk.grouped_linear(
            x, weight, bias, offsets, gather_index=index, row_gate=gate, inverse_index=inverse, scatter_index=scatter,
            backend=backend)

    # Every output and gradient is an fp32 sum rounded once to the dtype.
    _compare(run("triton"), run("reference"), inputs, dtype, "reduction", "reduction")


def test_grouped_linear_weight_grad_splits_rows(device):
    """Experts with more rows than one program reduces (several fp32 partials per expert, added
    in a fixed order) give the weight and bias gradients of a float64 oracle to fp32 accuracy
    (relative to the norm: sums of thousands of terms cancel in single entries)."""
    from mos_kernels.grouped_linear import _launch_weight_grad, _splits

    lengths = [4100, 0, 3000]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    x = random_values(sum(lengths), 16, torch.float32, device)
    grad = random_values(sum(lengths), 16, torch.float32, device, seed=1)
    assert _splits(sum(lengths), 3) > 1
    dw, db = _launch_weight_grad(x, None, None, grad, None, offsets, 3)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        for got, want in ((dw[e], x[lo:hi].double().t() @ grad[lo:hi].double()),
                          (db[e], grad[lo:hi].double().sum(0))):
            rel = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
            assert rel < 1e-6, f"expert {e}: relative error {rel:.2e}"


# ----------------------------------------------------------------------------- expert_target_attention

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
    out = _compare(_target_attention(offsets, num_heads, "triton"), _target_attention(offsets, num_heads, "reference"),
                   inputs, dtype, *_kinds(dtype))
    empty = torch.tensor(lengths, device=device) == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty segments must give exact zeros"


@pytest.mark.parametrize("lengths", [[0, 5, 0, 17, 3, 0], [40, 41, 97]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, None), (2, 3)])
def test_expert_target_attention_over_dispatch(lengths, dtype, top_k, max_theme_tokens, device):
    """Theme experts read the dispatched rows through gather_index and row_gate, fused into the
    loads: same as the reference, the gate's gradient included."""
    num_themes, dim = 3, 16
    dispatch = _dispatch(lengths, num_themes, top_k, max_theme_tokens, device)
    inputs = _target_inputs(num_themes, num_themes * len(lengths), sum(lengths), dim, dtype, device, True)
    inputs["gate"] = dispatch.row_gate.detach().to(dtype)
    kwargs = dict(gather_index=dispatch.gather_index, inverse_index=dispatch.inverse_index)
    _compare(_target_attention(dispatch.theme_offsets, 2, "triton", **kwargs),
             _target_attention(dispatch.theme_offsets, 2, "reference", **kwargs), inputs, dtype, *_kinds(dtype))


def test_key_bias_folds_away(device):
    """The fold (module docstring): b_k adds b_k . q to every score of a segment, which the
    softmax cancels. The Triton output does not depend on b_k at all, its gradient is exactly
    zero, and it equals the reference, which projects the keys with the bias."""
    lengths = [4, 0, 9]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = _target_inputs(1, 3, 13, 8, torch.float32, device, True)
    leaves = _leaves(inputs)
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


# ----------------------------------------------------------------------------- jagged_self_attention

SELF_SEGMENTS = {"one_token": [1], "empty": [0], "mixed": [0, 5, 0, 70, 1, 0], "primes": [3, 11, 2],
                 "two_blocks_and_more": [130]}


@pytest.mark.parametrize("case", list(SELF_SEGMENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim,num_heads", [(6, 3), (32, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_jagged_self_attention(case, dtype, dim, num_heads, causal, device):
    """Every row and the gradients of q, k and v; q, k and v are column slices of one [N, 3d]
    projection (read in place through their row stride)."""
    lengths = SELF_SEGMENTS[case]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = {"qkv": random_values(sum(lengths), 3 * dim, dtype, device)}

    def run(backend):
        def fn(qkv):
            q, k, v = qkv.split(dim, dim=1)
            return mk.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, causal=causal, backend=backend)
        return fn

    _compare(run("triton"), run("reference"), inputs, dtype, *_kinds(dtype))


# ----------------------------------------------------------------------------- registration

def _registration_inputs(device):
    dispatch = _dispatch([5, 0, 11, 3], 3, 2, None, device)
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


@pytest.mark.parametrize("variant", ["plain", "gather_scatter"])
def test_opcheck_grouped_linear(variant, device):
    x = random_values(19, 8, torch.float32, device).requires_grad_()
    weight = random_values(24, 5, torch.float32, device, seed=1).view(3, 8, 5).requires_grad_()
    bias = random_values(3, 5, torch.float32, device, seed=2).requires_grad_()
    if variant == "plain":
        args = (x, weight, bias, torch.tensor([0, 7, 7, 19], device=device), None, None, None, None)
    else:
        dispatch = _dispatch([5, 0, 11, 3], 3, 1, None, device)
        gate = dispatch.row_gate.detach().float().requires_grad_()
        scatter = torch.randperm(19, generator=torch.Generator().manual_seed(0)).to(device)
        args = (x, weight, bias, dispatch.expert_offsets, dispatch.gather_index, gate, dispatch.inverse_index, scatter)
    torch.library.opcheck(torch.ops.mos.grouped_linear.default, args)


@pytest.mark.parametrize("causal", [True, False])
def test_opcheck_jagged_self_attention(causal, device):
    qkv = random_values(19, 24, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in qkv.clone().split(8, dim=1))
    offsets = torch.tensor([0, 5, 5, 16, 19], device=device)
    torch.library.opcheck(torch.ops.mos.jagged_self_attention.default, (q, k, v, offsets, 2, causal))


def test_opcheck_backward_ops(device):
    """The backward kernels are custom ops too (no autograd of their own): schema, fake, tracing."""
    dispatch, t = _registration_inputs(device)
    tokens, query, w_key, w_value = (t[k].detach() for k in ("tokens", "query", "w_key", "w_value"))
    gate = dispatch.row_gate.detach().float()
    out, pooled, lse = torch.ops.mos.expert_target_attention(tokens, query, w_key, None, w_value, None,
                                                            dispatch.theme_offsets, dispatch.gather_index, gate,
                                                            dispatch.inverse_index, 2)
    torch.library.opcheck(torch.ops.mos.expert_target_attention_backward.default,
                          (torch.randn_like(out), tokens, query, w_key, w_value, dispatch.theme_offsets,
                           dispatch.gather_index, gate, pooled, lse, 2))
    q, k, v = random_values(19, 24, torch.float32, device).split(8, dim=1)
    offsets = torch.tensor([0, 5, 5, 16, 19], device=device)
    out, lse = torch.ops.mos.jagged_self_attention(q, k, v, offsets, 2, True)
    torch.library.opcheck(torch.ops.mos.jagged_self_attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, offsets, 2, True))
    top1 = _dispatch([5, 0, 11, 3], 3, 1, None, device)       # 19 rows, one per token
    weight = random_values(24, 5, torch.float32, device, seed=1).view(3, 8, 5)
    scatter = torch.randperm(19, generator=torch.Generator().manual_seed(0)).to(device)
    torch.library.opcheck(torch.ops.mos.grouped_linear_backward.default,
                          (random_values(19, 5, torch.float32, device, seed=2), tokens, weight, top1.expert_offsets,
                           top1.gather_index, top1.row_gate.detach().float(), scatter))


def test_flop_formulas(device):
    """FlopCounterMode counts the kernels: 2·N·d_in·d_out per grouped GEMM; self-attention 4·d per
    (query, key) pair, the jagged count sum L(L+1)/2 causal; target attention 4·N·H·d + 4·G·d²."""
    lengths, dim, heads = [5, 0, 11], 8, 2
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    x = random_values(16, dim, torch.float32, device)
    weight = random_values(3 * dim, 6, torch.float32, device).view(3, dim, 6)
    with FlopCounterMode(display=False) as counter:
        torch.ops.mos.grouped_linear(x, weight, None, offsets, None, None, None, None)
    assert counter.get_total_flops() == 2 * 16 * dim * 6
    for causal, pairs in ((True, 15 + 66), (False, 25 + 121)):
        with FlopCounterMode(display=False) as counter:
            torch.ops.mos.jagged_self_attention(x, x, x, offsets, heads, causal)
        assert counter.get_total_flops() == 4 * dim * pairs
    t = _target_inputs(1, 3, 16, dim, torch.float32, device, False)
    with FlopCounterMode(display=False) as counter:
        torch.ops.mos.expert_target_attention(t["tokens"], t["query"], t["w_key"], None, t["w_value"], None, offsets,
                                              None, None, None, heads)
    assert counter.get_total_flops() == 4 * 16 * heads * dim + 4 * 3 * dim * dim


# ----------------------------------------------------------------------------- the fused layer

LAYER_OPTIONS = [
    dict(encoder="target_attention"),
    dict(encoder="target_attention", top_k=2, max_theme_tokens=3, global_scope="sessions", fusion="gate"),
    dict(encoder="transformer", readout="target"),
    dict(encoder="transformer", readout="last", top_k=2, max_theme_tokens=3),
    dict(encoder="transformer", readout="mean", num_layers=2, global_scope="sessions"),
]


@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
def test_layer_all_empty_batch_is_finite(encoder, device):
    """No history at all: every segment of every expert is empty; zeros flow, no NaN, and every
    parameter the batch reaches gets a finite gradient."""
    from mos import MoSConfig, MoSLayer

    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(dim=16, num_heads=2, num_themes=4, encoder=encoder, backend="triton")).to(device)
    target = random_values(3, 16, torch.float32, device).requires_grad_()
    out = layer(torch.zeros(0, 16, device=device, requires_grad=True), target, torch.zeros(4, dtype=torch.int64,
                                                                                            device=device))
    (out.output.square().sum() + out.aux_loss).backward()
    assert torch.isfinite(out.output).all() and torch.isfinite(target.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_layer_triton_equals_reference_everywhere(options, device):
    """MoSLayer(backend="triton") runs every step on the kernels and equals backend="reference":
    the output, the auxiliary loss, and the gradient of the inputs and of every parameter."""
    from mos import MoSConfig, MoSLayer
    from mos_kernels.backend import IMPLEMENTED

    assert all("triton" in IMPLEMENTED[op] for op in ("grouped_linear", "expert_target_attention",
                                                        "jagged_self_attention", "session_pool_route",
                                                        "theme_dispatch", "theme_gather"))
    config = dict(dim=16, num_heads=2, num_themes=4, session_len=3, **options)
    torch.manual_seed(0)
    reference = live_extras(MoSLayer(MoSConfig(backend="reference", **config))).to(device)
    fused = MoSLayer(MoSConfig(backend="triton", **config)).to(device)
    fused.load_state_dict(reference.state_dict())
    offsets = mk.offsets_from_lengths(torch.tensor([0, 9, 1, 14, 0, 30], device=device))
    values = random_values(54, 16, torch.float32, device)
    target = random_values(6, 16, torch.float32, device, seed=1)
    results = []
    for layer in (reference, fused):
        x, t = values.clone().requires_grad_(), target.clone().requires_grad_()
        out = layer(x, t, offsets)
        (out.output.square().sum() + out.aux_loss).backward()
        results.append((out, x.grad, t.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (ref, ref_x, ref_t, ref_params), (got, got_x, got_t, got_params) = results
    assert_close(got.output, ref.output, "layer")
    assert_close(got.aux_loss, ref.aux_loss, "layer")
    assert_close(got_x, ref_x, "layer")
    assert_close(got_t, ref_t, "layer")
    assert set(got_params) == set(ref_params)
    for name, grad in ref_params.items():
        assert grad is not None and got_params[name] is not None, f"{name} got no gradient"
        assert_close(got_params[name], grad, "layer", msg=name)
