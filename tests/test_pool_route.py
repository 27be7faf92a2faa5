"""session_pool_route's kernel backends beyond the common shapes of test_kernel_backends.py: many
themes (one program's per-theme loop at K = 33 and 64), uneven sessions (one long session among
short and empty ones in a block), the straight-through gate and its gradient, bitwise repeatability.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels._alloc import poisoned_outputs
from tests.kernel_cases import ALL_DTYPES, random_values, skip_interpreted_bf16
from tests.test_kernel_backends import _assert_same_themes, _loss, _pool_route, _upcast
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def _uneven_offsets(device):
    """40 sessions: empty ones first, in the middle and last, one of 150 rows among 1-3-row ones
    (gap-mode sessionization), so one block walks 150 steps for mostly masked rows."""
    lengths = [0, 0, 2, 1, 150, 3, 0, 1] + [1, 2, 3, 0] * 7 + [5, 0, 0, 0]
    return mk.offsets_from_lengths(torch.tensor(lengths, dtype=torch.int64, device=device))


def _run(values, offsets, prototypes, backend, top_k):
    values, prototypes = values.detach().requires_grad_(), prototypes.detach().requires_grad_()
    pooled, routing = _pool_route(values, offsets, prototypes, backend, top_k)
    _loss(pooled, routing).backward()
    return pooled, routing, values.grad, prototypes.grad


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("dim,num_themes,top_k", [(24, 33, 3), (40, 64, 8), (130, 64, 1)])
def test_many_themes_uneven_sessions(dtype, dim, num_themes, top_k, device, kernel_backend):
    skip_interpreted_bf16(kernel_backend, dtype)
    offsets = _uneven_offsets(device)
    values = random_values(int(offsets[-1]), dim, dtype, device)
    prototypes = random_values(num_themes, dim, torch.float32, device, seed=3)
    # The reference runs in `dtype` too, so that it routes on the same rounded means: with 33-64
    # themes, a mean rounded to bf16 moves scores by more than the gap between some themes.
    ref_pooled, ref_routing, ref_g_values, ref_g_protos = _run(values, offsets, prototypes, "reference", top_k)
    pooled, routing, g_values, g_protos = _run(values, offsets, prototypes, kernel_backend, top_k)

    empty = (offsets[1:] == offsets[:-1]).nonzero().flatten()
    assert torch.equal(pooled[empty].float(), torch.zeros(len(empty), dim, device=device))
    assert_close(pooled.float(), ref_pooled.float(), "reduction", dtype=dtype)
    assert_close(routing.scores, ref_routing.scores, "attention", dtype=dtype)
    assert_close(routing.probs, ref_routing.probs, "attention", dtype=dtype)
    _assert_same_themes(routing.themes, ref_routing.scores, ref_routing.themes)
    grad_kind = "attention_grad" if dtype == torch.float32 else "attention"
    assert_close(g_values.float(), ref_g_values.float(), grad_kind, dtype=dtype)
    assert_close(g_protos, ref_g_protos, grad_kind, dtype=dtype)

    # The fp32 sums run in time order and the prototypes' gradient adds its per-program shares in
    # one fixed order: a second run gives the same bits.
    again = _run(values, offsets, prototypes, kernel_backend, top_k)
    for first, second in zip((pooled, routing.scores, routing.probs, routing.themes, g_values, g_protos),
                             (again[0], again[1].scores, again[1].probs, again[1].themes, again[2], again[3])):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gate_is_one_and_its_gradient_reaches_the_router(dtype, device, kernel_backend):
    """A loss of the gate alone: its forward value is exactly 1, and its gradient (d gate / d p = 1
    at each chosen theme) is the only one reaching values and prototypes, as in the reference."""
    offsets = _uneven_offsets(device)
    values = random_values(int(offsets[-1]), 16, dtype, device)
    prototypes = random_values(5, 16, torch.float32, device, seed=3)
    weights = random_values(offsets.numel() - 1, 2, torch.float32, device, seed=4)
    grads = {}
    for backend in ("reference", kernel_backend):
        v = (_upcast(values) if backend == "reference" else values.clone()).requires_grad_()
        c = prototypes.clone().requires_grad_()
        _, routing = mk.session_pool_route(v, offsets, c, temperature=0.2, top_k=2, backend=backend)
        assert routing.gate.dtype == v.dtype
        assert torch.equal(routing.gate, torch.ones_like(routing.gate))
        (routing.gate.float() * weights).sum().backward()
        grads[backend] = (v.grad, c.grad)
    g_values, g_protos = grads[kernel_backend]
    assert g_protos.abs().max() > 0          # the gate's gradient does arrive
    assert_close(g_values.float(), grads["reference"][0], "attention", dtype=dtype)
    assert_close(g_protos, grads["reference"][1], "attention", dtype=dtype)
