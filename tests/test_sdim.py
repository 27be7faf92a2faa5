"""SDIM (mos/sdim.py): hash-sampled target attention as a built-in encoder. Against the loop oracle
(tests/oracles.py) on awkward segments, forward and every parameter's and row's gradient; the
SimHash collision rate (1 - theta / pi)^bits it rests on; its FLOP formula against torch's
counter; half precision; inside MoSLayer and the lab's models; bad options named."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mos import MoSConfig, MoSLayer
from mos.sdim import SDIMEncoder, sdim_flops
from tests import oracles
from tests.kernel_cases import assert_matches
from tests.tolerances import assert_close

LENGTHS = [0, 1, 7, 13, 2, 0]          # E = 2 experts x B = 3 examples, expert-major


def _inputs(seed=0, dim=6, num_examples=3, lengths=LENGTHS, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(lengths), dim, generator=gen).to(dtype)
    target = torch.randn(num_examples, dim, generator=gen).to(dtype)
    # Targets close to some rows, so that rounds sample them.
    rows[1:4] = target[1].to(dtype) + 0.1 * rows[1:4]
    return rows, target, oracles.offsets_of(lengths)


@pytest.mark.parametrize("num_experts, lengths", [(2, LENGTHS), (1, [5, 0, 11]), (3, [1] * 9)])
def test_sdim_matches_the_loop_oracle(num_experts, lengths):
    """Output and the gradients of the rows and of every parameter equal the float64 loop oracle
    (which hashes the same fp32 values: the signatures are the same bits)."""
    torch.manual_seed(1)
    encoder = SDIMEncoder(6, num_experts, rounds=5, bits=2)
    rows, target, offsets = _inputs(lengths=lengths, num_examples=len(lengths) // num_experts)
    rows.requires_grad_()
    out = encoder(rows, target, offsets)
    params = [encoder.w_value, encoder.b_value, encoder.w_out, encoder.b_out]
    leaves = [t.detach().double().requires_grad_() for t in [rows] + params]
    expected = oracles.sdim(leaves[0], target.double(), offsets, encoder.hyperplanes.double(), *leaves[1:],
                            rounds=5, bits=2)
    assert_matches(out, expected, "layer")
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, [rows] + params, g_out)
    want = torch.autograd.grad(expected, leaves, g_out.double())
    for name, g, w in zip(["rows", "w_value", "b_value", "w_out", "b_out"], got, want):
        assert_matches(g, w, "layer", msg=name)
    lengths_t = torch.tensor(lengths).view(num_experts, -1)
    assert (out[lengths_t == 0] == 0).all()


@pytest.mark.parametrize("bits", [1, 3])
def test_two_vectors_collide_at_the_simhash_rate(bits):
    """Over 4,000 rounds, two vectors at 60 degrees share a round's signature at the rate
    (1 - theta / pi)^bits (within 5 binomial standard deviations)."""
    torch.manual_seed(3)
    encoder = SDIMEncoder(8, 1, rounds=4000, bits=bits)
    x = torch.zeros(2, 8)
    x[0, 0] = 1.0
    x[1, 0], x[1, 1] = math.cos(math.pi / 3), math.sin(math.pi / 3)
    codes = encoder._codes(x @ encoder.hyperplanes[0])
    rate = float((codes[0] == codes[1]).double().mean())
    p = (1 - 1 / 3) ** bits
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / 4000), (rate, p)


def test_the_flop_formula_is_what_the_counter_sees():
    torch.manual_seed(4)
    encoder = SDIMEncoder(6, 2, rounds=4, bits=3)
    rows, target, offsets = _inputs()
    with FlopCounterMode(display=False) as counter:
        encoder(rows, target, offsets)
    assert counter.get_total_flops() == sdim_flops(rows.shape[0], offsets.numel() - 1, 6, 4, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_hashes_as_fp32_and_returns_its_dtype(dtype):
    """Rows in fp16/bf16 are hashed and summed in fp32: the same signatures as the fp32 run on the
    same (rounded) values, the output in the input dtype, equal to the fp32 output rounded."""
    torch.manual_seed(5)
    encoder = SDIMEncoder(6, 2, rounds=4, bits=2)
    rows, target, offsets = _inputs(dtype=dtype)
    out = encoder(rows, target, offsets)
    assert out.dtype == dtype
    assert_close(out.float(), encoder(rows.float(), target.float(), offsets), "reduction", dtype=dtype)


def test_the_layer_runs_sdim_experts_and_saves_their_hyperplanes():
    """MoSLayer(encoder="sdim"): finite outputs and gradients, an empty batch, and a state dict
    that carries the hashing hyperplanes (a loaded layer hashes as the saved one)."""
    config = MoSConfig(dim=6, num_heads=2, num_themes=3, session_len=2, encoder="sdim", sdim_rounds=4)
    torch.manual_seed(6)
    layer = MoSLayer(config)
    rows, target, _ = _inputs()
    offsets = torch.tensor([0, 0, 8, 23])
    values = rows.clone().requires_grad_()
    out = layer(values, target, offsets)
    out.output.sum().backward()
    assert torch.isfinite(out.output).all() and torch.isfinite(values.grad).all()
    assert "theme_experts.hyperplanes" in layer.state_dict()
    torch.manual_seed(7)
    other = MoSLayer(config)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(rows, target, offsets).output, layer(rows, target, offsets).output)
    assert layer(rows[:0], target[:0], torch.zeros(1, dtype=torch.int64)).output.shape == (0, 6)


@pytest.mark.parametrize("options, error, words", [
    (dict(bits=0), ValueError, ["bits", "[1, 2^63)", "0"]),
    (dict(bits=63), ValueError, ["bits", "at most 62"]),
    (dict(rounds=2.5), TypeError, ["rounds", "int"]),
])
def test_bad_encoder_options_are_named(options, error, words):
    with pytest.raises(error) as info:
        SDIMEncoder(6, **{"num_experts": 1, **options})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("options, words", [
    (dict(sdim_bits=63), ["MoSConfig.sdim_bits", "[1, 62]", "63"]),
    (dict(sdim_rounds=0), ["MoSConfig.sdim_rounds", "positive"]),
    (dict(attention_mass=True), ["MoSConfig.attention_mass", "sdim"]),
])
def test_bad_config_options_are_named(options, words):
    with pytest.raises(ValueError) as info:
        MoSConfig(dim=6, num_heads=2, encoder="sdim", **options)
    for word in words:
        assert word in str(info.value)
