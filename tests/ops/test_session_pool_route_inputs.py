"""session_pool_route (and session_pool, theme_route): bad arguments refused by name.
"""
from __future__ import annotations

import math
import pytest
import torch

import mos_kernels as mk
from tests.input_cases import DIM, call_session_pool_route, call_theme_route, named


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
    "pool_route_zero_prototypes": (lambda: call_session_pool_route(prototypes=torch.randn(0, DIM)), ValueError, "prototypes"),
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
    """session_pool_route refuses a bad argument by name."""
    fn, error, name = BAD_INPUT[case]
    with pytest.raises(error, match=named(name)):
        fn()
