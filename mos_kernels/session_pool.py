"""Session pooling, alone or fused with theme routing (the routing's shared pieces: routing.py).

`session_pool(values, session_offsets)`: the mean of every session's rows.
`session_pool_route(values, session_offsets, prototypes, temperature, top_k)`: the means plus
the routing of every session, in one pass over the token rows: the fused Triton kernel reads
each row once and never writes the pooled rows twice.

Reference: pure PyTorch (`_session_pool_reference`, then `_route_reference`).
Triton: `session_pool_kernels` (one program per block of sessions, forward and backward),
registered as the custom ops mos::session_pool_route and mos::session_pool_route_backward, with a
FLOP formula.
CUDA C++: torch.ops.mos_cuda.session_pool_route(_backward) (csrc/mos/session_pool.h) keep the
earlier schemas (no gate output; the backward returns the scores' gradient and the prototypes'
gradient is one GEMM); cuda_registration.py gives them their fakes and autograd formula and
shares this module's FLOP formula.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import check_offsets, check_values
from ._layout import kernel_op
from .backend import kernel_ops, resolve_backend
from .jagged import lengths_from_offsets, segment_ids
from ._launch import cdiv, next_power_of_2
from .routing import NORM_EPS, Routing, check_routing_args, normalized, straight_through_gate


def session_pool(values: torch.Tensor, session_offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """values [T, d] + session_offsets [S+1] -> [S, d] means; an empty session pools to zeros."""
    check_values("values", values)
    check_offsets("session_offsets", session_offsets, total=values.shape[0], device=values.device)
    chosen = resolve_backend(backend, values, "session_pool")
    if chosen != "reference":
        empty = values.new_empty((0, values.shape[1]), dtype=torch.float32)
        return kernel_ops(chosen).session_pool_route(values, session_offsets, empty, 1.0, 0)[0]
    return _session_pool_reference(values, session_offsets)


def session_pool_route(values: torch.Tensor, session_offsets: torch.Tensor, prototypes: torch.Tensor, *,
                       temperature: float = 0.1, top_k: int = 1,
                       backend: str = "auto") -> Tuple[torch.Tensor, Routing]:
    """Pool every session and route it to its top-k themes: (pooled [S, d], Routing)."""
    check_values("values", values)
    check_offsets("session_offsets", session_offsets, total=values.shape[0], device=values.device)
    check_routing_args("values", values, prototypes, temperature, top_k)
    chosen = resolve_backend(backend, values, "session_pool_route")
    if chosen == "reference":
        pooled = _session_pool_reference(values, session_offsets)
        return pooled, _route_reference(pooled, prototypes, temperature, top_k)
    unit_prototypes = normalized(prototypes)   # autograd through the normalisation stays in PyTorch
    if chosen == "cuda":   # its operator keeps the earlier schema, without the gate
        pooled, scores, probs, themes = kernel_ops(chosen).session_pool_route(
            values, session_offsets, unit_prototypes, 1.0 / temperature, top_k)
        gate = straight_through_gate(probs, themes).to(values.dtype)
    else:
        pooled, scores, probs, themes, gate = kernel_ops(chosen).session_pool_route(
            values, session_offsets, unit_prototypes, 1.0 / temperature, top_k)
    return pooled, Routing(themes=themes, gate=gate, probs=probs, scores=scores)


def _session_pool_reference(values: torch.Tensor, session_offsets: torch.Tensor) -> torch.Tensor:
    num_sessions = session_offsets.numel() - 1
    # Accumulate in fp32 at least: half-precision sums of long sessions lose digits.
    acc_dtype = torch.promote_types(values.dtype, torch.float32)
    sums = values.new_zeros((num_sessions, values.shape[1]), dtype=acc_dtype)
    sums.index_add_(0, segment_ids(session_offsets, values.shape[0], check=False), values.to(acc_dtype))
    counts = lengths_from_offsets(session_offsets, check=False).clamp_min(1).to(acc_dtype)
    return (sums / counts[:, None]).to(values.dtype)


def _route_reference(pooled: torch.Tensor, prototypes: torch.Tensor, temperature: float, top_k: int) -> Routing:
    """The routing of the pooled rows, without checks or backend choice."""
    scores = normalized(pooled) @ normalized(prototypes).t() / temperature
    probs = torch.softmax(scores, dim=-1)
    # A stable descending sort breaks ties towards the lower theme index, like the kernel.
    themes = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]
    gate = straight_through_gate(probs, themes).to(pooled.dtype)
    return Routing(themes=themes, gate=gate, probs=probs, scores=scores)


# Launch parameters, chosen by the compiled numbers (ptxas, sm_90a): at bf16, d = 128, the forward
# takes 96 registers with 32 sessions per program at K = 8 (5 programs per SM); the backward holds
# four fp32 [BLOCK_S, BLOCK_D] tiles (pooled row, unit row, its gradient, the gradient taken back):
# 32 sessions take 165 registers at K = 8 and spill at fp32, d = 256, K = 64; 16 take 96.
NUM_WARPS = 4
NUM_STAGES = 3


def pool_route_blocks(dim: int, num_themes: int, backward: bool = False) -> dict:
    """The constexpr block sizes a launch uses for width `dim` and K = `num_themes` (0: pool only)."""
    block_d = max(next_power_of_2(dim), 16)     # 16: the smallest block tools/compile_configs.py lists
    # An fp32 [BLOCK_S, BLOCK_D] tile takes BLOCK_S * BLOCK_D / 128 registers per thread (4 warps).
    block_s = (4096 if not backward else 2048) // max(block_d, 128)
    if dim % 16 and not backward:
        # Rows not known to be 16-byte aligned load without cp.async, so the pipelined steps wait
        # in registers: bf16, d = 128 would take 242 registers at 32 sessions, 128 at 16.
        block_s //= 2
    return {"BLOCK_S": block_s, "BLOCK_D": block_d, "BLOCK_K": max(next_power_of_2(max(num_themes, 1)), 2)}


# ----------------------------------------------------------------------------- custom ops

@kernel_op("mos::session_pool_route")
def _session_pool_route_op(values: torch.Tensor, session_offsets: torch.Tensor, prototypes: torch.Tensor,
                           inv_temperature: float, top_k: int
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """prototypes: unit rows [K, d] fp32 (K = 0: pool only). Returns pooled [S, d] (values' dtype),
    scores and probs [S, K] fp32, themes [S, top_k] int64 and the straight-through gate [S, top_k]
    (values' dtype, exactly 1; its gradient reaches probs in the backward)."""
    num_sessions, dim = session_offsets.numel() - 1, values.shape[1]
    num_themes = prototypes.shape[0]
    device = values.device
    pooled = new_output((num_sessions, dim), dtype=values.dtype, device=device)
    scores = new_output((num_sessions, num_themes), dtype=torch.float32, device=device)
    probs = new_output((num_sessions, num_themes), dtype=torch.float32, device=device)
    themes = new_output((num_sessions, top_k), dtype=torch.int64, device=device)
    gate = new_output((num_sessions, top_k), dtype=values.dtype, device=device)
    if num_sessions:
        from .session_pool_kernels import _pool_route_fwd   # triton only where a kernel launches

        blocks = pool_route_blocks(dim, num_themes)
        _pool_route_fwd[(cdiv(num_sessions, blocks["BLOCK_S"]),)](
            values, session_offsets, prototypes, pooled, scores, probs, themes, gate,
            num_sessions, dim, num_themes, inv_temperature, NORM_EPS, **blocks, TOP_K=max(top_k, 1),
            ROUTE=num_themes > 0, STAGES=NUM_STAGES, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return pooled, scores, probs, themes, gate


@_session_pool_route_op.register_fake
def pool_route_fake(values, session_offsets, prototypes, inv_temperature, top_k):
    num_sessions = session_offsets.shape[0] - 1
    pooled = values.new_empty((num_sessions, values.shape[1]))
    scores = values.new_empty((num_sessions, prototypes.shape[0]), dtype=torch.float32)
    themes = values.new_empty((num_sessions, top_k), dtype=torch.int64)
    return pooled, scores, torch.empty_like(scores), themes, values.new_empty((num_sessions, top_k))


@kernel_op("mos::session_pool_route_backward")
def _session_pool_route_backward_op(g_pooled: torch.Tensor, g_scores: torch.Tensor, g_probs: torch.Tensor,
                                    g_gate: torch.Tensor, values: torch.Tensor, pooled: torch.Tensor,
                                    probs: torch.Tensor, themes: torch.Tensor, prototypes: torch.Tensor,
                                    session_offsets: torch.Tensor, inv_temperature: float
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad of values [T, d] in values' dtype, grad of the unit prototypes [K, d] fp32)."""
    num_sessions, dim = pooled.shape
    num_themes = prototypes.shape[0]
    blocks = pool_route_blocks(dim, num_themes, backward=True)
    programs = cdiv(num_sessions, blocks["BLOCK_S"])
    g_values = new_output(values.shape, dtype=values.dtype, device=values.device)
    # One fp32 [K, d] share of the prototypes' gradient per program, added in one fixed order
    # below: the same bits on every run, no atomics. Its cost, written once and read once, is
    # 8 K d / BLOCK_S bytes per session, against ~10 d for a GEMM over fp32 unit rows of the
    # pooled means: less at few themes (K = 8, d = 128: 512 against ~1300 bytes), more from
    # K ~ 1.25 BLOCK_S on (K = 64, d = 256: 16 KB per session).
    g_protos = new_output((programs, num_themes, dim), dtype=torch.float32, device=values.device)
    if num_sessions:
        from .session_pool_kernels import _pool_route_bwd

        _pool_route_bwd[(programs,)](
            g_pooled, pooled, g_scores, g_probs, g_gate, probs, themes, prototypes, session_offsets, g_values,
            g_protos, num_sessions, dim, num_themes, inv_temperature, NORM_EPS, **blocks,
            TOP_K=max(themes.shape[1], 1), ROUTE=num_themes > 0, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return g_values, g_protos.sum(0)


@_session_pool_route_backward_op.register_fake
def pool_route_backward_fake(g_pooled, g_scores, g_probs, g_gate, values, pooled, probs, themes, prototypes,
                             session_offsets, inv_temperature):
    return values.new_empty(values.shape), probs.new_empty(prototypes.shape)


def _setup_context(ctx, inputs, output):
    values, session_offsets, prototypes, inv_temperature, _ = inputs
    pooled, _, probs, themes, _ = output
    ctx.save_for_backward(values, session_offsets, prototypes, pooled, probs, themes)
    ctx.inv_temperature = inv_temperature


def _backward(ctx, g_pooled, g_scores, g_probs, _g_themes, g_gate):
    values, session_offsets, prototypes, pooled, probs, themes = ctx.saved_tensors
    g_values, g_prototypes = torch.ops.mos.session_pool_route_backward(
        g_pooled, g_scores, g_probs, g_gate, values, pooled, probs, themes, prototypes, session_offsets,
        ctx.inv_temperature)
    return g_values, None, g_prototypes, None, None


_session_pool_route_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.mos.session_pool_route)
def pool_route_flops(values_shape, session_offsets_shape, prototypes_shape, *args, out_shape=None, **kwargs):
    num_tokens, dim = values_shape
    num_sessions = session_offsets_shape[0] - 1
    num_themes = prototypes_shape[0]
    # Sum every row, divide per session; route: normalise (3d) and K dot products (2d each).
    return num_tokens * dim + num_sessions * dim + num_sessions * (3 * dim + 2 * num_themes * dim)
