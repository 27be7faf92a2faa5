"""Operator registration of both kernel backends (torch.ops.mos: Triton, torch.ops.mos_cuda: the
CUDA extension, on the CPU its emulation): opcheck (schema, fake, autograd) and FLOP formulas."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.backend import kernel_ops
from mos_kernels.theme_route import normalized
from tests.kernel_cases import make_sessions, random_themes, random_values


def _inputs(device, dim=12, num_themes=3, top_k=2):
    _, sessions = make_sessions([5, 0, 11, 3], 3, device)
    values = random_values(19, dim, torch.float32, device).requires_grad_()
    prototypes = normalized(random_values(num_themes, dim, torch.float32, device, seed=2)).requires_grad_()
    themes = random_themes(sessions.num_sessions, num_themes, top_k, device)
    return sessions, values, prototypes, themes


def test_opcheck_session_pool_route(device, kernel_backend):
    ops = kernel_ops(kernel_backend)
    sessions, values, prototypes, _ = _inputs(device)
    torch.library.opcheck(ops.session_pool_route.default,
                          (values, sessions.session_offsets, prototypes, 5.0, 2))
    torch.library.opcheck(ops.session_pool_route.default,
                          (values, sessions.session_offsets, prototypes[:0].detach(), 1.0, 0))


@pytest.mark.parametrize("capacity", [0, 2])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_opcheck_theme_dispatch(capacity, gate_dtype, device, kernel_backend):
    """Schema, fake and autograd: the gate's gradient comes through the op's registered backward."""
    sessions, _, _, themes = _inputs(device)
    gate = torch.rand(themes.shape, dtype=gate_dtype, device=device).requires_grad_()
    eso = sessions.example_session_offsets
    # opcheck's AOT test adds every output into one sum that starts as the int64 gather_index and
    # cannot take the float row_gate; test_layer_compile.py traces the op forward and backward.
    torch.library.opcheck(kernel_ops(kernel_backend).theme_dispatch.default,
                          (themes, gate, sessions.session_offsets, sessions.session_example, eso, 19, 3, capacity),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("gated", [True, False])
def test_opcheck_gather_scatter(gated, device, kernel_backend):
    ops = kernel_ops(kernel_backend)
    sessions, values, _, themes = _inputs(device)
    gate = torch.rand(themes.shape, device=device)
    dispatch = mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                                 num_examples=4, num_themes=3, backend="reference")
    row_gate = dispatch.row_gate.detach().requires_grad_() if gated else None
    index, inverse = dispatch.gather_index, dispatch.inverse_index
    torch.library.opcheck(ops.theme_gather.default, (values, index, row_gate, inverse))
    rows = random_values(index.numel(), values.shape[1], torch.float32, device).requires_grad_()
    torch.library.opcheck(ops.theme_scatter.default, (rows, index, row_gate, inverse))


def test_flop_formulas_match_hand_counts(device, kernel_backend):
    ops = kernel_ops(kernel_backend)
    dim, num_themes, top_k = 12, 3, 2
    sessions, values, prototypes, themes = _inputs(device, dim, num_themes, top_k)
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
