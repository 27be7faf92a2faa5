"""CTRModel (mos/model.py) on unusual input: every model (backbone, the MoE baselines, MoS) on
every backend takes an empty batch, B = 0. (Each op's unusual inputs: tests/ops/test_<op>_inputs.py.)
"""
from __future__ import annotations

import pytest
import torch

from mos.config import ModelConfig, MoSConfig
from mos.data.batch import Batch
from mos.model import CTRModel
from tests.conftest import require_cuda_ext


def _empty_batch(device):
    none = torch.zeros(0, dtype=torch.int64, device=device)
    return Batch(item_ids=none, category_ids=none, timestamps=none, offsets=torch.zeros(1, dtype=torch.int64,
                 device=device), max_len=0, target_item=none, target_category=none,
                 label=torch.zeros(0, device=device), user=none)


@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("kind", ["backbone", "gshard", "dselect_k", "expert_choice", "mos"])
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
