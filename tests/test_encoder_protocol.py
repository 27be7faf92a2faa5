"""The encoder protocol (mos/encoder_protocol.py): a user's own sequence model as MoSLayer's
global, short-term and theme experts. The layer with a GRU readout against running that GRU on
each expert's subsequence by hand (forward and every expert's gradients); empty segments become
zeros whatever the encoder returns; factories, one-expert modules and built-ins through the same
door; wrong outputs and arguments are refused naming `encoder`."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mos import MoSConfig, MoSLayer
from mos.encoder_protocol import PerExpert, per_expert, run_encoder
from tests.conftest import require_cuda_ext
from tests.tolerances import assert_close

DIM = 8


class GRUReadout(nn.Module):
    """A one-expert encoder: the last hidden state of a GRU over each segment's rows, mixed with
    the target. An empty segment gives the target's term alone (not zeros: the layer must zero it)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.mix = nn.Linear(2 * dim, dim)

    def forward(self, rows, target, segment_offsets, *, max_len=None):
        bounds = segment_offsets.tolist()
        # per_expert hands a one-expert module its non-empty segments only.
        assert all(b > a for a, b in zip(bounds[:-1], bounds[1:])), bounds
        states = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            states.append(self.gru(rows[a:b][None])[1][0, 0] if b > a else rows.new_zeros(rows.shape[1]))
        state = torch.stack(states) if states else rows.new_zeros((0, rows.shape[1]))
        return self.mix(torch.cat([state, target], dim=1))


class MeanReadout(nn.Module):
    """An E-expert encoder in one module: each segment's mean row times a per-expert scale, plus a
    per-expert bias, so an empty segment gives the bias (not zeros: the layer must zero it). The
    count is clamped: a mean over no rows would be 0 / 0, NaN, whose gradient no masking after the
    module could stop (the protocol asks for finite values)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, num_experts))
        self.bias = nn.Parameter(torch.ones(num_experts, DIM))

    def forward(self, rows, target, segment_offsets, *, max_len=None):
        num_segments = segment_offsets.numel() - 1
        lengths = segment_offsets[1:] - segment_offsets[:-1]
        segment = torch.repeat_interleave(torch.arange(num_segments), lengths)
        sums = rows.new_zeros((num_segments, rows.shape[1])).index_add(0, segment, rows)
        means = sums / lengths.clamp_min(1)[:, None].to(rows.dtype)
        num_experts = self.scale.numel()
        return means.view(num_experts, -1, rows.shape[1]) * self.scale[:, None, None] + self.bias[:, None, :]


def _batch(seed: int = 0):
    """Five histories cut into sessions of 2: empty, one event, and longer ones."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [0, 1, 7, 12, 5]
    values = torch.randn(sum(lengths), DIM, generator=gen)
    target = torch.randn(len(lengths), DIM, generator=gen)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return values, target, offsets


def _layer(encoder, **options):
    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(dim=DIM, num_heads=2, num_themes=3, session_len=2, short_sessions=2, **options),
                     encoder=encoder)
    with torch.no_grad():        # zero at initialisation: give the other experts a say
        layer.extras_out.weight.normal_(0.0, 0.5)
    return layer


def _by_hand(layer, values, target, offsets, routing):
    """The layer's output computed from its own expert modules, each run on one subsequence."""
    cfg, num_themes = layer.config, layer.config.num_themes
    sessions, example, theme = (routing.session_offsets.tolist(), routing.session_example.tolist(),
                                routing.session_theme.tolist())
    bounds = offsets.tolist()

    def run(module, rows, b):
        if rows.shape[0] == 0:
            return values.new_zeros(DIM)
        return module(rows, target[b:b + 1], torch.tensor([0, rows.shape[0]]))[0]

    def rows_of(session_ids):
        parts = [values[sessions[s]:sessions[s + 1]] for s in session_ids]
        return torch.cat(parts) if parts else values.new_zeros((0, DIM))

    e_global, e_short, e_theme, lengths = [], [], torch.zeros(num_themes, len(bounds) - 1, DIM), torch.zeros(
        num_themes, len(bounds) - 1, dtype=torch.int64)
    e_theme = [[None] * (len(bounds) - 1) for _ in range(num_themes)]
    for b in range(len(bounds) - 1):
        own = [s for s in range(len(example)) if example[s] == b]
        e_global.append(run(layer.global_expert.experts[0], values[bounds[b]:bounds[b + 1]], b))
        e_short.append(run(layer.short_expert.experts[0], rows_of(own[-cfg.short_sessions:]), b))
        for k in range(num_themes):
            rows = rows_of([s for s in own if theme[s] == k])          # time order
            lengths[k, b] = rows.shape[0]
            e_theme[k][b] = run(layer.theme_experts.experts[k], rows, b)
    e_theme = torch.stack([torch.stack(per_example) for per_example in e_theme])
    summary = layer._theme_summary(e_theme, target, lengths)
    parts = {"short": torch.stack(e_short), "themes": summary}
    extras = layer.extras_out(torch.cat([parts[kind] for kind in layer.experts if kind != "global"], dim=1))
    return torch.stack(e_global) + extras, lengths


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_a_user_gru_runs_as_every_expert_as_by_hand(backend):
    """MoSLayer(encoder=per_expert(GRUReadout)): the output and every expert's gradients equal
    the GRU run on each example's history, last sessions and theme subsequences by hand, with the
    layer's own steps (pooling, routing, dispatch, the gather of each expert's rows) on each
    backend (Triton under the interpreter, CUDA under its emulation on the CPU)."""
    if backend == "cuda":
        require_cuda_ext()
    values, target, offsets = _batch()
    layer = _layer(per_expert(GRUReadout), backend=backend)
    assert isinstance(layer.theme_experts, PerExpert) and len(layer.theme_experts.experts) == 3
    out = layer(values, target, offsets)
    expected, lengths = _by_hand(layer, values, target, offsets, out.routing)
    assert torch.equal(out.routing.segment_lengths, lengths)
    assert (lengths > 0).sum() >= 5 and (lengths == 0).any()          # several themes used, some empty
    assert_close(out.output, expected, "layer")
    params = [p for name, p in layer.named_parameters() if "expert" in name]
    got = torch.autograd.grad(out.output.square().sum(), params)
    want = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for (name, _), g, w in zip([(n, p) for n, p in layer.named_parameters() if "expert" in n], got, want):
        assert w is not None, name
        assert_close(g, w, "layer", msg=name)


def test_empty_segments_give_zeros_whatever_the_encoder_returns():
    """An E-expert module (a factory class) that returns its bias for an empty segment: the empty
    history's global vector and every empty theme segment are zeros, the gradients finite, and an
    empty batch runs."""
    values, target, offsets = _batch()
    layer = _layer(MeanReadout)
    seen = []
    layer.theme_experts.register_forward_hook(lambda module, args, out: seen.append((args[2], out)))
    out = layer(values, target, offsets)
    assert torch.isfinite(out.output).all()
    assert torch.equal(out.global_output[0], torch.zeros(DIM))            # the empty history
    (theme_offsets, raw), = seen
    empty = (theme_offsets[1:] == theme_offsets[:-1]).view(3, -1)
    assert empty.any() and (raw[empty] != 0).all()                       # the module's own value ...
    e_theme = run_encoder(layer.theme_experts, values, target, theme_offsets, gather_index=None)
    assert (e_theme[empty] == 0).all()                                   # ... replaced by zeros
    out.output.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    none = layer(values[:0], target[:0], torch.zeros(1, dtype=torch.int64))
    assert none.output.shape == (0, DIM)


class _TwoExperts(nn.Module):
    """Always returns two experts' vectors, whatever it was built for."""

    def __init__(self, num_experts):
        super().__init__()

    def forward(self, rows, target, segment_offsets, *, max_len=None):
        return rows.new_zeros((2, target.shape[0], rows.shape[1]))


def test_an_encoder_with_the_wrong_number_of_experts_is_named_also_on_an_empty_batch():
    """The layer tells run_encoder how many experts each kind has, so a module returning another
    number is refused on a batch of no examples too (its [E, 0, d] says nothing else)."""
    values, target, offsets = _batch()
    layer = _layer(_TwoExperts)
    for batch in ((values, target, offsets), (values[:0], target[:0], torch.zeros(1, dtype=torch.int64))):
        with pytest.raises(ValueError, match=r"^encoder: expected it to return shape \[[13], \d+, 8\] .*got \[2, \d+, 8\]"):
            layer(*batch)


def test_a_module_is_copied_once_per_expert_and_left_untouched():
    """A one-expert module instance serves as the template: each expert gets its own copy, with
    the template's weights, and training the layer leaves the template as it was."""
    template = GRUReadout()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    layer = _layer(template)
    copies = [layer.global_expert.experts[0], layer.short_expert.experts[0], *layer.theme_experts.experts]
    assert len({id(m) for m in copies}) == 5 and all(m is not template for m in copies)
    assert all(torch.equal(m.mix.weight, template.mix.weight) for m in copies)
    values, target, offsets = _batch()
    layer(values, target, offsets).output.sum().backward()
    assert template.mix.weight.grad is None
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", ["target_attention", "transformer"])
def test_the_built_in_encoders_pass_through_the_same_door(kind):
    """MoSLayer(encoder=None) and MoSLayer(encoder=<the built-in factory>) draw the same weights
    and compute the same output: the built-ins are encoders of the protocol."""
    import functools
    from mos.encoders import make_encoder
    values, target, offsets = _batch()
    config = MoSConfig(dim=DIM, num_heads=2, num_themes=3, session_len=2, short_sessions=2, encoder=kind)
    # The given encoder's layer keeps config.encoder at its default: a user's encoder refuses it.
    given_config = dataclasses.replace(config, encoder=MoSConfig().encoder)
    layers = []
    for cfg, encoder in ((config, None), (given_config, functools.partial(make_encoder, kind, DIM, 2))):
        torch.manual_seed(0)
        layers.append(MoSLayer(cfg, encoder=encoder))
        with torch.no_grad():
            layers[-1].extras_out.weight.fill_(0.1)
    default, given = layers
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), given.state_dict().values()))
    assert list(default.state_dict()) == list(given.state_dict())
    assert torch.equal(default(values, target, offsets).output, given(values, target, offsets).output)


class _NoArguments(nn.Module):
    """A one-expert module whose constructor takes nothing: passed as a factory, it is refused."""

    def forward(self, rows, target, segment_offsets, *, max_len=None):
        return target


class _WrongShape(nn.Module):
    def forward(self, rows, target, segment_offsets, *, max_len=None):
        return rows.new_zeros((target.shape[0], DIM))          # [B, d], not [E, B, d]


class _WrongDtype(nn.Module):
    def forward(self, rows, target, segment_offsets, *, max_len=None):
        return rows.new_zeros((1, target.shape[0], DIM), dtype=torch.float64)


class _NoMaxLen(nn.Module):
    """Leaves out the protocol's max_len keyword."""

    def forward(self, rows, target, segment_offsets):
        return target


class _NoGatherKeywords(_NoArguments):
    """Says it reads the gather index, but takes none of its keywords."""

    reads_gather_index = True


@pytest.mark.parametrize("encoder, error, words", [
    (42, TypeError, ["encoder", "factory", "int"]),
    (_NoMaxLen(), TypeError, ["encoder (a one-expert module)", "_NoMaxLen.forward", "['max_len']",
                              "forward(rows, target, segment_offsets)"]),
    (lambda num_experts: _NoGatherKeywords(), TypeError, ["encoder", "['gather_index', 'row_gate', "
                                                                     "'inverse_index']"]),
    (lambda num_experts: "gru", TypeError, ["encoder", "nn.Module", "str"]),
    (_NoArguments, TypeError, ["encoder", "factory(num_experts=1) raised TypeError", "num_experts",
                                "per_expert(make_one)"]),
    (GRUReadout, TypeError, ["encoder", "factory(num_experts=1)", "unexpected keyword argument 'num_experts'"]),
])
def test_bad_encoders_are_refused_at_construction(encoder, error, words):
    with pytest.raises(error) as info:
        _layer(encoder)
    for word in words:
        assert word in str(info.value)


def test_a_module_instance_lacking_max_len_is_named_without_the_factory_hint():
    """The user passed a module, not a factory: the protocol's message alone, not one about factories."""
    with pytest.raises(TypeError) as info:
        _layer(_NoMaxLen())
    assert str(info.value).startswith("encoder (a one-expert module): expected _NoMaxLen.forward to take")
    assert "factory" not in str(info.value)


@pytest.mark.parametrize("option, value", [("encoder", "transformer"), ("num_heads", 4), ("num_layers", 2),
                                           ("attention_mass", True), ("sdim_rounds", 8), ("sdim_bits", 2),
                                           ("mamba_state", 8)])
def test_a_built_in_option_with_a_user_encoder_is_refused_not_ignored(option, value):
    """Each option that only the built-in encoders read, set with a user's encoder, is refused
    naming `encoder`, the option, its value and its default; at its default it is accepted."""
    config = MoSConfig(**{**dict(dim=DIM, num_themes=3, session_len=2), option: value})
    with pytest.raises(ValueError) as info:
        MoSLayer(config, encoder=per_expert(GRUReadout))
    default = getattr(MoSConfig(), option)
    for word in ("encoder", f"config.{option}={value!r} (default {default!r})", "drop encoder="):
        assert word in str(info.value)
    MoSLayer(dataclasses.replace(config, **{option: default}), encoder=per_expert(GRUReadout))


def test_a_width_the_default_heads_do_not_divide_may_set_num_heads():
    """MoSConfig needs dim % num_heads == 0: at an odd width num_heads must leave its default, so
    with a user's encoder it is accepted there (and still refused where the default would do)."""
    odd = dict(dim=7, num_themes=3, session_len=2, num_heads=1)
    MoSLayer(MoSConfig(**odd), encoder=per_expert(lambda: GRUReadout(7)))
    with pytest.raises(ValueError, match=r"config.num_heads=1 \(default 2\)"):
        MoSLayer(MoSConfig(**dict(odd, dim=8)), encoder=per_expert(GRUReadout))


@pytest.mark.parametrize("module, error, words", [
    (_WrongShape(), ValueError, ["encoder", "shape [1, 5, 8]", "[5, 8]"]),
    (_WrongDtype(), TypeError, ["encoder", "rows' dtype, float32", "float64"]),
])
def test_an_encoder_returning_the_wrong_output_is_named(module, error, words):
    values, target, offsets = _batch()
    with pytest.raises(error) as info:
        run_encoder(module, values, target, offsets)
    for word in words:
        assert word in str(info.value)


def test_per_expert_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="make_one"):
        per_expert(3)
    with pytest.raises(TypeError, match="make_one: expected it to return an nn.Module, got int"):
        per_expert(lambda: 3)(2)


class _NaNForEmpty(nn.Module):
    """A mean readout without the clamp: NaN (0 / 0) for every empty segment."""

    def __init__(self, num_experts: int, one_expert: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_experts))
        self.one_expert = one_expert          # return [B, d], as per_expert asks

    def forward(self, rows, target, segment_offsets, *, max_len=None):
        lengths = segment_offsets[1:] - segment_offsets[:-1]
        segment = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        sums = rows.new_zeros((lengths.numel(), rows.shape[1])).index_add(0, segment, rows)
        means = (sums / lengths[:, None]).view(self.scale.numel(), -1, rows.shape[1]) * self.scale[:, None, None]
        return means[0] if self.one_expert else means


def test_a_non_finite_encoder_output_is_refused_naming_the_encoder():
    """NaN for an empty segment would reach the gradients (0 * NaN in the module's backward): with
    validate_inputs the layer refuses it, naming `encoder`; a one-expert module under per_expert
    never sees an empty segment, so the same readout is fine there."""
    from mos_kernels.checks import NonFiniteError
    values, target, offsets = _batch()
    with pytest.raises(NonFiniteError, match="encoder: expected finite vectors"):
        _layer(_NaNForEmpty)(values, target, offsets)
    layer = _layer(per_expert(lambda: _NaNForEmpty(1, one_expert=True)))
    out = layer(values, target, offsets)
    out.output.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
