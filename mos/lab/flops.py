"""FLOP counting of the CTR models: forward and training FLOPs per example, per module.

`torch.utils.flop_counter.FlopCounterMode` counts every matrix product (a multiply-add = 2
FLOPs) and every custom op with a registered formula (the Triton ops register theirs);
elementwise work is not counted, by design of the counter. fvcore's `FlopCountAnalysis`
(which counts a multiply-add as 1) is the independent cross-check (`fvcore_forward_flops`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mos.lab.data.batch import Batch
from mos.lab.model import training_loss


@dataclass
class FlopCount:
    forward_per_example: float
    training_per_example: float          # forward + backward of the loss, aux losses included
    forward_by_module: Dict[str, float]  # per example, by the model's top-level children


def _by_module(counter: FlopCounterMode, model: nn.Module, examples: int) -> Dict[str, float]:
    """Per example, by the root's children and the encoder's children; what a child computes
    outside its own children is reported as "<child>.(own)", what the root computes outside its
    children as "(own)", so the parts add up to the total."""
    totals = {name: sum(per_op.values()) / examples for name, per_op in counter.get_flop_counts().items()}
    root = type(model).__name__
    parts: Dict[str, float] = {}
    for child, _ in model.named_children():
        total = totals.get(f"{root}.{child}", 0.0)
        inner = {name[len(root) + 1:]: value for name, value in totals.items()
                 if name.startswith(f"{root}.{child}.") and name.count(".") == 2}
        if not inner:
            if total:
                parts[child] = total
            continue
        parts.update(inner)
        own = total - sum(inner.values())
        if own:
            parts[f"{child}.(own)"] = own
    # What the root computes outside its children (a boosted MoS model's frozen pass of the head).
    own = totals.get(root, 0.0) - sum(parts.values())
    if own:
        parts["(own)"] = own
    return parts


def count_flops(model: nn.Module, batch: Batch) -> FlopCount:
    examples = batch.size
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as forward:
            model(batch)
        model.train()
        with FlopCounterMode(display=False) as training:
            out = model(batch)
            loss = training_loss(out, batch.label)
            loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return FlopCount(forward.get_total_flops() / examples, training.get_total_flops() / examples,
                     _by_module(forward, model, examples))


class _TensorInputs(nn.Module):
    """The model with plain tensor arguments, as fvcore's tracer needs."""

    def __init__(self, model: nn.Module, batch: Batch):
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, item_ids, category_ids, timestamps, offsets, target_item, target_category):
        batch = Batch(item_ids, category_ids, timestamps, offsets, self.batch.max_len, target_item, target_category,
                      self.batch.label, self.batch.user)
        return self.model(batch).logits


def fvcore_forward_flops(model: nn.Module, batch: Batch) -> float:
    """fvcore's forward count per example, in FLOPs (its multiply-adds times 2)."""
    import warnings

    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

    def grouped_linear(inputs, outputs):
        # Our op, unknown to fvcore: one multiply-add per row, input and output column.
        rows, d_in = get_shape(inputs[0])
        return rows * d_in * get_shape(inputs[1])[2]

    wrapped = _TensorInputs(model, batch).eval()
    inputs = (batch.item_ids, batch.category_ids, batch.timestamps, batch.offsets, batch.target_item,
              batch.target_category)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")       # the tracer warns about every data-dependent size
        analysis = FlopCountAnalysis(wrapped, inputs).set_op_handle("mos::grouped_linear_reference", grouped_linear)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2.0 * analysis.total() / batch.size
