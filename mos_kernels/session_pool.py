"""Session pooling, alone or fused with theme routing (`theme_route`).

`session_pool(values, session_offsets)`: the mean of every session's rows.
`session_pool_route(values, session_offsets, prototypes, temperature, top_k)`: the means plus
the routing of every session, in one pass over the token rows: the fused Triton kernel reads
each row once and never writes the pooled rows twice.

Reference: pure PyTorch (`_session_pool_reference` + `theme_route`'s reference).
Triton: `_pool_route_fwd` (one program per block of sessions; it also writes the straight-through
gate) and `_pool_route_bwd` (it also gives the prototypes' gradient), registered as the custom ops
mos::session_pool_route and mos::session_pool_route_backward, with a FLOP formula.
CUDA C++: torch.ops.mos_cuda.session_pool_route(_backward) (csrc/mos/session_pool.h) keep the
earlier schemas (no gate output; the backward returns the scores' gradient and the prototypes'
gradient is one GEMM); cuda_registration.py gives them their fakes and autograd formula and
shares this module's FLOP formula.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from .checks import check_offsets, check_values
from ._layout import kernel_op
from .backend import kernel_ops, resolve_backend
from .jagged import lengths_from_offsets, segment_ids
from .theme_route import (NORM_EPS, Routing, check_routing_args, normalized, straight_through_gate,
                          theme_route_reference)


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
        return pooled, theme_route_reference(pooled, prototypes, temperature, top_k)
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
    sums.index_add_(0, segment_ids(session_offsets, values.shape[0]), values.to(acc_dtype))
    counts = lengths_from_offsets(session_offsets).clamp_min(1).to(acc_dtype)
    return (sums / counts[:, None]).to(values.dtype)


# ----------------------------------------------------------------------------- Triton kernels
#
# One program per block of BLOCK_S consecutive sessions, walked in "padded" steps: step j
# loads row start_s + j of every session s of the block at once (a [BLOCK_S, BLOCK_D] tile of
# rows that are each contiguous), masked where j >= length_s, and adds it into the session's fp32
# sum in time order (the same bits on every run). Nothing feeds a tl.dot, so the loop is
# pipelined through `tl.range(num_stages=...)`, which software-pipelines plain loads (cp.async on
# sm_90); the kernel-level num_stages only pipelines loads that feed a dot.
#
# Cost of uneven sessions: a block takes as many steps as its longest session, and each step
# issues the whole tile. The masked lanes move no bytes, but one long session among short ones
# (gap-mode sessionization) keeps its program looping with one useful row per step, BLOCK_S times
# fewer bytes per instruction than a full step; the other programs on the SM keep streaming.
#
# Routing runs on the stored (rounded) mean with one fused multiply-add reduction per theme
# (BLOCK_K = next power of 2 of K holds the scores): no matrix-product tile, so no shared memory,
# and K = 64 does not spill. Row indices, widths and session ids are int64: their products pass 2^31.

@triton.jit
def _block_sessions(program, offsets_ptr, num_sessions, BLOCK_S: tl.constexpr):
    """The block's session ids [BLOCK_S] (int64), their mask, first rows and lengths."""
    sessions = program.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = sessions < num_sessions
    starts = tl.load(offsets_ptr + sessions, mask=s_ok, other=0)
    lengths = tl.load(offsets_ptr + sessions + 1, mask=s_ok, other=0) - starts
    return sessions, s_ok, starts, lengths


@triton.jit
def _theme_column(matrix, ks, k):
    """Column k of a [BLOCK_S, BLOCK_K] matrix, as [BLOCK_S]."""
    return tl.sum(tl.where(ks[None, :] == k, matrix, 0.0), axis=1)


@triton.jit
def _with_theme_score(scores, unit, protos_ptr, k, ks, cols, col_ok, dim):
    """scores with column k set to unit . c_k."""
    c_k = tl.load(protos_ptr + k * dim + cols, mask=col_ok, other=0.0)
    return tl.where(ks[None, :] == k, tl.sum(unit * c_k[None, :], axis=1)[:, None], scores)


@triton.jit
def _route_scores(pooled, protos_ptr, cols, col_ok, dim, num_themes, inv_temperature, eps,
                  BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """cos(pooled, c_k) / temperature [BLOCK_S, BLOCK_K] fp32, -inf past K."""
    h = pooled.to(tl.float32)
    unit = h / tl.maximum(tl.sqrt(tl.sum(h * h, axis=1)), eps)[:, None]
    ks = tl.arange(0, BLOCK_K)
    scores = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    # Unrolled up to 8 themes (bf16, d = 128, K = 8: 96 registers against 104 as a loop); a loop
    # over the K themes above (K = 64: 147 registers against 187 unrolled, and 5x faster to compile).
    if BLOCK_K <= 8:
        for k in tl.static_range(BLOCK_K):
            if k < num_themes:
                scores = _with_theme_score(scores, unit, protos_ptr, k, ks, cols, col_ok, dim)
    else:
        for k in range(0, num_themes):
            scores = _with_theme_score(scores, unit, protos_ptr, k, ks, cols, col_ok, dim)
    return tl.where(ks[None, :] < num_themes, scores * inv_temperature, float("-inf"))


@triton.jit
def _pool_route_fwd(values_ptr, offsets_ptr, protos_ptr, pooled_ptr, scores_ptr, probs_ptr, themes_ptr, gate_ptr,
                    num_sessions, dim, num_themes, inv_temperature, eps,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TOP_K: tl.constexpr,
                    ROUTE: tl.constexpr, STAGES: tl.constexpr):
    dim, num_themes = tl.cast(dim, tl.int64), tl.cast(num_themes, tl.int64)
    sessions, s_ok, starts, lengths = _block_sessions(tl.program_id(0), offsets_ptr, num_sessions, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j in tl.range(0, tl.max(lengths, axis=0), num_stages=STAGES):
        # The address is rebuilt every step: a [BLOCK_S, BLOCK_D] tensor of pointers kept across
        # the loop would hold two registers per element.
        x = tl.load(values_ptr + ((starts + j) * dim)[:, None] + cols[None, :],
                    mask=(j < lengths)[:, None] & col_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
    pooled = (acc / tl.maximum(lengths.to(tl.float32), 1.0)[:, None]).to(pooled_ptr.dtype.element_ty)
    tl.store(pooled_ptr + sessions[:, None] * dim + cols[None, :], pooled, mask=s_ok[:, None] & col_ok[None, :])
    if ROUTE:
        # Route on the stored (rounded) mean, exactly what the reference routes on.
        scores = _route_scores(pooled, protos_ptr, cols, col_ok, dim, num_themes, inv_temperature, eps,
                               BLOCK_S, BLOCK_K)
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < num_themes
        e = tl.where(k_ok[None, :], tl.exp(scores - tl.max(scores, axis=1)[:, None]), 0.0)
        probs = e / tl.sum(e, axis=1)[:, None]
        out_mask = s_ok[:, None] & k_ok[None, :]
        tl.store(scores_ptr + sessions[:, None] * num_themes + ks[None, :], scores, mask=out_mask)
        tl.store(probs_ptr + sessions[:, None] * num_themes + ks[None, :], probs, mask=out_mask)
        # Top-k by repeated argmax; ties go to the lower theme index, as in the reference. The
        # straight-through gate is 1 in the forward pass; its gradient is added in the backward.
        remaining = scores
        one = tl.full([BLOCK_S], 1.0, dtype=tl.float32).to(gate_ptr.dtype.element_ty)
        for j in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=1)
            tl.store(themes_ptr + sessions * TOP_K + j, best.to(tl.int64), mask=s_ok)
            tl.store(gate_ptr + sessions * TOP_K + j, one, mask=s_ok)
            remaining = tl.where(ks[None, :] == best[:, None], float("-inf"), remaining)


@triton.jit
def _route_backward(g_scores_ptr, g_probs_ptr, g_gate_ptr, probs_ptr, themes_ptr, protos_ptr, pooled_ptr,
                    g_protos_ptr, program, sessions, s_ok, cols, col_ok, dim, num_themes, inv_temperature, eps,
                    BLOCK_K: tl.constexpr, TOP_K: tl.constexpr):
    """The routing's gradient of the pooled rows [BLOCK_S, BLOCK_D] fp32; stores this program's
    share of the prototypes' gradient, sum over its sessions of g_cos[s, k] * unit[s], at
    g_protos_ptr[program] ([K, d] fp32)."""
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < num_themes
    k_mask = s_ok[:, None] & k_ok[None, :]
    k_offs = sessions[:, None] * num_themes + ks[None, :]
    p = tl.load(probs_ptr + k_offs, mask=k_mask, other=0.0)
    g_p = tl.load(g_probs_ptr + k_offs, mask=k_mask, other=0.0)
    for j in tl.static_range(TOP_K):   # the gate: d gate / d p = 1 at each chosen theme
        chosen = tl.load(themes_ptr + sessions * TOP_K + j, mask=s_ok, other=-1)
        g_gate = tl.load(g_gate_ptr + sessions * TOP_K + j, mask=s_ok, other=0.0).to(tl.float32)
        g_p += tl.where(ks[None, :] == chosen[:, None], g_gate[:, None], 0.0)
    g_s = tl.load(g_scores_ptr + k_offs, mask=k_mask, other=0.0)
    g_cos = (g_s + p * (g_p - tl.sum(p * g_p, axis=1)[:, None])) * inv_temperature   # softmax backward
    tile_mask = s_ok[:, None] & col_ok[None, :]
    h = tl.load(pooled_ptr + sessions[:, None] * dim + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(h * h, axis=1))[:, None]
    unit = h / tl.maximum(norm, eps)
    g_unit = tl.zeros_like(unit)
    partials = g_protos_ptr + program.to(tl.int64) * num_themes * dim
    # A loop, not unrolled: bf16, d = 128 takes 96 registers at K = 8 and 123 at K = 64 (unrolled:
    # 115 and 243).
    for k in range(0, num_themes):
        g_k = _theme_column(g_cos, ks, k)
        c_k = tl.load(protos_ptr + k * dim + cols, mask=col_ok, other=0.0)
        g_unit += g_k[:, None] * c_k[None, :]
        tl.store(partials + k * dim + cols, tl.sum(g_k[:, None] * unit, axis=0), mask=col_ok)
    # Backward of h / max(|h|, eps): project out the radial part, unless clamped by eps.
    radial = tl.sum(unit * g_unit, axis=1)[:, None]
    return tl.where(norm > eps, (g_unit - unit * radial) / tl.maximum(norm, eps), g_unit / eps)


@triton.jit
def _pool_route_bwd(g_pooled_ptr, pooled_ptr, g_scores_ptr, g_probs_ptr, g_gate_ptr, probs_ptr, themes_ptr,
                    protos_ptr, offsets_ptr, g_values_ptr, g_protos_ptr, num_sessions, dim, num_themes,
                    inv_temperature, eps, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                    TOP_K: tl.constexpr, ROUTE: tl.constexpr):
    dim, num_themes = tl.cast(dim, tl.int64), tl.cast(num_themes, tl.int64)
    program = tl.program_id(0)
    sessions, s_ok, starts, lengths = _block_sessions(program, offsets_ptr, num_sessions, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    g_h = tl.load(g_pooled_ptr + sessions[:, None] * dim + cols[None, :], mask=s_ok[:, None] & col_ok[None, :],
                  other=0.0).to(tl.float32)
    if ROUTE:
        g_h += _route_backward(g_scores_ptr, g_probs_ptr, g_gate_ptr, probs_ptr, themes_ptr, protos_ptr, pooled_ptr,
                               g_protos_ptr, program, sessions, s_ok, cols, col_ok, dim, num_themes,
                               inv_temperature, eps, BLOCK_K, TOP_K)
    # An empty session has no rows to take its gradient, which may be huge (a zero mean hits the
    # eps branch): zeroed, so that it does not overflow a half-precision cast on its way nowhere.
    count = lengths.to(tl.float32)[:, None]
    g_row = tl.where(count > 0, g_h / tl.maximum(count, 1.0), 0.0).to(g_values_ptr.dtype.element_ty)
    for j in tl.range(0, tl.max(lengths, axis=0)):   # the padded walk of the forward, storing
        tl.store(g_values_ptr + ((starts + j) * dim)[:, None] + cols[None, :], g_row,
                 mask=(j < lengths)[:, None] & col_ok[None, :])


# Launch parameters, chosen by the compiled numbers (ptxas, sm_90a): at bf16, d = 128, the forward
# takes 96 registers with 32 sessions per program at K = 8 (5 programs per SM); the backward holds
# four fp32 [BLOCK_S, BLOCK_D] tiles (pooled row, unit row, its gradient, the gradient taken back):
# 32 sessions take 165 registers at K = 8 and spill at fp32, d = 256, K = 64; 16 take 96.
NUM_WARPS = 4
NUM_STAGES = 3
# Held by the sm_90 compile check (tools/compile_check.py) over every configuration `pool_route_blocks`
# launches, as resident warps per SM: the forward keeps 3 programs (12 warps) at its heaviest
# (fp32 rows, K = 64 routed, top-8), 5 or more at K <= 8 in 16 bits; the backward keeps 2 at
# top-8 (its K-wide softmax and gate tiles), 4 or more at top-1.
MIN_WARPS_PER_SM = {"_pool_route_fwd": 12, "_pool_route_bwd": 8}


def pool_route_blocks(dim: int, num_themes: int, backward: bool = False) -> dict:
    """The constexpr block sizes a launch uses for width `dim` and K = `num_themes` (0: pool only)."""
    block_d = max(triton.next_power_of_2(dim), 16)     # 16: the smallest block tools/compile_configs.py lists
    # An fp32 [BLOCK_S, BLOCK_D] tile takes BLOCK_S * BLOCK_D / 128 registers per thread (4 warps).
    block_s = (4096 if not backward else 2048) // max(block_d, 128)
    if dim % 16 and not backward:
        # Rows not known to be 16-byte aligned load without cp.async, so the pipelined steps wait
        # in registers: bf16, d = 128 would take 242 registers at 32 sessions, 128 at 16.
        block_s //= 2
    return {"BLOCK_S": block_s, "BLOCK_D": block_d, "BLOCK_K": max(triton.next_power_of_2(max(num_themes, 1)), 2)}


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
        blocks = pool_route_blocks(dim, num_themes)
        _pool_route_fwd[(triton.cdiv(num_sessions, blocks["BLOCK_S"]),)](
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
    programs = triton.cdiv(num_sessions, blocks["BLOCK_S"])
    g_values = new_output(values.shape, dtype=values.dtype, device=values.device)
    # One fp32 [K, d] share of the prototypes' gradient per program, added in one fixed order
    # below: the same bits on every run, no atomics. Its cost, written once and read once, is
    # 8 K d / BLOCK_S bytes per session, against ~10 d for a GEMM over fp32 unit rows of the
    # pooled means: less at few themes (K = 8, d = 128: 512 against ~1300 bytes), more from
    # K ~ 1.25 BLOCK_S on (K = 64, d = 256: 16 KB per session).
    g_protos = new_output((programs, num_themes, dim), dtype=torch.float32, device=values.device)
    if num_sessions:
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
