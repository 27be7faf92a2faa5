"""The Python side of the CUDA extension's operators `torch.ops.mos_cuda.*`: fake tensors
(torch.compile), autograd (the backward ops of the same namespace) and FLOP formulas, reusing
the Triton op modules' functions where the schemas agree.

`register_python_side` runs once the operators are loaded: the package's hook calls it when
backend "cuda" has loaded them (`backend.on_cuda_load`); importing this module after someone else
loaded them (`import mos_kernels._C`; schema.cpp's set_python_module names this module for the
fakes) registers too. It imports the op modules and only the package's load hook imports it, so
the imports go one way.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .session_pool import pool_route_flops
from .theme_dispatch import dispatch_backward, dispatch_fake, dispatch_setup_context
from .theme_gather import (gate_flops, gather_backward_for, gather_fake, row_dot_fake, scatter_backward_for,
                           scatter_fake, setup_context)
from .routing import normalized

LIB = "mos_cuda"
_registered = False


def register_python_side() -> None:
    """Once per process: fakes, autograd and FLOP formulas of the loaded torch.ops.mos_cuda."""
    global _registered
    if _registered:
        return
    _registered = True
    fakes = {
        "session_pool_route": _pool_route_fake,
        "session_pool_route_backward": _pool_route_backward_fake,
        "theme_dispatch": dispatch_fake,
        "theme_gather": gather_fake,
        "theme_scatter": scatter_fake,
        "row_dot": row_dot_fake,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{LIB}::{name}", fake)
    torch.library.register_autograd(f"{LIB}::session_pool_route", _pool_route_backward,
                                    setup_context=_pool_route_setup_context)
    torch.library.register_autograd(f"{LIB}::theme_dispatch", dispatch_backward, setup_context=dispatch_setup_context)
    torch.library.register_autograd(f"{LIB}::theme_gather", gather_backward_for(LIB), setup_context=setup_context)
    torch.library.register_autograd(f"{LIB}::theme_scatter", scatter_backward_for(LIB), setup_context=setup_context)
    # The Triton modules' formulas are already wrapped for shapes by their own registration: raw here.
    register_flop_formula(torch.ops.mos_cuda.session_pool_route, get_raw=True)(pool_route_flops)
    register_flop_formula([torch.ops.mos_cuda.theme_gather, torch.ops.mos_cuda.theme_scatter], get_raw=True)(
        gate_flops)


# session_pool_route keeps its earlier schema here (the Triton op also returns the gate, and its
# backward the prototypes' gradient): pooled, scores, probs, themes; the backward returns the
# values' gradient and the scores' gradient through the softmax.
def _pool_route_fake(values, session_offsets, prototypes, inv_temperature, top_k):
    num_sessions = session_offsets.shape[0] - 1
    scores = values.new_empty((num_sessions, prototypes.shape[0]), dtype=torch.float32)
    return (values.new_empty((num_sessions, values.shape[1])), scores, torch.empty_like(scores),
            values.new_empty((num_sessions, top_k), dtype=torch.int64))


def _pool_route_backward_fake(g_pooled, g_scores, g_probs, values, pooled, probs, prototypes, session_offsets,
                              inv_temperature):
    return values.new_empty(values.shape), probs.new_empty((pooled.shape[0], prototypes.shape[0]))


def _pool_route_setup_context(ctx, inputs, output):
    values, session_offsets, prototypes, inv_temperature, _ = inputs
    pooled, _, probs, _ = output
    ctx.save_for_backward(values, session_offsets, prototypes, pooled, probs)
    ctx.inv_temperature = inv_temperature


def _pool_route_backward(ctx, g_pooled, g_scores, g_probs, _g_themes):
    values, session_offsets, prototypes, pooled, probs = ctx.saved_tensors
    g_values, g_scores_total = torch.ops.mos_cuda.session_pool_route_backward(
        g_pooled, g_scores, g_probs, values, pooled, probs, prototypes, session_offsets, ctx.inv_temperature)
    # One small GEMM over sessions for the prototypes: deterministic, no atomics.
    g_prototypes = (g_scores_total.t() @ normalized(pooled)) * ctx.inv_temperature
    return g_values, None, g_prototypes, None, None


def _operators_loaded() -> bool:
    try:
        torch.ops.mos_cuda.session_pool_route   # noqa: B018  (raises if the library is not loaded)
    except (AttributeError, RuntimeError):
        return False
    return True


if _operators_loaded():
    register_python_side()
