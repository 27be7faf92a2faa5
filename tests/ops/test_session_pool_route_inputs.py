"""session_pool_route, session_pool and theme_route on unusual input: bad arguments refused by name,
and strided views of every tensor argument giving the dense answer (tests/input_cases.py says how).
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from tests.input_cases import (DIM, NUM_THEMES, STRIDED_DIM, TOP_K, call_session_pool_route, call_theme_route,
                               check_strided_views, named, strided_layout, strided_params)
from tests.kernel_cases import random_values


BAD_INPUT = {
    # name: (call, exception, argument named)
    "route_zero_prototypes": (lambda: call_theme_route(prototypes=torch.randn(0, DIM)), ValueError, "prototypes"),
    "route_top_k_above_K": (lambda: call_theme_route(top_k=4), ValueError, "top_k"),
    "route_top_k_0": (lambda: call_theme_route(top_k=0), ValueError, "top_k"),
    "route_prototype_width": (lambda: call_theme_route(prototypes=torch.randn(3, DIM + 1)), ValueError, "prototypes"),
    "route_nan_pooled": (lambda: call_theme_route(pooled=torch.full((2, DIM), math.nan)), ValueError, "pooled"),
    "route_int_prototypes": (lambda: call_theme_route(prototypes=torch.ones(3, DIM, dtype=torch.int64)), TypeError,
                             "prototypes"),
    "route_temperature_0": (lambda: call_theme_route(temperature=0.0), ValueError, "temperature"),
    "pool_route_zero_prototypes": (lambda: call_session_pool_route(prototypes=torch.randn(0, DIM)), ValueError,
                                   "prototypes"),
    "pool_route_top_k_above_K": (lambda: call_session_pool_route(top_k=4), ValueError, "top_k"),
    "pool_route_offsets_short": (lambda: call_session_pool_route(session_offsets=torch.tensor([0, 2, 4])), ValueError,
                                 "session_offsets"),
    "pool_int_values": (lambda: mk.session_pool(torch.ones(3, DIM, dtype=torch.int64), torch.tensor([0, 3])),
                        TypeError, "values"),
    "pool_inf_values": (lambda: mk.session_pool(torch.tensor([[math.inf] * DIM]), torch.tensor([0, 1])),
                        ValueError, "values"),
    "pool_float_offsets": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0.0, 3.0])), TypeError,
                           "session_offsets"),
    "pool_offsets_not_monotone": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0, 2, 1, 3])),
                                  ValueError, "session_offsets"),
    "pool_offsets_not_from_0": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([1, 3])), ValueError,
                                "session_offsets"),
    "pool_offsets_2d": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([[0, 3]])), ValueError,
                        "session_offsets"),
    "unknown_backend": (lambda: mk.session_pool(torch.randn(3, DIM), torch.tensor([0, 3]), backend="rocm"),
                        ValueError, "session_pool: backend"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_op_rejects_bad_input(case):
    """session_pool_route, session_pool or theme_route refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()


# ---- strided views of every tensor argument (tests/input_cases.py) ---------------------------

def _pool_case(device):
    _, sessions, _, _, _ = strided_layout(device)
    values = random_values(int(sessions.session_offsets[-1]), STRIDED_DIM, torch.float32, device)

    def run(backend, values, session_offsets):
        return (mk.session_pool(values, session_offsets, backend=backend),)
    return run, dict(values=values, session_offsets=sessions.session_offsets)


def _pool_route_case(device):
    _, sessions, _, _, _ = strided_layout(device)
    values = random_values(int(sessions.session_offsets[-1]), STRIDED_DIM, torch.float32, device)

    def run(backend, values, session_offsets, prototypes):
        pooled, r = mk.session_pool_route(values, session_offsets, prototypes, temperature=0.5, top_k=TOP_K,
                                          backend=backend)
        return pooled, r.scores, r.probs, r.themes, r.gate
    return run, dict(values=values, session_offsets=sessions.session_offsets,
                     prototypes=random_values(NUM_THEMES, STRIDED_DIM, torch.float32, device, seed=1))


def _route_case(device):
    def run(backend, pooled, prototypes):
        r = mk.theme_route(pooled, prototypes, temperature=0.5, top_k=TOP_K, backend=backend)
        return r.scores, r.probs, r.themes, r.gate
    return run, dict(pooled=random_values(6, STRIDED_DIM, torch.float32, device),
                     prototypes=random_values(NUM_THEMES, STRIDED_DIM, torch.float32, device, seed=1))


STRIDED_CASES = {"session_pool": _pool_case, "session_pool_route": _pool_route_case, "theme_route": _route_case}


@pytest.mark.parametrize("op,backend", strided_params(STRIDED_CASES))
def test_strided_views_give_the_dense_answer(op, backend, device):
    check_strided_views(op, STRIDED_CASES[op], backend, device)
