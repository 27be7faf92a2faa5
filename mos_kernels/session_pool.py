"""Session pooling (spec step 2), alone or fused with theme routing (step 3).

`session_pool(values, session_offsets)`: the mean of every session's rows.
`session_pool_route(values, session_offsets, prototypes, temperature, top_k)`: the means plus
the routing of every session, in one pass over the token rows: the fused Triton kernel reads
each row once and never writes the pooled rows twice.

Reference: pure PyTorch (`_session_pool_reference` + `theme_route`'s reference).
Triton: `_pool_route_fwd` (one program per block of sessions) and `_pool_route_bwd`, registered as the
custom ops mos::session_pool_route and mos::session_pool_route_backward, with FLOP formulas.
CUDA C++: the same two operators in torch.ops.mos_cuda (csrc/mos/session_pool.h), sharing this
module's fakes, autograd formula (`backward_for`) and FLOP formula (cuda_ops.py).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from ._checks import check_offsets, check_values
from ._layout import kernel_op
from .backend import kernel_ops, resolve_backend
from .jagged import lengths_from_offsets, segment_ids
from .session_blocks import membership, session_block
from .theme_route import (NORM_EPS, Routing, _theme_route_reference, check_routing_args, normalized,
                          straight_through_gate)

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
        return pooled, _theme_route_reference(pooled, prototypes, temperature, top_k)
    pooled, scores, probs, themes = kernel_ops(chosen).session_pool_route(
        values, session_offsets, normalized(prototypes), 1.0 / temperature, top_k)
    gate = straight_through_gate(probs, themes).to(values.dtype)
    return pooled, Routing(themes=themes, gate=gate, probs=probs, scores=scores)


def _session_pool_reference(values: torch.Tensor, session_offsets: torch.Tensor) -> torch.Tensor:
    num_sessions = session_offsets.numel() - 1
    # Accumulate in fp32 at least: half-precision sums of long sessions lose digits.
    acc_dtype = torch.promote_types(values.dtype, torch.float32)
    sums = values.new_zeros((num_sessions, values.shape[1]), dtype=acc_dtype)
    sums.index_add_(0, segment_ids(session_offsets, values.shape[0]), values.to(acc_dtype))
    counts = lengths_from_offsets(session_offsets).clamp_min(1).to(acc_dtype)
    return (sums / counts[:, None]).to(values.dtype)


# ----------------------------------------------------------------------------- Triton kernels
#
# One program per block of BLOCK_S consecutive sessions (`session_blocks`): each row tile is
# added into its sessions with a one-hot matrix product (membership [BLOCK_S, BLOCK_T] @ rows
# [BLOCK_T, d]); a program per session would leave most of each tile masked and launch a
# program per 8 rows. The one-hot product is exact: products with 1 and 0, accumulated in fp32
# (fp32 inputs use the IEEE path, not TF32). Indices and widths are int64 (session_block, and the
# casts below): a row or session index times the width can pass 2^31.

@triton.jit
def _pool_route_fwd(values_ptr, offsets_ptr, protos_ptr, pooled_ptr, scores_ptr, probs_ptr, themes_ptr,
                    num_sessions, dim, num_themes, inv_temperature, eps,
                    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                    TOP_K: tl.constexpr, ROUTE: tl.constexpr):
    dim, num_themes = tl.cast(dim, tl.int64), tl.cast(num_themes, tl.int64)
    sessions, s_ok, starts, ends, first, last = session_block(offsets_ptr, num_sessions, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for row0 in range(first, last, BLOCK_T):
        rows = row0 + tl.arange(0, BLOCK_T)
        x = tl.load(values_ptr + rows[:, None] * dim + cols[None, :],
                    mask=(rows < last)[:, None] & col_ok[None, :], other=0.0)
        member = membership(rows, starts, ends).to(x.dtype)
        acc += tl.dot(member, x, input_precision="ieee")
    mean = acc / tl.maximum((ends - starts).to(tl.float32), 1.0)[:, None]
    pooled = mean.to(pooled_ptr.dtype.element_ty)
    tl.store(pooled_ptr + sessions[:, None] * dim + cols[None, :], pooled, mask=s_ok[:, None] & col_ok[None, :])
    if ROUTE:
        # Route on the stored (rounded) mean, exactly what the reference routes on.
        h = pooled.to(tl.float32)
        unit = h / tl.maximum(tl.sqrt(tl.sum(h * h, axis=1)), eps)[:, None]
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < num_themes
        c = tl.load(protos_ptr + ks[:, None] * dim + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        scores = tl.dot(unit, tl.trans(c), input_precision="ieee") * inv_temperature
        scores = tl.where(k_ok[None, :], scores, float("-inf"))
        e = tl.where(k_ok[None, :], tl.exp(scores - tl.max(scores, axis=1)[:, None]), 0.0)
        probs = e / tl.sum(e, axis=1)[:, None]
        out_mask = s_ok[:, None] & k_ok[None, :]
        tl.store(scores_ptr + sessions[:, None] * num_themes + ks[None, :], scores, mask=out_mask)
        tl.store(probs_ptr + sessions[:, None] * num_themes + ks[None, :], probs, mask=out_mask)
        # Top-k by repeated argmax; ties go to the lower theme index, as in the reference.
        remaining = scores
        for j in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=1)
            tl.store(themes_ptr + sessions * TOP_K + j, best.to(tl.int64), mask=s_ok)
            remaining = tl.where(ks[None, :] == best[:, None], float("-inf"), remaining)


@triton.jit
def _pool_route_bwd(g_pooled_ptr, pooled_ptr, g_scores_ptr, g_probs_ptr, probs_ptr, protos_ptr, offsets_ptr,
                    g_values_ptr, g_scores_total_ptr, num_sessions, dim, num_themes, inv_temperature, eps,
                    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                    ROUTE: tl.constexpr):
    dim, num_themes = tl.cast(dim, tl.int64), tl.cast(num_themes, tl.int64)
    sessions, s_ok, starts, ends, first, last = session_block(offsets_ptr, num_sessions, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    tile_mask = s_ok[:, None] & col_ok[None, :]
    g_h = tl.load(g_pooled_ptr + sessions[:, None] * dim + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    if ROUTE:
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < num_themes
        k_mask = s_ok[:, None] & k_ok[None, :]
        k_offs = sessions[:, None] * num_themes + ks[None, :]
        p = tl.load(probs_ptr + k_offs, mask=k_mask, other=0.0)
        g_p = tl.load(g_probs_ptr + k_offs, mask=k_mask, other=0.0)
        g_s = tl.load(g_scores_ptr + k_offs, mask=k_mask, other=0.0)
        g_s += p * (g_p - tl.sum(p * g_p, axis=1)[:, None])          # softmax backward
        tl.store(g_scores_total_ptr + k_offs, g_s, mask=k_mask)
        c = tl.load(protos_ptr + ks[:, None] * dim + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        g_unit = tl.dot(g_s, c, input_precision="ieee") * inv_temperature
        h = tl.load(pooled_ptr + sessions[:, None] * dim + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(h * h, axis=1))[:, None]
        # Backward of h / max(|h|, eps): project out the radial part, unless clamped by eps.
        unit = h / tl.maximum(norm, eps)
        radial = tl.sum(unit * g_unit, axis=1)[:, None]
        g_h += tl.where(norm > eps, (g_unit - unit * radial) / tl.maximum(norm, eps), g_unit / eps)
    count = (ends - starts).to(tl.float32)[:, None]
    # An empty session has no rows to receive its gradient; zero it so that a huge value
    # (a zero mean hits the eps branch) cannot turn into inf * 0 = NaN in the one-hot product.
    g_row = tl.where(count > 0, g_h / tl.maximum(count, 1.0), 0.0).to(g_values_ptr.dtype.element_ty)
    for row0 in range(first, last, BLOCK_T):
        rows = row0 + tl.arange(0, BLOCK_T)
        member = membership(rows, starts, ends).to(g_row.dtype)
        g_x = tl.dot(tl.trans(member), g_row, input_precision="ieee")   # each row takes its session's value
        tl.store(g_values_ptr + rows[:, None] * dim + cols[None, :], g_x.to(g_values_ptr.dtype.element_ty),
                 mask=(rows < last)[:, None] & col_ok[None, :])


# tl.dot needs every block dimension >= 16.
_BLOCK_S = 16
_BLOCK_T = 64


def _block_d(dim: int) -> int:
    return max(triton.next_power_of_2(dim), 16)


def _block_k(num_themes: int) -> int:
    return max(triton.next_power_of_2(max(num_themes, 1)), 16)


# ----------------------------------------------------------------------------- custom ops

@kernel_op("mos::session_pool_route")
def _session_pool_route_op(values: torch.Tensor, session_offsets: torch.Tensor, prototypes: torch.Tensor,
                           inv_temperature: float, top_k: int
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """prototypes: unit rows [K, d] fp32 (K = 0: pool only). Returns pooled, scores, probs, themes."""
    num_sessions, dim = session_offsets.numel() - 1, values.shape[1]
    num_themes = prototypes.shape[0]
    device = values.device
    pooled = new_output((num_sessions, dim), dtype=values.dtype, device=device)
    scores = new_output((num_sessions, num_themes), dtype=torch.float32, device=device)
    probs = new_output((num_sessions, num_themes), dtype=torch.float32, device=device)
    themes = new_output((num_sessions, top_k), dtype=torch.int64, device=device)
    if num_sessions:
        _pool_route_fwd[(triton.cdiv(num_sessions, _BLOCK_S),)](
            values, session_offsets, prototypes, pooled, scores, probs, themes,
            num_sessions, dim, num_themes, inv_temperature, NORM_EPS,
            BLOCK_S=_BLOCK_S, BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(dim), BLOCK_K=_block_k(num_themes),
            TOP_K=max(top_k, 1), ROUTE=num_themes > 0)
    return pooled, scores, probs, themes


@_session_pool_route_op.register_fake
def pool_route_fake(values, session_offsets, prototypes, inv_temperature, top_k):
    num_sessions = session_offsets.shape[0] - 1
    pooled = values.new_empty((num_sessions, values.shape[1]))
    scores = values.new_empty((num_sessions, prototypes.shape[0]), dtype=torch.float32)
    return pooled, scores, torch.empty_like(scores), values.new_empty((num_sessions, top_k), dtype=torch.int64)


@kernel_op("mos::session_pool_route_backward")
def _session_pool_route_backward_op(g_pooled: torch.Tensor, g_scores: torch.Tensor, g_probs: torch.Tensor,
                                    values: torch.Tensor, pooled: torch.Tensor, probs: torch.Tensor,
                                    prototypes: torch.Tensor, session_offsets: torch.Tensor,
                                    inv_temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad of values [T, d], grad of scores through the softmax [S, K] fp32)."""
    num_sessions, dim = pooled.shape
    num_themes = prototypes.shape[0]
    g_values = new_output(values.shape, dtype=values.dtype, device=values.device)
    g_scores_total = new_output((num_sessions, num_themes), dtype=torch.float32, device=values.device)
    if num_sessions:
        _pool_route_bwd[(triton.cdiv(num_sessions, _BLOCK_S),)](
            g_pooled, pooled, g_scores, g_probs, probs, prototypes, session_offsets, g_values, g_scores_total,
            num_sessions, dim, num_themes, inv_temperature, NORM_EPS,
            BLOCK_S=_BLOCK_S, BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(dim), BLOCK_K=_block_k(num_themes),
            ROUTE=num_themes > 0)
    return g_values, g_scores_total


@_session_pool_route_backward_op.register_fake
def pool_route_backward_fake(g_pooled, g_scores, g_probs, values, pooled, probs, prototypes, session_offsets, inv_temperature):
    return values.new_empty(values.shape), probs.new_empty((pooled.shape[0], prototypes.shape[0]))


def setup_context(ctx, inputs, output):
    values, session_offsets, prototypes, inv_temperature, _ = inputs
    pooled, _, probs, _ = output
    ctx.save_for_backward(values, session_offsets, prototypes, pooled, probs)
    ctx.inv_temperature = inv_temperature


def backward_for(lib: str):
    """The autograd formula of `lib`::session_pool_route (mos: Triton, mos_cuda: the C++ backend)."""
    def backward(ctx, g_pooled, g_scores, g_probs, _g_themes):
        values, session_offsets, prototypes, pooled, probs = ctx.saved_tensors
        g_values, g_scores_total = getattr(torch.ops, lib).session_pool_route_backward(
            g_pooled, g_scores, g_probs, values, pooled, probs, prototypes, session_offsets, ctx.inv_temperature)
        # One small GEMM over sessions for the prototypes: deterministic, no atomics.
        g_prototypes = (g_scores_total.t() @ normalized(pooled)) * ctx.inv_temperature
        return g_values, None, g_prototypes, None, None
    return backward


_session_pool_route_op.register_autograd(backward_for("mos"), setup_context=setup_context)


@register_flop_formula(torch.ops.mos.session_pool_route)
def pool_route_flops(values_shape, session_offsets_shape, prototypes_shape, *args, out_shape=None, **kwargs):
    num_tokens, dim = values_shape
    num_sessions = session_offsets_shape[0] - 1
    num_themes = prototypes_shape[0]
    # Sum every row, divide per session; route: normalise (3d) and K dot products (2d each).
    return num_tokens * dim + num_sessions * dim + num_sessions * (3 * dim + 2 * num_themes * dim)
