"""The Triton kernels of `session_pool_route`: `_pool_route_fwd` (one program per block of
sessions; it also writes the straight-through gate) and `_pool_route_bwd` (it also gives the
prototypes' gradient, one fp32 share per program)."""
from __future__ import annotations

import triton
import triton.language as tl


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


# Held by the sm_90 compile check (tools/compile_check.py) over every configuration `pool_route_blocks`
# launches, as resident warps per SM: the forward keeps 3 programs (12 warps) at its heaviest
# (fp32 rows, K = 64 routed, top-8), 5 or more at K <= 8 in 16 bits; the backward keeps 2 at
# top-8 (its K-wide softmax and gate tiles), 4 or more at top-1.
MIN_WARPS_PER_SM = {"_pool_route_fwd": 12, "_pool_route_bwd": 8}
