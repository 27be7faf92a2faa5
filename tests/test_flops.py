"""FLOP counting: the counter against a hand count, and against fvcore (within 1 %)."""
import pytest
import torch

from mos.config import MoSConfig
from mos.lab.config import ModelConfig
from mos.lab.flops import count_flops, fvcore_forward_flops
from mos.lab.model import CTRModel
from mos.lab.profiling.measures import synthetic_batch
from mos.lab.variants import VARIANTS, variant_config

DIM, LENGTH, EXAMPLES = 16, 24, 4


def _model(name):
    torch.manual_seed(0)
    base = ModelConfig(mos=MoSConfig(dim=DIM, num_heads=2, session_len=8), mlp_hidden=(8,))
    return CTRModel(variant_config(base, name), 50, 10)


def test_backbone_forward_flops_match_a_hand_count():
    """Target attention over L tokens: query, key, value, output projections, then the MLP head."""
    batch = synthetic_batch(50, 10, EXAMPLES, LENGTH)
    counted = count_flops(_model("backbone"), batch).forward_per_example
    d = DIM
    projections = 2 * d * d + 2 * (2 * LENGTH * d * d) + 2 * d * d     # q; k and v over L rows; out
    head = 2 * (3 * d * 8) + 2 * (8 * 1)
    assert counted == projections + head


def test_training_flops_are_about_three_times_forward():
    batch = synthetic_batch(50, 10, EXAMPLES, LENGTH)
    flops = count_flops(_model("backbone"), batch)
    assert 2.5 < flops.training_per_example / flops.forward_per_example < 3.5


# Random routing draws new themes on every call, so two counts of it need not agree.
DETERMINISTIC = [name for name in VARIANTS if name != "mos_random_routing"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_flop_counter_agrees_with_fvcore(name):
    pytest.importorskip("fvcore")
    batch = synthetic_batch(50, 10, EXAMPLES, LENGTH)
    model = _model(name)
    ours = count_flops(model, batch).forward_per_example
    theirs = fvcore_forward_flops(model, batch)
    assert abs(theirs - ours) <= 0.01 * ours, (ours, theirs)


def test_by_module_breakdown_sums_to_the_encoder_and_head():
    batch = synthetic_batch(50, 10, EXAMPLES, LENGTH)
    flops = count_flops(_model("mos"), batch)
    parts = flops.forward_by_module
    assert {"encoder.theme_experts", "encoder.global_expert", "encoder.short_expert", "encoder.(own)",
            "head.mlp"} <= set(parts)
    assert sum(parts.values()) == pytest.approx(flops.forward_per_example)
