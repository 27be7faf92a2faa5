"""The Triton kernels of `jagged_self_attention` and their launch rule (`attention_tiles`).

Flash attention over jagged segments. Work is listed as tiles of BLOCK rows of one
segment (`jagged.segment_blocks`: ceil(N / BLOCK) + G tiles, known without a sync, the spare ones
idle), one program per (tile, head); BLOCK, warps and pipeline depth follow the bucket of the
longest segment and the head width (`attention_tiles`), and causal query tiles run last first.
`_self_attention_fwd` streams the key blocks of its segment (up to its last row when causal)
with an online softmax and stores the output and the log-sum-exp; the backward recomputes the
probabilities from it: `_self_attention_bwd_kv`, one program per key tile, sums dK and dV over
the query blocks that see it, `_self_attention_bwd_q`, one program per query tile, sums dQ over
its key blocks. Every sum is in a fixed order: no atomics, deterministic.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_helpers import segment_bounds


# ----------------------------------------------------------------------------- Triton kernels
#
# Scores are scale * q.k in fp32; p is rounded to the values' dtype for the p @ v product (the
# flash-attention recipe). A query row always sees the first key of its segment, so the running
# max is finite after the first key block and no inf - inf arises; rows past the segment's end
# are masked out of every store and every backward sum. Index arithmetic is 64-bit (rows come
# from the int64 tile starts, the head is widened): a row index times a stride passes 2^31 once
# an operand holds more than 2^31 elements.

@triton.jit
def _work_tile(pid, num_programs, LAST_FIRST: tl.constexpr):
    """The work tile of program `pid`; LAST_FIRST takes the tiles in reverse order (causal: a
    segment's later query tiles see more keys, so they start first and the tail balances)."""
    tile = pid
    if LAST_FIRST:
        tile = num_programs - 1 - pid
    return tile


@triton.jit
def _head_columns(head, head_dim, BLOCK_DH: tl.constexpr):
    """(the head's columns of a [N, d] row, which of the BLOCK_DH of them are real)."""
    return head * head_dim + tl.arange(0, BLOCK_DH), tl.arange(0, BLOCK_DH) < head_dim


@triton.jit
def _load_head(ptr, rows, row_ok, stride, dcols, d_ok):
    """[rows, the head's columns] of a row-major operand, zeros past the segment and head_dim."""
    return tl.load(ptr + rows[:, None] * stride + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _visible(allowed, rows, keys, CAUSAL: tl.constexpr):
    """`allowed`, and when causal only keys at or before the query row."""
    if CAUSAL:
        allowed = allowed & (keys[None, :] <= rows[:, None])
    return allowed


@triton.jit
def _self_attention_fwd(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tile_segment_ptr, tile_start_ptr, offsets_ptr,
                        num_segments, num_heads, head_dim, stride_q, stride_k, stride_v, stride_out, scale,
                        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    tile = _work_tile(tl.program_id(0), tl.num_programs(0), CAUSAL)
    head = tl.program_id(1).to(tl.int64)    # 64-bit index arithmetic (see above)
    segment = tl.load(tile_segment_ptr + tile)
    if segment < num_segments:
        seg_start, seg_end = segment_bounds(offsets_ptr, segment)
        rows = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
        row_ok = rows < seg_end
        dcols, d_ok = _head_columns(head, head_dim, BLOCK_DH)
        q = _load_head(q_ptr, rows, row_ok, stride_q, dcols, d_ok)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DH], dtype=tl.float32)
        hi = seg_end
        if CAUSAL:
            hi = tl.minimum(tl.load(tile_start_ptr + tile) + BLOCK_M, seg_end)
        for k0 in range(seg_start, hi, BLOCK_N):
            keys = k0 + tl.arange(0, BLOCK_N)
            key_ok = keys < seg_end
            k = _load_head(k_ptr, keys, key_ok, stride_k, dcols, d_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(_visible(key_ok[None, :], rows, keys, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            v = _load_head(v_ptr, keys, key_ok, stride_v, dcols, d_ok)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / denom[:, None]
        tl.store(out_ptr + rows[:, None] * stride_out + dcols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + rows * num_heads + head, m + tl.log(denom), mask=row_ok)


@triton.jit
def _self_attention_bwd_kv(q_ptr, k_ptr, v_ptr, g_out_ptr, lse_ptr, delta_ptr, g_k_ptr, g_v_ptr, tile_segment_ptr,
                           tile_start_ptr, offsets_ptr, num_segments, num_heads, head_dim, stride_q, stride_k,
                           stride_v, scale,
                           CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)    # 64-bit index arithmetic (see above)
    segment = tl.load(tile_segment_ptr + tile)
    if segment < num_segments:
        seg_end = tl.load(offsets_ptr + segment + 1)
        k_start = tl.load(tile_start_ptr + tile)
        keys = k_start + tl.arange(0, BLOCK_N)
        key_ok = keys < seg_end
        dcols, d_ok = _head_columns(head, head_dim, BLOCK_DH)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = _load_head(k_ptr, keys, key_ok, stride_k, dcols, d_ok)
        v = _load_head(v_ptr, keys, key_ok, stride_v, dcols, d_ok)
        g_k = tl.zeros([BLOCK_N, BLOCK_DH], dtype=tl.float32)
        g_v = tl.zeros([BLOCK_N, BLOCK_DH], dtype=tl.float32)
        lo = tl.load(offsets_ptr + segment)
        if CAUSAL:
            lo = k_start            # earlier rows do not see these keys
        for q0 in range(lo, seg_end, BLOCK_M):
            rows = q0 + tl.arange(0, BLOCK_M)
            row_ok = rows < seg_end
            q = _load_head(q_ptr, rows, row_ok, stride_q, dcols, d_ok)
            g_o = tl.load(g_out_ptr + rows[:, None] * num_heads * head_dim + dcols[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + rows * num_heads + head, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + rows * num_heads + head, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale          # [BLOCK_M, BLOCK_N]
            allowed = _visible(row_ok[:, None] & key_ok[None, :], rows, keys, CAUSAL)
            p = tl.exp(tl.where(allowed, s - lse[:, None], float("-inf")))
            g_v += tl.dot(tl.trans(p.to(g_o.dtype)), g_o, input_precision=PRECISION)
            dp = tl.dot(g_o, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * scale
            g_k += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(g_k_ptr + keys[:, None] * num_heads * head_dim + dcols[None, :], g_k.to(g_k_ptr.dtype.element_ty),
                 mask=kv_mask)
        tl.store(g_v_ptr + keys[:, None] * num_heads * head_dim + dcols[None, :], g_v.to(g_v_ptr.dtype.element_ty),
                 mask=kv_mask)


@triton.jit
def _self_attention_bwd_q(q_ptr, k_ptr, v_ptr, g_out_ptr, lse_ptr, delta_ptr, g_q_ptr, tile_segment_ptr,
                          tile_start_ptr, offsets_ptr, num_segments, num_heads, head_dim, stride_q, stride_k,
                          stride_v, scale,
                          CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    tile = _work_tile(tl.program_id(0), tl.num_programs(0), CAUSAL)
    head = tl.program_id(1).to(tl.int64)    # 64-bit index arithmetic (see above)
    segment = tl.load(tile_segment_ptr + tile)
    if segment < num_segments:
        seg_start, seg_end = segment_bounds(offsets_ptr, segment)
        q_start = tl.load(tile_start_ptr + tile)
        rows = q_start + tl.arange(0, BLOCK_M)
        row_ok = rows < seg_end
        dcols, d_ok = _head_columns(head, head_dim, BLOCK_DH)
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = _load_head(q_ptr, rows, row_ok, stride_q, dcols, d_ok)
        g_o = tl.load(g_out_ptr + rows[:, None] * num_heads * head_dim + dcols[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + rows * num_heads + head, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows * num_heads + head, mask=row_ok, other=0.0)
        g_q = tl.zeros([BLOCK_M, BLOCK_DH], dtype=tl.float32)
        hi = seg_end
        if CAUSAL:
            hi = tl.minimum(q_start + BLOCK_M, seg_end)
        for k0 in range(seg_start, hi, BLOCK_N):
            keys = k0 + tl.arange(0, BLOCK_N)
            key_ok = keys < seg_end
            k = _load_head(k_ptr, keys, key_ok, stride_k, dcols, d_ok)
            v = _load_head(v_ptr, keys, key_ok, stride_v, dcols, d_ok)
            allowed = _visible(row_ok[:, None] & key_ok[None, :], rows, keys, CAUSAL)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.exp(tl.where(allowed, s - lse[:, None], float("-inf")))
            dp = tl.dot(g_o, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * scale
            g_q += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(g_q_ptr + rows[:, None] * num_heads * head_dim + dcols[None, :], g_q.to(g_q_ptr.dtype.element_ty),
                 mask=q_mask)


LONGEST_BUCKETS = (16, 32, 64)   # the segment-length bounds the tiles depend on; 0: unknown or longer


def longest_bucket(max_len: Optional[int]) -> int:
    """max_len (a bound on the longest segment, None when unknown) as the smallest bucket that
    holds it, 0 for unknown or longer: all the kernels' tiles depend on."""
    if max_len is None:
        return 0
    return next((bucket for bucket in LONGEST_BUCKETS if max_len <= bucket), 0)


# Held by the sm_90 compile check (tools/compile_check.py) over every configuration `attention_tiles`
# launches: at least 8 resident warps per SM, and no spill except for fp32 heads wider than 64,
# where even 16-row tiles of three TF32 products do not fit in registers (correct, slower; the
# layer's heads are 16 to 64 wide).
MIN_WARPS_PER_SM = {"_self_attention_fwd": 8, "_self_attention_bwd_kv": 8, "_self_attention_bwd_q": 8}
SPILLS_ALLOWED = {
    ("_self_attention_fwd", "fp32", 256): "756 B",
    ("_self_attention_bwd_kv", "fp32", 128): "368 B",
    ("_self_attention_bwd_kv", "fp32", 256): "21428 B",
    ("_self_attention_bwd_q", "fp32", 128): "24 B",
    ("_self_attention_bwd_q", "fp32", 256): "852 B",
}


def attention_tiles(longest: int, head_dim: int, dtype: torch.dtype) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_DH, num_warps, num_stages) of the three kernels.

    longest: `longest_bucket` of the segments. Segments of at most 16 or 32 rows get tiles of
    that many rows, so a tile is not mostly masked. Longer ones get 64-row tiles, 32 for heads
    wider than 64 and 16 above 128, so the backward's [BLOCK, BLOCK_DH] fp32 tiles stay in
    registers. fp32 dots run as three TF32 products with about twice the registers and shared
    memory: 16-row tiles and 2 pipeline stages (32-row tiles spill in `_self_attention_bwd_kv`
    from head_dim 32). 16-row tiles run on 2 warps, 4 for the widest heads (4-warp programs
    hold half the registers a thread). A deterministic rule (no autotuning): the same inputs
    always launch the same programs."""
    fp32 = dtype == torch.float32
    block_dh = max(triton.next_power_of_2(head_dim), 16)
    block = 16 if fp32 else 64 if block_dh <= 64 else 32 if block_dh <= 128 else 16
    if longest:
        block = min(block, max(longest, 16))
    wide = block_dh >= (64 if fp32 else 256)
    return block, block, block_dh, 4 if block >= 32 or wide else 2, 2 if fp32 else 3
