"""MoSLayer end to end: every option combination runs with finite outputs and gradients (also on
empty sequences and an all-empty batch), padded input equals jagged input, each expert reads
what its expert is defined to read (checked against the oracles), no cross-talk between examples, the
router learns from the task loss alone, and the auxiliary losses are what the layer defines (codebook, commitment, load balance).
"""
from __future__ import annotations

import inspect

import pytest
import torch

import oracles
from mos import MoSLayer
from mos.config import MoSConfig
from mos.routing import LearnedRouter
from oracles import generator, increasing_times, randn
from tolerances import assert_close

DIM = 8
GAP = 100.0
MIXED = [0, 7, 1, 0, 12, 5, 0]  # empty first, in the middle and last; a one-token sequence
ALL_EMPTY = [0, 0, 0]

ENCODERS = ["target_attention", "transformer", "sdim", "mamba4rec"]


def make_layer(device, *, live=True, parts=None, **options) -> MoSLayer:
    """live: the residual fusion's other-experts term made nonzero (`oracles.live_extras`), so the
    tests see every expert; live=False keeps the initial layer, which is its global expert.
    parts: MoSLayer's keyword parts (router, routing_unit, experts)."""
    config = dict(dim=DIM, num_heads=2, num_themes=3, session_len=3, gap_seconds=GAP, max_session_len=4,
                  temperature=0.5)
    config.update(options)
    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(**config), **(parts or {}))
    return (oracles.live_extras(layer) if live else layer).to(device)


def batch(lengths, seed, device):
    """values [T, d], target [B, d], offsets [B+1], timestamps [T] (float64 seconds)."""
    gen = generator(seed)
    values = randn(gen, sum(lengths), DIM, dtype=torch.float32, device=device)
    target = randn(gen, len(lengths), DIM, dtype=torch.float32, device=device)
    times = increasing_times(gen, lengths, GAP).to(device)
    return values, target, oracles.offsets_of(lengths).to(device), times


def run(layer, values, target, offsets, times, **kwargs):
    timestamps = times if layer.config.session_mode == "gap" else None
    return layer(values, target, offsets, timestamps=timestamps, **kwargs)


def assert_finite_grads(layer, *inputs):
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"gradient of {name} is not finite"
    for i, t in enumerate(inputs):
        if t.numel() == 0 and t.grad is None:
            continue   # an empty input may be unused (no rows to read): nothing to check
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"gradient of input {i} is not finite"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("global_scope", ["tokens", "sessions"])
@pytest.mark.parametrize("fusion", ["residual", "concat"])
@pytest.mark.parametrize("session_mode", ["fixed", "gap"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("max_theme_tokens", [None, 3])
def test_all_options_finite(encoder, global_scope, fusion, session_mode, top_k, max_theme_tokens, device):
    """Every option combination: [B, d] finite output and finite aux losses; every parameter gets
    a finite gradient from output + aux loss on a batch with empty sequences, and the theme
    subsequences hold T * top_k tokens (fewer, none above max_theme_tokens, with that cap); an
    all-empty batch also gives finite outputs and gradients."""
    layer = make_layer(device, encoder=encoder, global_scope=global_scope, fusion=fusion,
                       session_mode=session_mode, top_k=top_k, max_theme_tokens=max_theme_tokens)
    for lengths in (MIXED, ALL_EMPTY):
        layer.zero_grad(set_to_none=True)
        values, target, offsets, times = batch(lengths, 1, device)
        values.requires_grad_()
        target.requires_grad_()
        out = run(layer, values, target, offsets, times)
        assert out.output.shape == (len(lengths), DIM)
        assert torch.isfinite(out.output).all()
        assert torch.isfinite(out.aux_loss) and all(torch.isfinite(v) for v in out.aux.values())
        w = randn(generator(2), len(lengths), DIM, dtype=torch.float32, device=device)
        ((out.output * w).sum() + out.aux_loss).backward()
        assert_finite_grads(layer, values, target)
        if lengths is MIXED:
            missing = [name for name, p in layer.named_parameters() if p.grad is None]
            assert not missing, f"parameters without a gradient: {missing}"
            dispatched = int(out.routing.tokens_per_theme.sum())
            if max_theme_tokens is None:
                assert dispatched == sum(lengths) * top_k
            else:
                assert dispatched < sum(lengths) * top_k
                assert int(out.routing.segment_lengths.max()) <= max_theme_tokens


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("session_mode", ["fixed", "gap"])
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, 3)])
def test_padded_input_equals_jagged(encoder, session_mode, top_k, max_theme_tokens, device):
    """Padded values [B, L, d] + lengths (+ timestamps [B, L]) give bit for bit the output of the
    jagged input; padding cells (garbage values, times going back) are never read."""
    layer = make_layer(device, encoder=encoder, session_mode=session_mode, top_k=top_k,
                       max_theme_tokens=max_theme_tokens)
    values, target, offsets, times = batch(MIXED, 3, device)
    width = max(MIXED) + 2
    padded = 1e3 * randn(generator(4), len(MIXED), width, DIM, dtype=torch.float32, device=device)
    padded_times = torch.full((len(MIXED), width), -1e9, dtype=times.dtype, device=device)
    for b, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        padded[b, :hi - lo] = values[lo:hi]
        padded_times[b, :hi - lo] = times[lo:hi]
    lengths = torch.tensor(MIXED, device=device)
    jag = run(layer, values, target, offsets, times)
    pad = layer(padded, target, lengths=lengths,
                timestamps=padded_times if session_mode == "gap" else None)
    # Bitwise on the CPU. On CUDA the reference attention's index_add uses atomics, whose
    # summation order varies from run to run: the same computation then agrees to fp32 rounding.
    assert_close(pad.output, jag.output, "exact" if pad.output.device.type == "cpu" else "layer")
    assert torch.equal(pad.routing.segment_lengths, jag.routing.segment_lengths)


def record_calls(module):
    """Record the bound arguments of every call of `module`."""
    calls = []
    signature = inspect.signature(module.forward)

    def hook(mod, args, kwargs, output):
        calls.append(signature.bind(*args, **kwargs).arguments)

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("session_mode", ["fixed", "gap"])
@pytest.mark.parametrize("short_sessions", [1, 2, 10])
@pytest.mark.parametrize("global_scope", ["tokens", "sessions"])
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, 3)])
def test_experts_read_the_oracle_inputs(session_mode, short_sessions, global_scope, top_k, max_theme_tokens, device):
    """Wiring, against the oracles: the theme experts read the oracle dispatch of the reported
    routing; the short-term expert reads each example's tokens of its last `short_sessions`
    sessions; the global expert reads all tokens, or the oracle session means
    (global_scope="sessions") with one segment of sessions per example."""
    layer = make_layer(device, session_mode=session_mode, short_sessions=short_sessions, global_scope=global_scope,
                       top_k=top_k, max_theme_tokens=max_theme_tokens)
    theme_calls, global_calls, short_calls = (record_calls(m) for m in
                                              (layer.theme_experts, layer.global_expert, layer.short_expert))
    values, target, offsets, times = batch(MIXED, 16, device)
    out = run(layer, values, target, offsets, times)
    so, se, eso = oracles.sessionize(offsets.cpu(), mode=session_mode, session_len=3,
                                     timestamps=times.cpu() if session_mode == "gap" else None,
                                     gap_seconds=GAP, max_session_len=4)
    assert torch.equal(out.routing.session_offsets.cpu(), so)

    (theme,) = theme_calls
    index, _, theme_offsets, _ = oracles.theme_dispatch(out.routing.themes.cpu(), torch.ones(out.routing.themes.shape),
                                                        so, se, num_examples=len(MIXED), num_themes=3,
                                                        max_theme_tokens=max_theme_tokens)
    assert theme["tokens"] is values
    assert torch.equal(theme["gather_index"].cpu(), index)
    assert torch.equal(theme["segment_offsets"].cpu(), theme_offsets)

    (short,) = short_calls
    rows, lengths = [], []
    for b in range(len(MIXED)):
        first = max(int(eso[b + 1]) - short_sessions, int(eso[b]))
        rows += list(range(int(so[first]), int(offsets[b + 1])))
        lengths.append(int(offsets[b + 1]) - int(so[first]))
    assert short["tokens"] is values
    assert short["gather_index"].cpu().tolist() == rows
    assert torch.equal(short["segment_offsets"].cpu(), oracles.offsets_of(lengths))

    (glob,) = global_calls
    if global_scope == "tokens":
        assert glob["tokens"] is values and glob.get("gather_index") is None
        assert torch.equal(glob["segment_offsets"], offsets)
    else:
        assert_close(glob["tokens"], oracles.session_pool(values.double().cpu(), so).float().to(device),
                     "reduction")
        assert torch.equal(glob["segment_offsets"].cpu(), eso)


CROSS_TALK_OPTIONS = [
    dict(encoder="target_attention"),
    dict(encoder="target_attention", session_mode="gap", top_k=2, max_theme_tokens=3, fusion="concat",
         global_scope="sessions"),
    dict(encoder="transformer", top_k=2, max_theme_tokens=2, theme_mass=True),
    dict(encoder="transformer", session_mode="gap", global_scope="sessions"),
    dict(encoder="transformer", fusion="concat", max_theme_tokens=3, short_sessions=2),
]


@pytest.mark.parametrize("options", CROSS_TALK_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_no_cross_talk_between_examples(options, device):
    """Example b's output (and routing) equals running example b alone: dispatch, attention and
    fusion never mix examples."""
    layer = make_layer(device, **options)
    values, target, offsets, times = batch(MIXED, 5, device)
    full = run(layer, values, target, offsets, times)
    for b in range(len(MIXED)):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        alone = run(layer, values[lo:hi], target[b:b + 1], torch.tensor([0, hi - lo], device=device),
                    times[lo:hi])
        assert_close(alone.output[0], full.output[b], "layer", msg=f"example {b}")
        assert torch.equal(alone.routing.segment_lengths[:, 0], full.routing.segment_lengths[:, b])


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_router_learns_from_task_loss_alone(encoder, top_k, device):
    """Aux weights 0 and the theme query zeroed (so the fusion logits do not touch the
    prototypes): the prototypes still get a nonzero gradient from the task loss, through the
    straight-through gate of the dispatched rows; the aux loss is exactly 0."""
    layer = make_layer(device, encoder=encoder, top_k=top_k, commitment_weight=0.0,
                       codebook_weight=0.0, load_balance_weight=0.0)
    with torch.no_grad():
        layer.theme_query.weight.zero_()
        layer.theme_query.bias.zero_()
    values, target, offsets, times = batch(MIXED, 6, device)
    out = run(layer, values, target, offsets, times)
    assert float(out.aux_loss.detach()) == 0.0
    (out.output * randn(generator(7), len(MIXED), DIM, dtype=torch.float32, device=device)).sum().backward()
    grad = layer.prototypes.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("session_mode,top_k", [("fixed", 1), ("gap", 2)])
def test_aux_losses_match_definition(session_mode, top_k, device):
    """commitment = codebook = mean over sessions of |unit(h_s) - unit(c_{r_s})|^2; load balance
    = K * sum_k f_k P_k (loop oracle on the routing the layer reports); aux_loss is the weighted
    sum; Switch bound load_balance <= K."""
    layer = make_layer(device, session_mode=session_mode, top_k=top_k, commitment_weight=0.3,
                       codebook_weight=0.7, load_balance_weight=0.2)
    values, target, offsets, times = batch(MIXED, 9, device)
    out = run(layer, values, target, offsets, times)
    r = out.routing
    pooled = oracles.session_pool(values.double().cpu(), r.session_offsets.cpu())
    vq, balance = oracles.aux_losses(pooled, layer.prototypes.detach().double().cpu(), r.themes.cpu(),
                                     r.probs.double().cpu())
    aux = out.aux
    assert_close(aux["commitment"], aux["codebook"], "exact")
    assert_close(aux["commitment"], torch.tensor(vq, dtype=torch.float32, device=device), "reduction")
    assert_close(aux["load_balance"], torch.tensor(balance, dtype=torch.float32, device=device), "reduction")
    assert 0 < float(aux["load_balance"]) <= layer.config.num_themes
    weighted = 0.3 * aux["commitment"] + 0.7 * aux["codebook"] + 0.2 * aux["load_balance"]
    assert_close(out.aux_loss.detach(), weighted, "reduction")


def test_load_balance_is_one_when_uniform(device):
    """Hand-built: K = 2, prototypes e0 and e1, two sessions mirrored across the diagonal (one
    chooses theme 0, the other theme 1, with mirrored probabilities): f = P = (1/2, 1/2), so the
    Switch load balance K * sum f_k P_k is exactly 1."""
    layer = make_layer(device, dim=4, num_themes=2, session_len=2)
    with torch.no_grad():
        layer.prototypes.copy_(torch.eye(4, device=device)[:2])
    a, b = [1.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0]
    values = torch.tensor([a, a, b, b], device=device)
    out = layer(values, torch.ones(1, 4, device=device), torch.tensor([0, 4], device=device))
    assert out.routing.session_theme.tolist() == [0, 1]
    assert_close(out.aux["load_balance"], torch.tensor(1.0, device=device), "reduction")


def test_aux_stop_gradients(device):
    """With the tokens reaching the VQ losses (LearnedRouter(vq_detach_tokens=False)): commitment moves the
    session vectors only (prototypes stopped), codebook the prototypes only (session vectors
    stopped), load balance both."""
    values, target, offsets, times = batch(MIXED, 10, device)
    for name, moves_values, moves_prototypes in (("commitment", True, False), ("codebook", False, True),
                                                 ("load_balance", True, True)):
        value_grad, proto_grad = _aux_gradients(device, name, values, target, offsets, times, detach=False)
        assert (value_grad > 0) == moves_values, f"{name}: gradient of values {value_grad}"
        assert (proto_grad > 0) == moves_prototypes, f"{name}: gradient of prototypes {proto_grad}"


def test_detached_tokens_take_no_gradient_from_aux_losses(device):
    """LearnedRouter(vq_detach_tokens=True), the default: no auxiliary loss sends any gradient to the tokens
    (the item embeddings), and the codebook and load-balance losses still move the prototypes."""
    values, target, offsets, times = batch(MIXED, 10, device)
    for name, moves_prototypes in (("commitment", False), ("codebook", True), ("load_balance", True)):
        value_grad, proto_grad = _aux_gradients(device, name, values, target, offsets, times, detach=True)
        assert value_grad == 0.0, f"{name}: gradient of values {value_grad}"
        assert (proto_grad > 0) == moves_prototypes, f"{name}: gradient of prototypes {proto_grad}"


def _aux_gradients(device, name, values, target, offsets, times, *, detach):
    """|grad| summed over the tokens and over the prototypes of aux loss `name` alone."""
    weights = dict(commitment_weight=0.0, codebook_weight=0.0, load_balance_weight=0.0)
    weights[f"{name}_weight"] = 1.0
    layer = make_layer(device, parts=dict(router=LearnedRouter(vq_detach_tokens=detach)), **weights)
    leaf = values.clone().requires_grad_()
    run(layer, leaf, target, offsets, times).aux_loss.backward()
    value_grad = 0.0 if leaf.grad is None else float(leaf.grad.abs().sum())
    proto_grad = 0.0 if layer.prototypes.grad is None else float(layer.prototypes.grad.abs().sum())
    return value_grad, proto_grad


@pytest.mark.parametrize("experts", [("global", "short", "themes"), ("global", "themes"), ("global", "short")])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_residual_fusion_starts_as_the_global_expert(experts, encoder, device):
    """fusion="residual" at initialisation: the output is exactly the global expert's (the other
    experts' projection is zero), and that projection still gets a gradient, so it learns."""
    layer = make_layer(device, live=False, encoder=encoder, parts=dict(experts=experts))
    values, target, offsets, times = batch(MIXED, 16, device)
    out = run(layer, values, target, offsets, times)
    alone = layer.global_expert(values, target, offsets)[0]
    assert torch.equal(out.output, alone)
    out.output.pow(2).sum().backward()
    assert float(layer.extras_out.weight.grad.abs().sum()) > 0


def test_aux_losses_all_empty_batch(device):
    """No sessions at all: the aux losses are 0, not NaN (no division by zero sessions)."""
    layer = make_layer(device)
    values, target, offsets, times = batch(ALL_EMPTY, 11, device)
    out = run(layer, values, target, offsets, times)
    for name, value in out.aux.items():
        assert float(value) == 0.0, f"{name} = {float(value)}"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_sessions_on_one_theme(encoder, top_k, device):
    """Every token along one direction u and prototype 0 = u: every session chooses theme 0
    first, the other themes (top_k = 1) are empty; output and gradients stay finite."""
    layer = make_layer(device, encoder=encoder, top_k=top_k, num_themes=4)
    gen = generator(12)
    u = torch.nn.functional.normalize(randn(gen, DIM, dtype=torch.float32), dim=0).to(device)
    with torch.no_grad():
        layer.prototypes.copy_(torch.stack([u, -u, randn(gen, DIM, dtype=torch.float32).to(device), -u]))
    values, target, offsets, times = batch(MIXED, 13, device)
    values = (values[:, :1].abs() + 0.1) * u
    values.requires_grad_()
    out = run(layer, values, target, offsets, times)
    assert (out.routing.session_theme == 0).all()
    assert torch.equal(out.routing.segment_lengths[0].cpu(), torch.tensor(MIXED))
    if top_k == 1:
        assert int(out.routing.segment_lengths[1:].sum()) == 0
    assert torch.isfinite(out.output).all()
    (out.output.sum() + out.aux_loss).backward()
    assert_finite_grads(layer, values)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_single_theme_and_identical_prototypes(encoder, device):
    """K = 1 (one theme expert holds every token) and K = 3 with identical prototypes (every
    score tied): finite outputs and gradients, every token dispatched once."""
    values, target, offsets, times = batch(MIXED, 14, device)
    for num_themes in (1, 3):
        layer = make_layer(device, encoder=encoder, num_themes=num_themes)
        with torch.no_grad():
            layer.prototypes.copy_(layer.prototypes[:1].expand_as(layer.prototypes))
        leaf = values.clone().requires_grad_()
        out = run(layer, leaf, target, offsets, times)
        assert torch.equal(out.routing.segment_lengths.sum(0).cpu(), torch.tensor(MIXED))
        assert torch.isfinite(out.output).all()
        (out.output.sum() + out.aux_loss).backward()
        assert_finite_grads(layer, leaf)


def test_max_len_bound_changes_nothing(device):
    """A max_len bound larger than the longest sequence gives the same output."""
    for encoder in ("target_attention", "transformer"):
        layer = make_layer(device, encoder=encoder)
        values, target, offsets, times = batch(MIXED, 15, device)
        assert_close(run(layer, values, target, offsets, times, max_len=40).output,
                     run(layer, values, target, offsets, times).output, "layer")

