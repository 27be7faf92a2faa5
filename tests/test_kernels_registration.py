"""FLOP formulas of both kernel backends' registered operators (torch.ops.mos: Triton,
torch.ops.mos_cuda: the CUDA extension, on the CPU its emulation) against hand counts. Each op's
opcheck (schema, fake, autograd) is in its file under tests/ops/."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from tests.kernel_cases import opcheck_inputs, random_values


def test_flop_formulas_match_hand_counts(device, kernel_backend):
    ops = kernel_ops(kernel_backend)
    dim, num_themes, top_k = 12, 3, 2
    sessions, values, prototypes, themes = opcheck_inputs(device, dim, num_themes, top_k)
    num_tokens, num_sessions = values.shape[0], sessions.num_sessions
    with FlopCounterMode(display=False) as counter:
        ops.session_pool_route(values, sessions.session_offsets, prototypes.detach(), 5.0, top_k)
    # sum T*d, divide S*d, normalise 3*S*d, K dot products 2*K*d per session
    expected = num_tokens * dim + num_sessions * dim + num_sessions * (3 * dim + 2 * num_themes * dim)
    assert counter.get_total_flops() == expected

    dispatch = mk.theme_dispatch(themes, torch.rand(themes.shape, device=device), sessions.session_offsets,
                                 sessions.session_example, num_examples=4, num_themes=num_themes,
                                 backend="reference")
    rows = dispatch.gather_index.numel()
    for op, data in ((ops.theme_gather, values), (ops.theme_scatter, random_values(rows, dim, torch.float32, device))):
        with FlopCounterMode(display=False) as counter:
            op(data.detach(), dispatch.gather_index, dispatch.row_gate.detach(), dispatch.inverse_index)
        assert counter.get_total_flops() == rows * dim          # one multiply by the gate per element
        with FlopCounterMode(display=False) as counter:
            op(data.detach(), dispatch.gather_index, None, dispatch.inverse_index)
        assert counter.get_total_flops() == 0                   # pure data movement
