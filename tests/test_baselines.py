"""The MoE baselines: each trains a step, and each gate behaves as its method specifies."""
import math

import pytest
import torch
import torch.nn.functional as F

from mos.lab.baselines import DSelectK, ExpertChoice, GShard
from mos.lab.baselines.dselect_k import smooth_step
from mos.config import MoSConfig
from mos.lab.config import ModelConfig, MoEConfig, MoSAblation
from mos.lab.data import synthetic
from mos.lab.data.config import SyntheticConfig
from mos.lab.model import CTRModel


def _config(kind="gshard", **moe):
    return ModelConfig(kind=kind, mos=MoSConfig(dim=16, num_heads=2), moe=MoEConfig(**moe))


@pytest.fixture(scope="module")
def batch():
    data = synthetic.generate(SyntheticConfig(num_users=40, num_items=60))
    return next(data.batches(24)), data


@pytest.mark.parametrize("kind", ["gshard", "dselect_k", "expert_choice"])
def test_baseline_trains_a_step(kind, batch):
    batch, data = batch
    torch.manual_seed(0)
    model = CTRModel(_config(kind), data.num_items, data.num_categories)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(batch)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch.label) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_gshard_routes_each_example_to_top2_with_weights_summing_to_one():
    gate = GShard(_config(num_experts=6, top_k=2))
    weights, aux_loss, aux = gate.gate(torch.randn(50, 16))
    assert ((weights > 0).sum(dim=1) == 2).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(50))
    assert aux_loss.item() > 0 and aux["load_balance"].item() >= 1.0 - 1e-6   # >= 1, = 1 when balanced


def test_expert_choice_respects_capacity():
    gate = ExpertChoice(_config(kind="expert_choice", num_experts=4, top_k=2, capacity_factor=1.0))
    weights, _, _ = gate.gate(torch.randn(30, 16))
    capacity = math.ceil(1.0 * 30 * 2 / 4)
    assert gate.capacity(30) == capacity
    assert ((weights > 0).sum(dim=0) == capacity).all()      # every expert takes exactly C examples


def test_smooth_step_is_exact_outside_its_band_and_continuous():
    gamma = 1.0
    x = torch.tensor([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    s = smooth_step(x, gamma)
    assert s[0] == 0 and s[1] == 0 and s[-1] == 1 and s[-2] == 1
    assert s[3] == 0.5 and 0 < s[2] < 0.5 < s[4] < 1


def test_dselect_k_selectors_converge_to_k_experts():
    """Trained on its entropy penalty alone, every selector ends on one expert: at most k run."""
    torch.manual_seed(0)
    gate = DSelectK(_config(kind="dselect_k", num_experts=8, top_k=2, entropy_weight=1.0))
    features = torch.randn(64, 16)
    r = gate.selector_probs(features)
    assert (r > 0).sum(-1).float().mean() > 1.5          # starts spread over several experts
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(300):
        _, aux_loss, _ = gate.gate(features)
        optimizer.zero_grad()
        aux_loss.backward()
        optimizer.step()
    weights, _, _ = gate.gate(features)
    r = gate.selector_probs(features)
    assert torch.equal(r.max(dim=-1).values, torch.ones(64, 2))   # each selector exactly one-hot
    assert ((weights > 0).sum(dim=1) <= 2).all()


def test_dselect_k_needs_a_power_of_two():
    with pytest.raises(ValueError, match="model.moe.num_experts"):
        DSelectK(_config(kind="dselect_k", num_experts=6))


STACKED_CASES = [("mos", "target_attention"), ("mos", "transformer"), ("gshard", "target_attention"),
                 ("dselect_k", "target_attention"), ("expert_choice", "target_attention"),
                 ("stacked_backbone", "target_attention"), ("stacked_backbone", "transformer")]


@pytest.mark.parametrize("kind, encoder", STACKED_CASES)
@pytest.mark.parametrize("training", ["boosted", "joint"])
def test_every_stacked_kind_starts_as_its_backbone(kind, encoder, training, batch):
    """Built from the same seed, a stacked model (MoS with the residual fusion, an MoE baseline,
    the stacking control) and the backbone model give the same logits before any training: same
    embeddings, head and backbone encoder, the correction's term zero. MoS with the concat
    fusion does not (the contrast shows the test can fail)."""
    batch, data = batch
    logits = {}
    for name, fusion, how in (("backbone", "residual", "boosted"), (kind, "residual", training),
                              ("mos", "concat", "joint")):
        torch.manual_seed(5)
        config = ModelConfig(kind=name, mos=MoSConfig(dim=16, num_heads=2, encoder=encoder, fusion=fusion,
                                                      session_mode="gap"), training=how, item_id_dim=8)
        logits[name, fusion] = CTRModel(config, data.num_items, data.num_categories)(batch).logits
    assert torch.equal(logits[kind, "residual"], logits["backbone", "residual"])
    assert not torch.allclose(logits["mos", "concat"], logits["backbone", "residual"])


@pytest.mark.parametrize("detach", [True, False])
def test_vq_losses_and_the_embedding_table(detach, batch):
    """model.ablation.vq_detach_tokens=True: the auxiliary losses alone send no gradient to the item or
    category embedding tables (they train the prototypes); False: they do."""
    batch, data = batch
    torch.manual_seed(0)
    # Joint training: boosted training detaches every input of the router from the embeddings anyway.
    model = CTRModel(ModelConfig(kind="mos", mos=MoSConfig(dim=16, num_heads=2),
                                 ablation=MoSAblation(vq_detach_tokens=detach), training="joint"),
                     data.num_items, data.num_categories)
    model(batch).aux_loss.backward()
    tables = (model.item_embedding.weight.grad, model.category_embedding.weight.grad)
    moved = [0.0 if g is None else float(g.abs().sum()) for g in tables]
    assert (max(moved) == 0.0) == detach, moved
    assert float(model.encoder.prototypes.grad.abs().sum()) > 0
