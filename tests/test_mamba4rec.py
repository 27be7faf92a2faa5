"""Mamba4Rec (mos/mamba4rec.py): selective state-space layers per expert, then a target-attention
readout. Each block against the loop oracle (tests/oracles.py: the scan one step at a time) on
jagged segments with empty ones, forward and every parameter's and row's gradient; its FLOP
formula against torch's counter; inside MoSLayer and the lab's models; bad options named."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mos import MoSConfig, MoSLayer
from mos.encoders import make_encoder
from mos.mamba4rec import Mamba4RecEncoder, mamba_layer_flops, shift_rows
from mos_kernels.backend import op_backends
from mos_kernels.jagged import expert_offsets, positions_in_segment, segment_ids
from tests import oracles
from tests.kernel_cases import assert_matches

LENGTHS = [0, 1, 9, 17, 2, 0]          # E = 2 experts x B = 3 examples, expert-major


def _block_inputs(lengths=LENGTHS, num_experts=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(lengths), dim, generator=gen)
    offsets = oracles.offsets_of(lengths)
    experts = expert_offsets(offsets, num_experts)
    n = rows.shape[0]
    return rows, offsets, experts, segment_ids(experts, n), positions_in_segment(offsets, n)


@pytest.mark.parametrize("num_experts, lengths", [(2, LENGTHS), (1, [4, 0, 31]), (3, [1] * 6)])
def test_a_mamba_block_matches_the_step_by_step_oracle(num_experts, lengths):
    """One block (projections, causal convolution inside each segment, the selective scan, the
    gate, the feed-forward) equals the float64 oracle that runs the scan one step at a time:
    forward, and the gradients of the rows and of every parameter."""
    torch.manual_seed(1)
    encoder = make_encoder("mamba4rec", 8, 2, num_experts, mamba_state=4)
    block = encoder.layers[0]
    rows, offsets, experts, expert, position = _block_inputs(lengths, num_experts)
    rows.requires_grad_()
    out = block(rows, expert, experts, offsets, position, 0.0, op_backends("reference"))
    block_64 = copy.deepcopy(block).double()
    rows_64 = rows.detach().double().requires_grad_()
    expected = oracles.mamba_block(block_64, rows_64, offsets, num_experts)
    assert_matches(out, expected, "layer")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    names, params = zip(*block.named_parameters())
    got = torch.autograd.grad(out, [rows, *params], g)
    want = torch.autograd.grad(expected, [rows_64, *block_64.parameters()], g.double(), allow_unused=True,
                               materialize_grads=True)
    for name, x, y in zip(("rows",) + names, got, want):
        assert_matches(x, y, "layer", msg=name)


def test_segments_do_not_see_each_other():
    """Changing one segment's rows changes no other segment's encoded rows (the convolution and the
    scan stop at segment boundaries) and no other segment's output vector."""
    torch.manual_seed(2)
    encoder = make_encoder("mamba4rec", 8, 2, 2, mamba_state=4)
    rows, offsets, *_ = _block_inputs()
    target = torch.randn(3, 8)
    base = encoder(rows, target, offsets)
    changed = rows.clone()
    changed[0:10] += 3.0                          # segments 1 and 2 (expert 0, examples 1 and 2)
    out = encoder(changed, target, offsets)
    assert torch.equal(out[1], base[1]) and torch.equal(out[0, 0], base[0, 0])
    assert not torch.equal(out[0, 1], base[0, 1]) and not torch.equal(out[0, 2], base[0, 2])
    assert (base[0, 0] == 0).all() and (base[1, 2] == 0).all()         # empty segments: zeros


def test_the_flop_formula_is_what_the_counter_sees():
    torch.manual_seed(3)
    encoder = make_encoder("mamba4rec", 8, 2, 2, num_layers=2, mamba_state=4)
    rows, offsets, experts, expert, position = _block_inputs()
    with FlopCounterMode(display=False) as counter:
        encoder.layers[0](rows, expert, experts, offsets, position, 0.0, op_backends("reference"))
    assert counter.get_total_flops() == mamba_layer_flops(rows.shape[0], 8, 4)


@pytest.mark.parametrize("kind", ["backbone", "gshard", "stacked_backbone", "mos"])
def test_the_lab_models_and_the_layer_train_with_mamba_experts(kind):
    """Every model kind runs forward and backward with encoder="mamba4rec", finite everywhere,
    and an empty batch."""
    from mos.lab.config import ModelConfig
    from mos.lab.model import CTRModel
    from tests.test_model import _batch_of_two, _empty_batch
    torch.manual_seed(4)
    config = ModelConfig(kind=kind, mos=MoSConfig(dim=8, num_heads=2, encoder="mamba4rec", mamba_state=4))
    model = CTRModel(config, num_items=10, num_categories=5)
    out = model(_batch_of_two())
    (out.logits.sum() + out.aux_loss).backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model(_empty_batch("cpu")).logits.shape == (0,)


def test_the_layer_with_mamba_experts_keeps_empty_themes_finite():
    torch.manual_seed(5)
    layer = MoSLayer(MoSConfig(dim=8, num_heads=2, num_themes=3, session_len=2, encoder="mamba4rec",
                               mamba_state=4, num_layers=2))
    values = torch.randn(21, 8, requires_grad=True)
    out = layer(values, torch.randn(3, 8), torch.tensor([0, 0, 5, 21]))
    out.output.sum().backward()
    assert torch.isfinite(out.output).all() and torch.isfinite(values.grad).all()


@pytest.mark.parametrize("options, error, words", [
    (dict(state=0), ValueError, ["state", "[1, 2^63)"]),
    (dict(num_layers=1.5), TypeError, ["num_layers", "int"]),
    (dict(state=65, backend="triton"), ValueError, ["state", "at most 64", "'triton'"]),
    (dict(state=65, backend="cuda"), ValueError, ["state", "at most 64", "'cuda'"]),
])
def test_bad_encoder_options_are_named(options, error, words):
    with pytest.raises(error) as info:
        Mamba4RecEncoder(8, 2, lambda: None, **options)
    for word in words:
        assert word in str(info.value)


def test_auto_runs_a_state_too_large_for_the_kernels():
    """'auto' takes S > 64 to the reference: built and run, no error."""
    from mos.encoders import make_encoder
    encoder = Mamba4RecEncoder(4, 1, lambda: make_encoder("target_attention", 4, 1), state=65, backend="auto")
    out = encoder(torch.randn(5, 4), torch.randn(2, 4), torch.tensor([0, 2, 5]))
    assert out.shape == (1, 2, 4) and torch.isfinite(out).all()


def test_bad_config_option_is_named():
    with pytest.raises(ValueError, match="MoSConfig.mamba_state"):
        MoSConfig(dim=8, num_heads=2, encoder="mamba4rec", mamba_state=0)


@pytest.mark.parametrize("num_rows", [0, 1, 5])
def test_shift_rows_moves_rows_down_and_fills_zeros(num_rows):
    """The causal convolution reads row t - step through it: every step, past the end too."""
    x = torch.randn(num_rows, 2, 3)
    for step in range(num_rows + 2):
        expected = torch.zeros_like(x)
        expected[step:] = x[:max(num_rows - step, 0)]
        assert torch.equal(shift_rows(x, step), expected), step
