"""The parts MoSLayer takes (router, routing unit, expert set): the layer runs what it is handed,
and the built-in alternatives do what they say."""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
import oracles
from mos import MoSLayer
from mos.routing import LearnedRouter, RandomRouter, route_sessions, route_tokens
from oracles import generator, randn
from layer_cases import SMALL_DIM, SMALL_LENGTHS, small_batch, small_layer
from tolerances import assert_close

DIM, LENGTHS = SMALL_DIM, SMALL_LENGTHS
_batch, _layer = small_batch, small_layer


class LastThemeRouter(torch.nn.Module):
    """A user's router: every unit to the last theme, with a learned scalar gate."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def forward(self, values, units, prototypes, *, temperature, top_k, backends, training):
        self.calls += 1
        num_units, num_themes = units.num_sessions, prototypes.shape[0]
        themes = torch.full((num_units, 1), num_themes - 1, dtype=torch.int64)
        gate = self.scale.expand(num_units, 1).to(values.dtype)
        probs = torch.nn.functional.one_hot(themes[:, 0], num_themes).float()
        routing = mk.Routing(themes=themes, gate=gate, probs=probs, scores=probs)
        zero = values.new_zeros((), dtype=torch.float32)
        return None, routing, {"commitment": zero, "codebook": zero, "load_balance": zero}


def test_a_user_router_is_what_routes():
    """A router handed to the layer decides the themes, its parameters are the layer's and get a
    gradient from the task loss (through the gate of the dispatched rows)."""
    router = LastThemeRouter()
    layer = oracles.live_extras(_layer(router=router))
    assert any(p is router.scale for p in layer.parameters())
    values, target, offsets = _batch()
    out = layer(values, target, offsets)
    assert router.calls == 1
    assert (out.routing.session_theme == 2).all() and out.routing.session_theme.numel() > 0
    assert torch.equal(out.routing.segment_lengths[2], torch.tensor(LENGTHS))
    assert int(out.routing.segment_lengths[:2].sum()) == 0 and float(out.aux_loss.detach()) == 0.0
    out.output.square().sum().backward()
    assert router.scale.grad is not None and float(router.scale.grad.abs()) > 0


def test_random_router_draws_distinct_themes_without_learning():
    """RandomRouter: top_k distinct themes per session, uniform probabilities, no auxiliary loss,
    a different draw on every call (torch's generator), and the prototypes left untouched."""
    torch.manual_seed(0)
    layer = MoSLayer(dim=DIM, num_heads=2, num_themes=4, top_k=2, session_len=2, router=RandomRouter())
    values, target, offsets = _batch(1)
    first, second = layer(values, target, offsets), layer(values, target, offsets)
    themes = first.routing.themes
    assert themes.shape[1] == 2 and (themes[:, 0] != themes[:, 1]).all()
    assert torch.equal(first.routing.probs, torch.full_like(first.routing.probs, 0.25))
    assert all(float(v) == 0.0 for v in first.aux.values()) and float(first.aux_loss) == 0.0
    assert not torch.equal(first.routing.themes, second.routing.themes)
    (first.output.sum() + first.aux_loss).backward()
    assert layer.prototypes.grad is None or float(layer.prototypes.grad.abs().sum()) == 0.0


def test_routing_units():
    """route_sessions routes the layer's sessions; route_tokens every token alone (one unit per
    token, each in its own example)."""
    values, target, offsets = _batch(2)
    by_session = _layer(routing_unit=route_sessions)(values, target, offsets).routing
    by_token = _layer(routing_unit=route_tokens)(values, target, offsets).routing
    sessions = mk.sessionize(offsets, mode="fixed", session_len=3, num_tokens=values.shape[0])
    assert torch.equal(by_session.session_offsets, sessions.session_offsets)
    assert torch.equal(by_token.session_offsets, torch.arange(sum(LENGTHS) + 1))
    assert torch.equal(by_token.session_example, mk.segment_ids(offsets, sum(LENGTHS)))


def test_the_default_parts_are_the_layer():
    """No parts given: a learned router over whole sessions, every expert; the same output as
    naming those defaults."""
    values, target, offsets = _batch(3)
    default = oracles.live_extras(_layer())
    named = oracles.live_extras(_layer(router=LearnedRouter(), routing_unit=route_sessions,
                                       experts=("global", "short", "themes")))
    assert isinstance(default.router, LearnedRouter) and default.routing_unit is route_sessions
    assert torch.equal(default(values, target, offsets).output, named(values, target, offsets).output)


@pytest.mark.parametrize("experts", [("themes", "global"), ("short", "global", "themes")])
@pytest.mark.parametrize("fusion", ["residual", "concat"])
def test_expert_order_changes_nothing(experts, fusion):
    """The layer keeps its experts in one order whatever order they are named in: the same seed
    gives the same weights, the fusion's columns mean the same experts, the output is the same."""
    values, target, offsets = _batch(4)
    canonical = tuple(kind for kind in ("global", "short", "themes") if kind in experts)
    a, b = _layer(experts=experts, fusion=fusion), _layer(experts=canonical, fusion=fusion)
    assert a.experts == canonical
    a, b = oracles.live_extras(a), oracles.live_extras(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert torch.equal(a(values, target, offsets).output, b(values, target, offsets).output)


def test_theme_mass_starts_as_the_layer_without_it_and_reads_theme_sizes():
    """theme_mass=True: the same output as without it at initialisation (its weights are zero);
    once they are not, an example's output changes when a theme's share of its history changes
    although the theme's expert vector and every logit but the mass term stay the same."""
    values, target, offsets = _batch(5)
    plain = oracles.live_extras(_layer())
    massed = _layer(theme_mass=True)
    missing, unexpected = massed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["mass_logit", "mass_value"] and not unexpected
    assert torch.equal(massed(values, target, offsets).output, plain(values, target, offsets).output)
    with torch.no_grad():
        massed.mass_value.normal_()
        massed.mass_logit.fill_(1.0)
    out = massed(values, target, offsets)
    assert not torch.allclose(out.output, plain(values, target, offsets).output)
    (out.output.square().sum()).backward()
    assert float(massed.mass_value.grad.abs().sum()) > 0 and float(massed.mass_logit.grad.abs()) > 0
    # By hand for one example: the summary is softmax(logits + a m) . (e + m v) over non-empty themes.
    e = torch.randn(3, 2, DIM)
    lengths = torch.tensor([[4, 0], [1, 2], [0, 0]])
    logits = torch.randn(2, 3)
    e2, l2 = massed._theme_mass(massed, e, logits, lengths)
    m = torch.log1p(lengths.float())
    assert torch.allclose(e2, e + m[:, :, None] * massed.mass_value[:, None, :])
    assert torch.allclose(l2, logits + 1.0 * m.t())


def test_attention_mass_is_the_log_of_one_plus_the_summed_exponentials():
    """attention_mass on gathered, gated rows of two experts, one segment empty: each head's
    log(1 + sum exp(k . q / sqrt(d_h))) by a loop, and gradients that reach keys and queries."""
    from mos.encoders import attention_mass
    gen = generator(6)
    tokens = randn(gen, 7, DIM, dtype=torch.float64)
    gather = torch.tensor([3, 0, 6, 2, 2, 5])
    gate = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    offsets = torch.tensor([0, 2, 2, 5, 6])             # experts 0, 1 with B = 2: segment 1 empty
    w_key = randn(gen, 2, DIM, DIM, dtype=torch.float64).requires_grad_()
    b_key = randn(gen, 2, DIM, dtype=torch.float64)
    query = randn(gen, 4, DIM, dtype=torch.float64).requires_grad_()
    got = attention_mass(tokens, query, w_key, b_key, offsets, 2, gather_index=gather, row_gate=gate,
                         backend="reference")
    want = torch.zeros(4, 2, dtype=torch.float64)
    for s in range(4):
        expert = s // 2
        for h in range(2):
            total = torch.tensor(1.0, dtype=torch.float64)
            for r in range(int(offsets[s]), int(offsets[s + 1])):
                key = (tokens[gather[r]] * gate[r]) @ w_key[expert] + b_key[expert]
                total = total + torch.exp(key[4 * h:4 * h + 4] @ query[s, 4 * h:4 * h + 4] / 2.0)
            want[s, h] = torch.log(total)
    assert_close(got.detach(), want, "float64")
    assert float(got[1].detach().abs().sum()) == 0.0
    got.sum().backward()
    assert float(w_key.grad.abs().sum()) > 0 and float(query.grad[0].abs().sum()) > 0


def test_attention_mass_starts_as_the_layer_without_it():
    """Its weights start at zero and draw nothing from the random stream: the same weights and
    output as the layer without it; once nonzero, the output reads it."""
    values, target, offsets = _batch(7)
    plain = oracles.live_extras(_layer())
    massed = _layer(attention_mass=True)
    missing, unexpected = massed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["global_expert.w_mass", "short_expert.w_mass", "theme_experts.w_mass"]
    fresh = _layer(attention_mass=True)
    assert all(torch.equal(fresh.state_dict()[k], _layer().state_dict()[k]) for k in _layer().state_dict())
    assert torch.equal(massed(values, target, offsets).output, plain(values, target, offsets).output)
    with torch.no_grad():
        massed.global_expert.w_mass.normal_()
    assert not torch.allclose(massed(values, target, offsets).output, plain(values, target, offsets).output)


def test_parts_that_cannot_be_used_are_refused_by_name():
    """A router class instead of an instance, or a router or routing unit for a layer that runs
    no theme experts (it would never route, and a router module's weights would get no gradient)."""
    with pytest.raises(TypeError, match=r"router: expected a callable \(see mos\.routing\), got the class "
                                        r"RandomRouter \(pass an instance\)"):
        _layer(router=RandomRouter)
    with pytest.raises(ValueError, match=r"router: expected none when no theme experts run "
                                         r"\(experts=\['global', 'short'\]\)"):
        _layer(router=RandomRouter(), experts=("global", "short"))
    with pytest.raises(ValueError, match=r"routing_unit: expected none when no theme experts run"):
        _layer(routing_unit=route_tokens, experts=("global",))
    with pytest.raises(TypeError, match=r"MoSConfig\.readout: removed; the transformer encoder always reads out"):
        _layer(readout="last")


def test_a_router_module_registers_after_the_experts():
    """The dtype check reads the layer's first parameter: an expert's, not a user router's."""
    router = LastThemeRouter().double()
    layer = _layer(router=router)
    assert next(layer.parameters()).dtype == torch.float32
    assert list(layer.named_parameters())[-1][0] == "router.scale"


class _FixedRouter:
    """A user's router returning what `spoil` makes of a valid top-2 routing (themes 0 and 1)."""

    def __init__(self, spoil):
        self.spoil = spoil

    def __call__(self, values, units, prototypes, *, temperature, top_k, backends, training):
        num_units, num_themes = units.num_sessions, prototypes.shape[0]
        themes = torch.tensor([[0, 1]]).expand(num_units, 2).contiguous()
        probs = torch.full((num_units, num_themes), 1.0 / num_themes)
        routing = dict(themes=themes, gate=torch.ones(num_units, 2), probs=probs, scores=probs)
        return self.spoil(routing)


def _as_result(routing):
    return None, mk.Routing(**routing), {}


def _with(**change):
    return lambda routing: _as_result({**routing, **{k: f(routing[k]) for k, f in change.items()}})


def _units_with(**change):
    def unit(offsets, sessions, num_tokens):
        fields = dict(session_offsets=sessions.session_offsets, session_example=sessions.session_example,
                      example_session_offsets=sessions.example_session_offsets)
        return mk.Sessions(**{**fields, **{k: f(fields[k]) for k, f in change.items()}})
    return unit


def _token_pairs(offsets, sessions, num_tokens):
    """Units of two tokens each, whatever the examples: with lengths [0, 7, 1, 12] unit 3 (rows
    6:8) holds example 1's last row and example 2's only one."""
    starts = torch.arange(0, num_tokens + 1, 2)
    example = mk.segment_ids(offsets, num_tokens)[starts[:-1]]
    return mk.Sessions(starts, example, mk.offsets_from_lengths(torch.bincount(example, minlength=len(LENGTHS))))


# A caller's router or routing unit that returns something the dispatch cannot use: refused,
# naming the part and the field, where the layer used to index out of range, route a token to
# one theme twice, or fail with a bare AttributeError.
BAD_PARTS = {
    "theme_past_k": (dict(router=_FixedRouter(_with(themes=lambda t: t + 2))), ValueError,
                     r"^router: themes: expected values in \[0, 2\], got min 2, max 3"),
    "negative_theme": (dict(router=_FixedRouter(_with(themes=lambda t: t - 1))), ValueError, r"^router: themes"),
    "repeated_theme": (dict(router=_FixedRouter(_with(themes=lambda t: t[:, :1].expand(-1, 2)))), ValueError,
                       r"^router: themes: expected distinct themes"),
    "nan_gate": (dict(router=_FixedRouter(_with(gate=lambda g: g * math.nan))), ValueError, r"^router: gate"),
    "one_choice_short": (dict(router=_FixedRouter(_with(themes=lambda t: t[:, :1], gate=lambda g: g[:, :1]))),
                         ValueError, r"^router: themes: expected shape \[\d+, 2\]"),
    "float_themes": (dict(router=_FixedRouter(_with(themes=lambda t: t.float()))), TypeError, r"^router: themes"),
    "router_returns_none": (dict(router=_FixedRouter(lambda routing: None)), TypeError,
                            r"^router: expected it to return \(pooled or None, mos_kernels.Routing, aux losses\), "
                            r"got NoneType"),
    "routing_not_a_routing": (dict(router=_FixedRouter(lambda routing: (None, routing, {}))), TypeError,
                              r"^router: expected a mos_kernels.Routing second, got dict"),
    "unit_returns_none": (dict(routing_unit=lambda offsets, sessions, num_tokens: None), TypeError,
                          r"^routing_unit: expected it to return mos_kernels.Sessions, got NoneType"),
    "unit_offsets_short": (dict(routing_unit=_units_with(session_offsets=lambda o: o - (o == o[-1]).long())),
                           ValueError, r"^routing_unit: returned Sessions whose session_offsets: expected "
                                       r"offsets\[-1\] == 20"),
    "unit_spans_two_examples": (dict(routing_unit=_token_pairs), ValueError,
                                r"^routing_unit: returned Sessions whose session_offsets: expected each unit's "
                                r"rows inside its example's, got unit 3 \(rows 6:8\) outside example 1 "
                                r"\(rows 0:7\)"),
    "unit_examples_out_of_order": (dict(routing_unit=_units_with(session_example=lambda e: e.flip(0))), ValueError,
                                   r"^routing_unit: returned Sessions whose session_example"),
    # Monotone, but example 0 owns every unit where session_example spreads them over examples.
    "unit_example_offsets_wrong": (dict(routing_unit=_units_with(example_session_offsets=lambda o: torch.cat(
        [o[:1], o[-1:].expand(o.numel() - 1)]))), ValueError, r"^routing_unit: returned Sessions whose example_session_offsets"),
}


@pytest.mark.parametrize("case", BAD_PARTS)
def test_a_caller_s_router_or_unit_returning_bad_routing_is_named(case):
    parts, error, pattern = BAD_PARTS[case]
    layer = small_layer(top_k=2, **parts)
    values, target, offsets = _batch()
    with pytest.raises(error, match=pattern):
        layer(values, target, offsets)


def test_a_valid_routing_from_a_caller_s_parts_runs():
    """The same router and unit unspoiled run (so each case above fails on its spoiled field)."""
    layer = small_layer(top_k=2, router=_FixedRouter(_as_result), routing_unit=_units_with())
    values, target, offsets = _batch()
    out = layer(values, target, offsets)
    assert torch.isfinite(out.output).all() and layer.custom_routing
    assert not small_layer().custom_routing and not small_layer(router=RandomRouter()).custom_routing


def test_routing_parts_swapped_after_construction_are_checked():
    """custom_routing is read at each call: a router assigned later gets the data checks."""
    layer = small_layer(top_k=2)
    assert not layer.custom_routing
    layer.router = _FixedRouter(_with(themes=lambda t: t + 2))
    assert layer.custom_routing
    with pytest.raises(ValueError, match=r"^router: themes: expected values in \[0, 2\]"):
        layer(*_batch())
