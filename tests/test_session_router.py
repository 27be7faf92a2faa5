"""A router that learns its themes from sessions: the session-consistency loss against a loop
oracle and at its two extremes, the layer's routing_values/routing_target (what routes is what
the caller says; the theme experts still read the tokens), and the lab's routing embedding
(it never changes what the backbone learns, and finished runs keep their fingerprints)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import mos_kernels as mk
import oracles
from mos.config import MoSConfig
from mos.routing import LearnedRouter, session_consistency_loss
from mos_kernels.checks import NonFiniteError
from oracles import generator, randn
from layer_cases import SMALL_DIM, SMALL_LENGTHS, small_batch, small_layer
from tolerances import assert_close

DIM, LENGTHS = SMALL_DIM, SMALL_LENGTHS
_batch, _layer = small_batch, small_layer


def _loop_consistency(values, unit_offsets, prototypes, temperature):
    """log K - I over (token, mean of its unit's other tokens) pairs, one pair at a time."""
    num_themes = prototypes.shape[0]
    unit_vectors = torch.nn.functional.normalize(prototypes, dim=1)
    p = [torch.softmax(torch.nn.functional.normalize(v, dim=0) @ unit_vectors.t() / temperature, dim=0)
         for v in values]
    joint, pairs = torch.zeros(num_themes, num_themes, dtype=values.dtype), 0
    bounds = unit_offsets.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for t in range(start, end):
            others = [p[j] for j in range(start, end) if j != t]
            if not others:
                continue
            joint += torch.outer(p[t], sum(others) / len(others))
            pairs += 1
    if pairs == 0:
        return torch.zeros((), dtype=values.dtype)
    joint = (joint / pairs + (joint / pairs).t()) / 2
    marginal = joint.sum(1)
    information = sum(joint[i, j] * math.log(joint[i, j] / (marginal[i] * marginal[j]))
                      for i in range(num_themes) for j in range(num_themes))
    return math.log(num_themes) - information


def test_session_consistency_matches_a_loop_oracle():
    """Units of 1, 3, 0, 4 and 2 tokens (the single token and the empty unit give no pair)."""
    gen = generator(3)
    values, prototypes = randn(gen, 10, DIM, dtype=torch.float64), randn(gen, 5, DIM, dtype=torch.float64)
    unit_offsets = torch.tensor([0, 1, 4, 4, 8, 10])
    got = session_consistency_loss(values, unit_offsets, prototypes, 0.5)
    assert got.dtype == torch.float32          # the routing geometry is fp32 (mos_kernels.routing.normalized)
    want = torch.tensor(float(_loop_consistency(values, unit_offsets, prototypes, 0.5)), dtype=torch.float32)
    assert_close(got, want, "reduction")


def test_session_consistency_is_zero_for_pure_balanced_themes_and_log_k_for_one_theme():
    """Its two ends: every session's tokens on their own prototype, the K themes used evenly ->
    0; every token on one prototype (collapse) -> log K, however consistent the sessions are."""
    num_themes = 4
    prototypes = torch.eye(num_themes, DIM)
    unit_offsets = torch.arange(0, 3 * 2 * num_themes + 1, 3)            # 8 sessions of 3 tokens
    pure = prototypes[torch.arange(2 * num_themes).remainder(num_themes).repeat_interleave(3)]
    assert float(session_consistency_loss(pure, unit_offsets, prototypes, 0.01)) < 1e-4
    collapsed = prototypes[torch.zeros(pure.shape[0], dtype=torch.long)]
    assert_close(session_consistency_loss(collapsed, unit_offsets, prototypes, 0.01),
                 torch.tensor(math.log(num_themes)), "reduction")
    mixed = prototypes[torch.arange(pure.shape[0]).remainder(num_themes)]   # sessions of mixed themes
    assert float(session_consistency_loss(mixed, unit_offsets, prototypes, 0.01)) > 0.5


def test_session_consistency_without_pairs_is_a_finite_zero():
    """Only single-token and empty units (routing by token, a history of one event): no pair,
    loss 0 and a finite backward."""
    values = torch.randn(3, DIM, requires_grad=True)
    prototypes = torch.randn(4, DIM, requires_grad=True)
    loss = session_consistency_loss(values, torch.tensor([0, 1, 1, 2, 3]), prototypes, 0.1)
    assert float(loss.detach()) == 0.0
    loss.backward()
    for leaf in (values, prototypes):        # the zero keeps the graph: zero gradients, not None
        assert leaf.grad is not None and float(leaf.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_session_consistency_is_float32_under_autocast(dtype):
    """Under autocast the loss is still computed in float32 (in fp16 a confident routing would
    give 0 * log 0 = NaN): the same value as outside it, and a finite gradient."""
    num_themes = 4
    prototypes = torch.eye(num_themes, DIM)
    values = prototypes[torch.arange(24).div(3, rounding_mode="floor").remainder(num_themes)].requires_grad_()
    unit_offsets = torch.arange(0, 25, 3)
    want = session_consistency_loss(values, unit_offsets, prototypes, 0.01)
    with torch.autocast("cpu", dtype=dtype):
        got = session_consistency_loss(values, unit_offsets, prototypes, 0.01)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert_close(got, want, "reduction")
    got.backward()
    assert torch.isfinite(values.grad).all()


def test_the_learned_router_with_consistency_trains_what_it_reads():
    """The loss enters aux_loss with consistency_weight and reaches the routing values even with
    the VQ losses detached from them (vq_detach_tokens=True); without it, it is zero."""
    values, target, offsets = _batch()
    routing_values = torch.randn(values.shape, requires_grad=True)
    layer = _layer(router=LearnedRouter(session_consistency=True), consistency_weight=0.5)
    out = layer(values, target, offsets, routing_values=routing_values, routing_target=target)
    assert float(out.aux["consistency"]) > 0
    weighted = (0.25 * out.aux["commitment"] + out.aux["codebook"] + 0.01 * out.aux["load_balance"]
                + 0.5 * out.aux["consistency"])
    assert_close(out.aux_loss.detach(), weighted, "reduction")
    out.aux_loss.backward()
    assert float(routing_values.grad.abs().sum()) > 0 and float(layer.prototypes.grad.abs().sum()) > 0
    # A router without the loss reports none: its aux (and so every log and record) is as before.
    assert set(_layer()(values, target, offsets).aux) == {"commitment", "codebook", "load_balance"}
    layer.eval()
    assert "consistency" not in layer(values, target, offsets).aux      # not computed to evaluate


class RecordingRouter(torch.nn.Module):
    """The learned router, keeping what it was handed to route."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, values, units, prototypes, **kwargs):
        self.seen.append(values)
        return LearnedRouter()(values, units, prototypes, **kwargs)


def test_routing_values_are_what_routes_and_routing_target_is_the_summary_query():
    values, target, offsets = _batch()
    router = RecordingRouter()
    layer = oracles.live_extras(_layer(router=router)).eval()
    gen = generator(5)
    routing_values = randn(gen, *values.shape, dtype=torch.float32)
    routing_target = randn(gen, *target.shape, dtype=torch.float32)
    out = layer(values, target, offsets, routing_values=routing_values, routing_target=routing_target)
    assert router.seen[-1] is routing_values
    sessions = mk.sessionize(offsets, mode="fixed", session_len=3)
    _, routing = mk.session_pool_route(routing_values, sessions.session_offsets, layer.prototypes, temperature=0.1,
                                       top_k=1, backend="reference")
    assert torch.equal(out.routing.session_theme, routing.themes[:, 0])
    # Given the defaults' values, the layer is the layer without them.
    assert torch.equal(layer(values, target, offsets, routing_values=values, routing_target=target).output,
                       layer(values, target, offsets).output)
    # The summary's query reads routing_target; the theme experts read values, not routing_values.
    other_target = layer(values, target, offsets, routing_values=routing_values, routing_target=target)
    assert not torch.allclose(other_target.output, out.output)
    moved = layer(values + 1.0, target, offsets, routing_values=routing_values, routing_target=routing_target)
    assert torch.equal(moved.routing.session_theme, out.routing.session_theme)
    assert not torch.allclose(moved.extras_output, out.extras_output)


def test_padded_routing_values_give_the_jagged_result():
    values, target, offsets = _batch()
    routing_values = randn(generator(7), *values.shape, dtype=torch.float32)
    layer = oracles.live_extras(_layer()).eval()
    lengths = torch.tensor(LENGTHS)
    padded, padded_routing = (mk.jagged_to_padded(x, offsets, max(LENGTHS)) for x in (values, routing_values))
    # Padding rows are never read, NaN there included (as for values).
    pad = torch.arange(max(LENGTHS))[None, :] >= lengths[:, None]
    assert pad.any()
    padded_routing = padded_routing.masked_fill(pad[..., None], float("nan"))
    jagged = layer(values, target, offsets, routing_values=routing_values, routing_target=target)
    from_padded = layer(padded, target, lengths=lengths, routing_values=padded_routing, routing_target=target)
    assert_close(from_padded.output, jagged.output, "layer")
    assert torch.equal(from_padded.routing.session_theme, jagged.routing.session_theme)


@pytest.mark.parametrize("case, error, words", [
    ("only_values", ValueError, ["routing_target", "both or neither", "None"]),
    ("only_target", ValueError, ["routing_values", "both or neither", "None"]),
    ("rows", ValueError, ["routing_values", "(20, 8)", "(5, 8)"]),
    ("dtype", TypeError, ["routing_values", "float32", "float64"]),
    ("target_shape", ValueError, ["routing_target", "(4, 8)", "(4, 6)"]),
    ("nan", NonFiniteError, ["routing_values", "finite"]),
    ("no_themes", ValueError, ["routing_values", "without theme experts"]),
])
def test_bad_routing_inputs_are_refused_by_name(case, error, words):
    values, target, offsets = _batch()
    rv, rt = values.clone(), target.clone()
    layer = _layer(experts=("global", "short")) if case == "no_themes" else _layer()
    kwargs = {"only_values": dict(routing_values=rv), "only_target": dict(routing_target=rt),
              "rows": dict(routing_values=rv[:5], routing_target=rt),
              "dtype": dict(routing_values=rv.double(), routing_target=rt),
              "target_shape": dict(routing_values=rv, routing_target=rt[:, :6]),
              "nan": dict(routing_values=rv.index_fill(0, torch.tensor([3]), float("nan")), routing_target=rt),
              "no_themes": dict(routing_values=rv, routing_target=rt)}[case]
    with pytest.raises(error) as info:
        layer(values, target, offsets, **kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)


# ---- the lab: a routing-only item embedding --------------------------------------------------

def _lab_batch():
    from mos.lab.data.batch import Batch

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 0, 9, 3]
    total = sum(lengths)
    return Batch(item_ids=torch.randint(1, 30, (total,), generator=gen), category_ids=torch.randint(1, 4, (total,),
                 generator=gen), timestamps=torch.arange(total) * 1000, offsets=oracles.offsets_of(lengths),
                 max_len=max(lengths), target_item=torch.randint(1, 30, (4,), generator=gen),
                 target_category=torch.randint(1, 4, (4,), generator=gen), label=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                 user=torch.arange(4))


def _lab_model(**options):
    from mos.lab.config import MoSAblation, ModelConfig
    from mos.lab.model import CTRModel

    torch.manual_seed(0)
    ablation = MoSAblation(session_consistency=options.pop("session_consistency", False))
    config = ModelConfig(kind="mos", ablation=ablation, mos=MoSConfig(dim=16, num_themes=4, session_mode="gap",
                                                                      gap_seconds=1500.0), **options)
    return CTRModel(config, num_items=30, num_categories=4)


def test_the_routing_embedding_never_changes_what_the_backbone_learns():
    """Boosted training: with or without the routing embedding (and its consistency loss), every
    other parameter starts the same and the loss gives the backbone's part (embeddings, backbone
    encoder, head) the same gradient; the routing embedding gets one of its own."""
    from mos.lab.model import training_loss

    plain, routed = _lab_model(), _lab_model(routing_embedding=True, session_consistency=True)
    assert routed.routing_embedding.weight.shape == (30, 16) and plain.routing_embedding is None
    routed_state = routed.state_dict()
    assert all(torch.equal(value, routed_state[name]) for name, value in plain.state_dict().items())
    batch = _lab_batch()
    for model in (plain, routed):
        out = model(batch)
        training_loss(out, batch.label).backward()
    assert float(routed.routing_embedding.weight.grad.abs().sum()) > 0
    routed_params = dict(routed.named_parameters())
    for name, param in plain.named_parameters():
        if name.startswith(("item_embedding", "category_embedding", "recency_embedding", "head", "encoder.global")):
            assert torch.equal(param.grad, routed_params[name].grad), name


def test_the_routing_options_are_refused_where_nothing_reads_them():
    from mos.lab.config import MoSAblation, ModelConfig

    with pytest.raises(ValueError, match=r"model.routing_embedding: expected False .*kind='backbone'"):
        ModelConfig(kind="backbone", routing_embedding=True)
    with pytest.raises(ValueError, match=r"model.routing_embedding: expected False .*'global', 'short'"):
        ModelConfig(routing_embedding=True, ablation=MoSAblation(experts=("global", "short")))
    with pytest.raises(ValueError, match=r"model.ablation.session_consistency: expected False with router 'random'"):
        MoSAblation(router="random", session_consistency=True)
    with pytest.raises(ValueError, match=r"model.ablation.session_consistency: expected False with routing_unit "
                                         r"'token' \(a unit of one token has no session-mates\)"):
        MoSAblation(routing_unit="token", session_consistency=True)


def test_a_learned_router_s_matched_control_is_found():
    """The random-routing control of a variant: the variant with random themes and nothing else
    changed (its learned router's own options dropped); None where no such variant exists."""
    from mos.lab.variants import random_routing_control

    assert random_routing_control("mos") == "mos_random_routing"
    assert random_routing_control("mos_session_router") == "mos_random_routing_embedding"
    assert random_routing_control("mos_routing_embedding") == "mos_random_routing_embedding"
    for name in ("backbone", "gshard", "mos_random_routing", "mos_no_themes", "mos_theme_mass"):
        assert random_routing_control(name) is None, name
    assert random_routing_control("mos_session_router_joint") == "mos_random_routing_embedding_joint"


def test_a_jointly_trained_variant_s_boosted_twin_is_found():
    """The boosted variant a joint one retests: the same overrides without `training: joint` and
    without the extras dropout; None for boosted variants and for joint ones that change more."""
    from mos.lab.variants import boosted_twin

    assert boosted_twin("mos_joint") == "mos"
    assert boosted_twin("mos_joint_extras_dropout") == "mos"
    assert boosted_twin("mos_session_router_joint") == "mos_session_router"
    assert boosted_twin("mos_random_routing_embedding_joint") == "mos_random_routing_embedding"
    for name in ("mos", "mos_session_router", "backbone", "mos_concat_fusion", "mos_no_global", "mos_vq_to_embeddings",
                 "not_a_variant"):
        assert boosted_twin(name) is None, name


# RunConfig()'s fingerprints (first 12 hex digits, seed 0) at 60aa309, before the options of
# LATER_AT_DEFAULT existed. A change here invalidates every finished run: make it on purpose.
PINNED_FINGERPRINTS = {"mos": "49a96b6e20a5", "backbone": "809c2486a5f9"}


def test_options_added_at_their_defaults_keep_a_run_s_fingerprint():
    """The options added after runs had finished stay out of the fingerprint at their old
    behaviour's value (each names a field whose default is that value), and enter it otherwise."""
    from mos.lab.config import RunConfig
    from mos.lab.config_io import config_to_dict
    from mos.lab.moved_options import LATER_AT_DEFAULT
    from mos.lab.profiling.runs import fingerprint, model_key
    from mos.lab.variants import variant_config

    base = RunConfig()
    tree = config_to_dict(base)
    for option, value in LATER_AT_DEFAULT.items():
        node = tree
        for name in option.split("."):
            node = node[name]
        assert node == value, option
    key = model_key(variant_config(base.model, "mos"))
    assert "routing_embedding" not in key and "session_consistency" not in key["ablation"]
    assert "consistency_weight" not in key["mos"]
    # Pinned: the default configuration's fingerprints as the code before these options wrote them.
    assert fingerprint(base, "mos", 0)[:12] == PINNED_FINGERPRINTS["mos"]
    assert fingerprint(base, "backbone", 0)[:12] == PINNED_FINGERPRINTS["backbone"]
    weighted = replace(base, model=replace(base.model, mos=replace(base.model.mos, consistency_weight=0.5)))
    assert fingerprint(weighted, "mos", 0) != fingerprint(base, "mos", 0)
    assert fingerprint(base, "mos_session_router", 0) != fingerprint(base, "mos", 0)
