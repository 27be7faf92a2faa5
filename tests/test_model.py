"""CTRModel (mos/lab/model.py): every model (backbone, the MoE baselines, the stacking control, MoS)
on every backend takes an empty batch, B = 0 (each op's unusual inputs: the tables of
tests/ops/test_<op>.py, run by tests/ops/test_contract.py); the inputs every kind shares: recency buckets, a narrow item ID,
an earlier layout's weights."""
from __future__ import annotations

import pytest
import torch

from mos.config import MoSConfig
from mos.lab.config import ModelConfig
from mos.lab.data.batch import Batch
from mos.lab.model import CTRModel
from tests.conftest import require_cuda_ext


def _empty_batch(device):
    none = torch.zeros(0, dtype=torch.int64, device=device)
    return Batch(item_ids=none, category_ids=none, timestamps=none, offsets=torch.zeros(1, dtype=torch.int64,
                 device=device), max_len=0, target_item=none, target_category=none,
                 label=torch.zeros(0, device=device), user=none)


@pytest.mark.parametrize("encoder", ["target_attention", "transformer", "sdim", "mamba4rec"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("kind", ["backbone", "gshard", "dselect_k", "expert_choice", "stacked_backbone", "mos"])
def test_empty_batch_gives_finite_outputs_and_zero_loss(kind, backend, encoder, device):
    """B = 0: no logits, every auxiliary value finite, the auxiliary loss exactly 0 (an average over
    no examples is taken as 0, not torch's 0/0), and its backward finite."""
    if backend == "cuda":
        require_cuda_ext()
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, mos=MoSConfig(dim=16, num_heads=2, encoder=encoder, backend=backend))
    model = CTRModel(config, num_items=10, num_categories=5).to(device)
    out = model(_empty_batch(device))
    assert out.logits.shape == (0,)
    assert out.aux_loss.item() == 0.0, f"{kind}: auxiliary loss {out.aux_loss.item()} on an empty batch"
    for name, value in out.aux.items():
        assert torch.isfinite(value).all(), f"{kind}: aux {name} = {value} on an empty batch"
    loss = out.logits.sum() + out.aux_loss
    if loss.requires_grad:
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_recency_buckets_count_sessions_back_from_the_newest():
    """Two examples cut at 1-h gaps: 11 sessions of one event, and 3 sessions (the newest of
    two events). Sessions ago 0, 1, 2-3, 4-7, 8-15 give buckets 0, 1, 2, 3, 4."""
    from mos.config import MoSConfig
    from mos.lab.config import ModelConfig
    from mos.lab.data.batch import Batch
    from mos.lab.model import CTRModel

    gaps = [0] + [3600] * 10 + [0, 3600, 3600, 60]
    times = torch.cumsum(torch.tensor(gaps), 0)
    batch = Batch(item_ids=torch.ones(15, dtype=torch.long), category_ids=torch.ones(15, dtype=torch.long),
                  timestamps=times, offsets=torch.tensor([0, 11, 15]), max_len=11,
                  target_item=torch.ones(2, dtype=torch.long), target_category=torch.ones(2, dtype=torch.long),
                  label=torch.zeros(2), user=torch.arange(2))
    model = CTRModel(ModelConfig(kind="backbone", mos=MoSConfig(dim=8, session_mode="gap")), 5, 3)
    ago = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 2, 1, 0, 0]
    want = [4, 4, 4, 3, 3, 3, 3, 2, 2, 1, 0, 2, 1, 0, 0]
    assert model.recency_bucket(batch).tolist() == want, ago
    # Every event gets its bucket's embedding on top of its item's and category's.
    tokens = model.embed_history(batch)
    plain = model.embed(batch.item_ids, batch.category_ids)
    torch.testing.assert_close(tokens - plain, model.recency_embedding.weight[torch.tensor(want)])
    # Without recency the events are unordered: the tokens are the plain embeddings.
    flat = CTRModel(ModelConfig(kind="backbone", recency="none", mos=MoSConfig(dim=8, session_mode="gap")), 5, 3)
    assert flat.recency_embedding is None and torch.equal(flat.embed_history(batch), flat.embed(batch.item_ids,
                                                                                                  batch.category_ids))


def test_a_narrow_item_id_is_projected_to_the_model_width():
    from mos.config import MoSConfig
    from mos.lab.config import ModelConfig
    from mos.lab.model import CTRModel

    narrow = CTRModel(ModelConfig(kind="backbone", item_id_dim=4, mos=MoSConfig(dim=16)), 100, 5)
    assert narrow.item_embedding.weight.shape == (100, 4) and narrow.item_projection.weight.shape == (16, 4)
    items = torch.tensor([3, 0, 7])
    want = narrow.item_embedding(items) @ narrow.item_projection.weight.t() + narrow.category_embedding(items % 5)
    torch.testing.assert_close(narrow.embed(items, items % 5), want)
    full = CTRModel(ModelConfig(kind="backbone", mos=MoSConfig(dim=16)), 100, 5)
    assert full.item_projection is None and full.item_embedding.weight.shape == (100, 16)


def test_an_earlier_state_dict_loads_under_its_new_names():
    """A checkpoint of the earlier layout (head.0.weight, serve_extras) loads once migrated."""
    from mos.config import MoSConfig
    from mos.lab.config import ModelConfig
    from mos.lab.model import CTRModel
    from mos.lab.moved_options import migrate_state_dict

    model = CTRModel(ModelConfig(recency="none", mos=MoSConfig(dim=8)), 10, 3)
    old = {key.replace("head.mlp.", "head.").replace("serve_correction", "serve_extras"): value
           for key, value in model.state_dict().items()}
    assert "head.0.weight" in old and "serve_extras" in old
    fresh = CTRModel(ModelConfig(recency="none", mos=MoSConfig(dim=8)), 10, 3)
    fresh.load_state_dict(migrate_state_dict(old))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def _batch_of_two():
    return Batch(item_ids=torch.tensor([1, 2, 3, 4, 5]), category_ids=torch.tensor([1, 1, 2, 2, 3]),
                 timestamps=torch.tensor([0, 10, 20, 5000, 5010]), offsets=torch.tensor([0, 3, 5]), max_len=3,
                 target_item=torch.tensor([6, 7]), target_category=torch.tensor([1, 3]),
                 label=torch.tensor([1.0, 0.0]), user=torch.arange(2))


@pytest.mark.parametrize("kind", ["backbone", "gshard", "stacked_backbone", "mos"])
def test_the_model_checks_its_values_once_and_its_encoder_runs_without_data_checks(kind):
    """The encoder's ops do not scan their inputs again (a pass each, 7 % of a transformer step on
    the CPU): the model checks the embedded tokens and target itself, naming them."""
    from mos_kernels.checks import NonFiniteError, reads_data

    config = ModelConfig(kind=kind, mos=MoSConfig(dim=8, num_heads=2, encoder="transformer", backend="reference"))
    model = CTRModel(config, num_items=10, num_categories=5)
    seen = []
    inner = {"backbone": model.encoder, "mos": getattr(model.encoder, "global_expert", None)}.get(
        kind, getattr(model.encoder, "global_encoder", None))
    inner.register_forward_pre_hook(lambda module, args: seen.append(reads_data()))
    assert torch.isfinite(model(_batch_of_two()).logits).all()
    assert seen == [False], f"{kind}: data checks inside the encoder: {seen}"
    assert reads_data(), "the data checks were not switched back on after the forward"
    with torch.no_grad():
        model.item_embedding.weight[4] = float("nan")
    with pytest.raises(NonFiniteError, match="tokens: expected finite values"):
        model(_batch_of_two())
    with torch.no_grad():
        model.item_embedding.weight[4] = 0.0
        model.item_embedding.weight[7] = float("inf")
    with pytest.raises(NonFiniteError, match="target: expected finite values"):
        model(_batch_of_two())


@pytest.mark.parametrize("change, words", [
    (dict(max_len=2), ["batch.max_len", "longest history (3)", "got 2"]),
    (dict(offsets=torch.tensor([0, 4, 3])), ["offsets", "non-decreasing"]),
])
def test_the_model_checks_the_batch_layout_its_encoder_no_longer_does(change, words):
    """The encoder's ops run without data checks, so the model checks the batch's offsets and its
    max_len (attention pads to it off the CPU: a smaller one would cut histories)."""
    import dataclasses
    config = ModelConfig(kind="backbone", mos=MoSConfig(dim=8, num_heads=2, encoder="transformer"))
    model = CTRModel(config, num_items=10, num_categories=5)
    batch = dataclasses.replace(_batch_of_two(), **change)
    with pytest.raises(ValueError) as info:
        model(batch)
    for word in words:
        assert word in str(info.value)
