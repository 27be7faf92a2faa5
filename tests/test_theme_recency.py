"""`MoSConfig.theme_recency`: each theme expert's tokens carry how many later sessions of their
example went to the same theme. The rank against a loop oracle, the layer against the layer
without the option run on the tokens plus their rank's embedding, its start as the layer without,
and the lab's variant with its matched random-routing control."""
from __future__ import annotations

import pytest
import torch

from mos import MoSConfig, MoSLayer
from mos.config import THEME_RECENCY_BUCKETS
from mos.experts import sessions_after_on_theme
from mos.routing import RandomRouter
from oracles import generator, live_extras, randn
from layer_cases import SMALL_DIM, small_batch
from tolerances import assert_close


def _loop_sessions_after(themes, session_example):
    themes, example = themes.tolist(), session_example.tolist()
    return [sum(1 for j in range(i + 1, len(themes)) if example[j] == example[i] and themes[j] == themes[i])
            for i in range(len(themes))]


@pytest.mark.parametrize("seed", range(4))
def test_sessions_after_on_theme_matches_a_loop(seed, device):
    gen = torch.Generator().manual_seed(seed)
    sessions_per_example = torch.randint(0, 9, (7,), generator=gen)       # examples without sessions too
    session_example = torch.repeat_interleave(torch.arange(7), sessions_per_example)
    themes = torch.randint(0, 3, (session_example.numel(),), generator=gen)
    got = sessions_after_on_theme(themes.to(device), session_example.to(device), num_themes=3, num_examples=7)
    assert got.dtype == torch.int64 and got.device == torch.device(device)
    assert got.tolist() == _loop_sessions_after(themes, session_example)


def test_sessions_after_on_theme_of_no_sessions_is_empty():
    empty = torch.zeros(0, dtype=torch.int64)
    assert sessions_after_on_theme(empty, empty, num_themes=4, num_examples=3).shape == (0,)


def _pair(router=None, **options):
    """The layer with theme_recency (its table and correction made live) and the same weights
    without it, theme experts alone."""
    config = dict(dim=SMALL_DIM, num_heads=2, num_themes=3, session_len=2, **options)
    torch.manual_seed(0)
    with_rank = live_extras(MoSLayer(MoSConfig(theme_recency=True, **config), experts=("themes",),
                                     router=router)).eval()
    without = MoSLayer(MoSConfig(**config), experts=("themes",), router=router).eval()
    state = {k: v for k, v in with_rank.state_dict().items() if k != "theme_recency_embedding"}
    without.load_state_dict(state)
    return with_rank, without


@pytest.mark.parametrize("encoder,router,max_theme_tokens", [
    ("target_attention", "learned", None), ("transformer", "learned", None),
    ("target_attention", "random", None), ("target_attention", "learned", 2)])
def test_the_layer_equals_the_layer_without_on_tokens_plus_their_rank(encoder, router, max_theme_tokens):
    """Routing on the plain tokens in both (routing_values), the theme experts of the layer
    without the option reading each token plus the embedding of its session's rank, counted by
    the loop oracle from the routing the layer reports (random themes drawn alike in both;
    truncated subsequences keep the newest tokens, so rank 0 stays)."""
    with_rank, without = _pair(RandomRouter() if router == "random" else None, encoder=encoder,
                               max_theme_tokens=max_theme_tokens)
    values, target, offsets = small_batch()
    torch.manual_seed(1)
    got = with_rank(values, target, offsets, routing_values=values, routing_target=target)
    routing = got.routing
    rank = torch.tensor(_loop_sessions_after(routing.session_theme, routing.session_example))
    lengths = routing.session_offsets.diff()
    per_token = torch.repeat_interleave(rank.clamp(max=THEME_RECENCY_BUCKETS - 1), lengths)
    shifted = values + with_rank.theme_recency_embedding.detach()[per_token]
    torch.manual_seed(1)
    want = without(shifted, target, offsets, routing_values=values, routing_target=target)
    assert torch.equal(got.routing.session_theme, want.routing.session_theme)
    assert rank.max() > 0                                  # the case ranks sessions at all
    assert_close(got.output, want.output, "layer")


def test_ranks_past_the_last_bucket_share_it():
    """Twenty sessions on one theme: the oldest four share the last bucket's embedding."""
    config = dict(dim=SMALL_DIM, num_heads=2, num_themes=1, session_len=1)
    torch.manual_seed(0)
    layer = live_extras(MoSLayer(MoSConfig(theme_recency=True, **config), experts=("themes",))).eval()
    gen = generator(3)
    values, target = randn(gen, 20, SMALL_DIM, dtype=torch.float32), randn(gen, 1, SMALL_DIM, dtype=torch.float32)
    offsets = torch.tensor([0, 20])
    seen = {}
    def capture(module, args, kwargs):
        seen["values"] = args[0]
    layer.theme_experts.register_forward_pre_hook(capture, with_kwargs=True)
    layer(values, target, offsets)
    read, table = seen["values"], layer.theme_recency_embedding.detach()
    assert torch.equal(read[-1], values[-1] + table[0])                     # the newest session: rank 0
    assert torch.equal(read[-2], values[-2] + table[1])
    last = THEME_RECENCY_BUCKETS - 1
    assert all(torch.equal(read[i], values[i] + table[last]) for i in range(5))   # ranks 19..15
    assert not torch.equal(read[5], values[5] + table[last])                # rank 14


def test_at_initialisation_the_layer_is_the_layer_without():
    values, target, offsets = small_batch()
    outputs = []
    for theme_recency in (False, True):
        torch.manual_seed(0)
        layer = MoSLayer(MoSConfig(dim=SMALL_DIM, num_heads=2, num_themes=3, session_len=3,
                                   theme_recency=theme_recency))
        if theme_recency:
            assert torch.count_nonzero(layer.theme_recency_embedding) == 0
        live_extras(layer)
        if theme_recency:                      # live_extras draws the table too: back to its initial zeros
            with torch.no_grad():
                layer.theme_recency_embedding.zero_()
        outputs.append(layer(values, target, offsets).output)
    assert torch.equal(outputs[0], outputs[1])


def test_the_rank_embedding_trains_and_empty_histories_stay_finite():
    layer = live_extras(MoSLayer(MoSConfig(dim=SMALL_DIM, num_heads=2, num_themes=3, session_len=3,
                                           theme_recency=True)))
    values, target, offsets = small_batch()                 # SMALL_LENGTHS has empty histories
    values.requires_grad_()
    out = layer(values, target, offsets)
    out.output.square().sum().backward()
    assert torch.isfinite(out.output).all() and torch.isfinite(values.grad).all()
    assert layer.theme_recency_embedding.grad.abs().sum() > 0
    empty = layer(torch.zeros(0, SMALL_DIM), target, torch.zeros(5, dtype=torch.int64))
    assert torch.isfinite(empty.output).all()


def test_theme_recency_needs_one_theme_per_session():
    with pytest.raises(ValueError, match=r"MoSConfig.theme_recency: expected top_k=1 .* got top_k=2"):
        MoSConfig(num_themes=4, top_k=2, theme_recency=True)


def test_the_lab_variant_and_its_matched_control():
    from mos.lab.config import ModelConfig
    from mos.lab.variants import random_routing_control, variant_config
    assert random_routing_control("mos_theme_recency") == "mos_random_routing_theme_recency"
    assert variant_config(ModelConfig(), "mos_theme_recency").mos.theme_recency
    control = variant_config(ModelConfig(), "mos_random_routing_theme_recency")
    assert control.mos.theme_recency and control.ablation.router == "random"


def test_the_lab_refuses_it_where_units_are_tokens():
    from mos.lab.config import ModelConfig
    with pytest.raises(ValueError, match=r"model.mos.theme_recency: expected False with routing_unit 'token'"):
        ModelConfig(mos=MoSConfig(theme_recency=True), ablation={"routing_unit": "token"})


def test_it_enters_the_fingerprint_of_mos_runs_only():
    from dataclasses import replace
    from mos.lab.config import RunConfig
    from mos.lab.profiling.runs import fingerprint
    base = RunConfig()
    on = replace(base, model=replace(base.model, mos=replace(base.model.mos, theme_recency=True)))
    assert fingerprint(on, "mos", 0) != fingerprint(base, "mos", 0)
    assert fingerprint(on, "backbone", 0) == fingerprint(base, "backbone", 0)
