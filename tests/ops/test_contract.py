"""What every op promises about its arguments, checked from the tables each op's test file holds
(plain data, defined next to the op's other tests; tests/input_cases.py says how each is checked):

  BAD_INPUT          {case: (call, exception, argument)}: the call fails at once with that
                     exception, its message starting with the argument's name.
  STRIDED_CASES      {op: make_case(device) -> (run, tensors)}: on every backend the op has, a
                     strided view of any one tensor argument gives the dense copy's answer,
                     forward and backward.
  ROWS_PAST_2_TO_31  {op: read_rows(tokens, index, gate, backend)}, for the ops that read token
                     rows through an index: rows past 2^31 elements of a reserved input read right.

A test's id names the op's file and the case, e.g. test_op_rejects_bad_input[theme_dispatch-
dispatch_gate_shape], test_strided_views_give_the_dense_answer[theme_gather-theme_scatter-triton].

And, marked gpu (skipped without CUDA), every kernel run twice on the same inputs gives the same
bits, forward and backward, in fp32 / fp16 / bf16: the routing chain (pooling+routing, dispatch,
gather) on both kernel backends and the expert chain (grouped linear, self-attention, target
attention) on Triton. These run whole chains rather than one op each: a chain feeds each op the
layout it meets in the layer, and one test per chain keeps the GPU time to one workload.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import mos_kernels as mk
from mos_kernels.backend import IMPLEMENTED
from tests.gpu_cases import GPU_DTYPES, needs_cuda, pool_route_run, theme_layout, workload
from tests.input_cases import check_rows_past_2_to_31, check_strided_views, named, strided_params
from tests.kernel_cases import ON_GPU

# Every test file of tests/ops, by the name a test id gives it: an op's new file (or table) is
# read without being listed here. A file without one of the tables has no case of that kind
# (the jagged helpers: bad arguments only; a second file of an op: none). pytest imports the same
# files as ops.test_<op> (tests/ is no package); a second copy costs little, as they hold no state.
OPS = {path.stem.removeprefix("test_"): importlib.import_module(f"tests.ops.{path.stem}")
       for path in sorted(Path(__file__).parent.glob("test_*.py")) if path.stem != "test_contract"}


def _table(name):
    return {op: getattr(module, name) for op, module in OPS.items() if hasattr(module, name)}


BAD_INPUT, STRIDED_CASES, ROWS_PAST_2_TO_31 = (_table(name) for name in ("BAD_INPUT", "STRIDED_CASES",
                                                                           "ROWS_PAST_2_TO_31"))


@pytest.mark.parametrize("op,case", [pytest.param(op, case, id=f"{op}-{case}")
                                     for op, table in BAD_INPUT.items() for case in table])
def test_op_rejects_bad_input(op, case):
    """The op refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[op][case]
    with pytest.raises(error, match=named(name)):
        fn()


@pytest.mark.parametrize("op,case,backend", [pytest.param(op, case, backend, id=f"{op}-{case}-{backend}")
                                             for op, table in STRIDED_CASES.items()
                                             for case, backend in strided_params(table)])
def test_strided_views_give_the_dense_answer(op, case, backend, device):
    check_strided_views(case, STRIDED_CASES[op][case], backend, device)


@pytest.mark.skipif(ON_GPU, reason="CPU memory trick; the GPU run allocates for real")
@pytest.mark.parametrize("op,case,backend", [pytest.param(op, case, backend, id=f"{op}-{case}-{backend}")
                                             for op, table in ROWS_PAST_2_TO_31.items()
                                             for case in table for backend in IMPLEMENTED[case]])
def test_rows_past_2_to_31_elements_read_through_an_index(op, case, backend):
    check_rows_past_2_to_31(case, ROWS_PAST_2_TO_31[op][case], backend)


def test_every_op_with_a_backend_has_a_strided_case():
    """A new op (or backend table entry) cannot miss the strided-view check: every op the backend
    table lists, and sessionize, has a case."""
    cases = {case for table in STRIDED_CASES.values() for case in table}
    assert cases == set(IMPLEMENTED) | {"sessionize"}, cases ^ (set(IMPLEMENTED) | {"sessionize"})


# ---- bitwise repeatability on a CUDA device, op chain by op chain -------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_pooling_routing_dispatch_gather_bitwise_deterministic(dtype, kernel_backend):
    """Same inputs, same bits: forward and backward of every kernel, run twice."""
    offsets, sessions, values, prototypes = workload(1_000_000, 128, 8, 2, dtype, seed=1)

    def run():
        pooled, routing, g_values, g_protos = pool_route_run(values, sessions, prototypes, 2, kernel_backend)
        dispatch = mk.theme_dispatch(routing.themes, routing.gate, sessions.session_offsets,
                                     sessions.session_example, num_examples=offsets.numel() - 1, num_themes=8,
                                     backend=kernel_backend)
        x = values.detach().requires_grad_()
        rows = mk.theme_gather(x, dispatch.gather_index, dispatch.row_gate.detach(),
                               inverse_index=dispatch.inverse_index, backend=kernel_backend)
        rows.float().square().sum().backward()
        return [pooled, routing.probs, routing.themes, g_values, g_protos, dispatch.gather_index,
                dispatch.inverse_index, rows, x.grad]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_grouped_linear_and_attention_bitwise_deterministic(dtype):
    """Forward and backward of the three ops, twice on the same inputs: the same bits."""
    dispatch, values = theme_layout(256, 1000, 64, dtype, seed=5)
    gen = torch.Generator(device="cuda").manual_seed(6)
    weight = (torch.randn(8, 64, 192, device="cuda", generator=gen) / 8).to(dtype)
    query = torch.randn(8 * 256, 64, device="cuda", generator=gen).to(dtype)

    def run():
        x = values.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        rows = mk.theme_gather(x, dispatch.gather_index, inverse_index=dispatch.inverse_index, backend="triton")
        qkv = mk.grouped_linear(rows, w, None, dispatch.expert_offsets, backend="triton")
        q, k, v = qkv.split(64, dim=1)
        rows = mk.jagged_self_attention(q, k, v, dispatch.theme_offsets, num_heads=2, backend="triton")
        out = mk.expert_target_attention(rows, query, w[:, :, :64].contiguous(), None, w[:, :, 64:128].contiguous(),
                                         None, dispatch.theme_offsets, num_heads=2, backend="triton")
        out.float().square().sum().backward()
        return [qkv, rows, out, x.grad, w.grad]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical runs"
