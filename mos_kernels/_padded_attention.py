"""Masked dense attention over the segments of a jagged layout, grouped by length: the
reference path of `jagged_self_attention`, forward and backward.

Segments are padded only to the length of their bucket, not to the longest segment of the
layout. The bucket lengths are the integers whose binary form has at most three significant
bits (1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...), so a segment is padded by less than a
quarter of its length, and 1,000-row segments fall into ~36 buckets. Why it matters: the theme
experts see K*B segments of about L/K rows each; padded to the longest (about L) they would
cost K dense passes instead of about one.

Buckets need the segment lengths on the host. On the CPU reading the offsets back costs
nothing; on other devices (and under torch.compile) the layout is one bucket padded to
`max_len`, so no synchronisation is added.

The backward is written out (the flash-attention algebra on the padded tiles: dV = P^T dO,
dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T Q * scale), because the
reference is a custom op whose implementation runs below autograd.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from .checks import reads_data


def bucket_length(lengths: torch.Tensor) -> torch.Tensor:
    """The bucket (padded) length of each length: rounded up to three significant bits."""
    lengths = lengths.to(torch.int64)
    bits = torch.where(lengths > 0, torch.floor(torch.log2(lengths.clamp_min(1).double())).to(torch.int64) + 1, 0)
    step = torch.pow(2, (bits - 3).clamp_min(0))
    return (lengths + step - 1) // step * step


def one_bucket_here(segment_offsets: torch.Tensor) -> bool:
    """Whether the layout is padded as one bucket: off the CPU and under torch.compile."""
    return segment_offsets.device.type != "cpu" or torch.compiler.is_compiling()


def _buckets(segment_offsets: torch.Tensor, max_len: Optional[int],
             one_bucket: Optional[bool]) -> Iterator[Tuple[torch.Tensor, int]]:
    """(segment ids, padded length) of every bucket; together they cover every non-empty segment
    once (every segment, empty ones included, in the one-bucket layout)."""
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    if max_len is not None and reads_data() and lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(f"max_len: expected at least the longest segment ({int(lengths.max())}), got {max_len}")
    if one_bucket_here(segment_offsets) if one_bucket is None else one_bucket:
        if max_len is None:
            raise ValueError("max_len: expected a bound on the longest segment off the CPU, got None")
        if max_len > 0:
            yield torch.arange(lengths.numel(), device=lengths.device), max_len
        return
    padded = bucket_length(lengths)
    for length in torch.unique(padded[lengths > 0]).tolist():
        yield torch.nonzero(padded == length).flatten(), int(length)


def _tile(segment_offsets: torch.Tensor, segments: torch.Tensor, length: int):
    """Row index [G_b, P] of each padded position (row 0 where padding) and its mask [G_b, P]."""
    starts = segment_offsets[segments]
    lengths = segment_offsets[segments + 1] - starts
    pos = torch.arange(length, device=segment_offsets.device)
    valid = pos[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + pos[None, :], 0), valid


def _heads(x: torch.Tensor, index: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """x [N, d] read at index [G, P] -> [G, H, P, dh] in dtype."""
    g, p = index.shape
    return x[index.flatten()].view(g, p, num_heads, -1).transpose(1, 2).to(dtype)


def _probs(qh, kh, valid, causal, scale):
    """Softmax over allowed keys [G, H, P, P]. Every non-empty segment's key 0 is allowed for
    every query row, padded rows included; rows of empty segments (the one-bucket layout) are
    all -inf and become zeros."""
    scores = qh @ kh.transpose(-1, -2) * scale
    allowed = valid[:, None, None, :]
    if causal:
        pos = torch.arange(valid.shape[1], device=valid.device)
        allowed = allowed & (pos[None, :] <= pos[:, None])
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)


def _rows(padded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[G, H, P, dh] -> the valid positions' rows [n, d] (row-major over (segment, position))."""
    g, h, p, dh = padded.shape
    return padded.transpose(1, 2).reshape(g, p, h * dh)[valid]


def padded_attention_forward(q, k, v, segment_offsets, num_heads: int, max_len: Optional[int],
                             causal: bool, one_bucket: Optional[bool] = None) -> torch.Tensor:
    """[N, d] in v's dtype: per head softmax(q k^T / sqrt(dh)) v inside each segment; the
    probabilities are computed in fp32 at least and rounded to v's dtype for the product.
    one_bucket: pad every segment to max_len (default: `one_bucket_here`)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[1] // num_heads)
    out = v.new_zeros(q.shape)
    for segments, length in _buckets(segment_offsets, max_len, one_bucket):
        index, valid = _tile(segment_offsets, segments, length)
        probs = _probs(_heads(q, index, num_heads, acc), _heads(k, index, num_heads, acc), valid, causal, scale)
        out[index[valid]] = _rows(probs.to(v.dtype) @ _heads(v, index, num_heads, v.dtype), valid)
    return out


def padded_attention_backward(g_out, q, k, v, segment_offsets, num_heads: int, max_len: Optional[int],
                              causal: bool, one_bucket: Optional[bool] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `padded_attention_forward` for q, k, v (their dtypes), computed in fp32 at least."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[1] // num_heads)
    g_q, g_k, g_v = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for segments, length in _buckets(segment_offsets, max_len, one_bucket):
        index, valid = _tile(segment_offsets, segments, length)
        qh, kh, vh = (_heads(x, index, num_heads, acc) for x in (q, k, v))
        # Padded query rows get a zero output gradient, so they add nothing below.
        g_oh = _heads(g_out, index, num_heads, acc) * valid[:, None, :, None]
        probs = _probs(qh, kh, valid, causal, scale)
        g_probs = g_oh @ vh.transpose(-1, -2)
        g_scores = probs * (g_probs - (g_probs * probs).sum(-1, keepdim=True))
        rows = index[valid]
        g_q[rows] = _rows(g_scores @ kh * scale, valid).to(q.dtype)
        g_k[rows] = _rows(g_scores.transpose(-1, -2) @ qh * scale, valid).to(k.dtype)
        g_v[rows] = _rows(probs.transpose(-1, -2) @ g_oh, valid).to(v.dtype)
    return g_q, g_k, g_v
