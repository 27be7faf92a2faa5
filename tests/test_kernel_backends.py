"""The layer on each kernel backend (Triton, CUDA C++) against the layer on the reference,
forward and backward; each op's own comparisons are in tests/ops/.

The test takes `kernel_backend` ("triton", "cuda"; conftest.py). On the CPU Triton runs under
TRITON_INTERPRET=1 and the CUDA extension's kernel code under its emulation (MOS_CUDA_EMULATE=1),
fp32 and fp16; the GPU check script runs the same file with MOS_TEST_DEVICE=cuda (fp32, fp16,
bf16). Outputs are poisoned with NaN / a sentinel before every kernel, so an element a kernel
fails to write cannot pass.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels._alloc import poisoned_outputs
from tests.kernel_cases import random_values
from tests.oracles import live_extras
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
@pytest.mark.parametrize("top_k,max_theme_tokens", [(1, None), (2, 3)])
def test_layer_equals_reference(encoder, top_k, max_theme_tokens, device, kernel_backend):
    from mos import MoSConfig, MoSLayer

    config = dict(dim=16, num_heads=2, num_themes=4, session_len=3, encoder=encoder, top_k=top_k,
                  max_theme_tokens=max_theme_tokens)
    torch.manual_seed(0)
    reference = live_extras(MoSLayer(MoSConfig(backend="reference", **config))).to(device)
    kernel_layer = MoSLayer(MoSConfig(backend=kernel_backend, **config)).to(device)
    kernel_layer.load_state_dict(reference.state_dict())
    offsets = mk.offsets_from_lengths(torch.tensor([0, 9, 1, 14, 0], device=device))
    values = random_values(24, 16, torch.float32, device)
    target = random_values(5, 16, torch.float32, device, seed=1)
    outs = []
    for layer in (reference, kernel_layer):
        x = values.clone().requires_grad_()
        out = layer(x, target, offsets)
        (out.output.square().sum() + out.aux_loss).backward()
        outs.append((out.output, x.grad, layer.prototypes.grad))
    for got, want in zip(outs[1], outs[0]):
        assert_close(got, want, "layer")
