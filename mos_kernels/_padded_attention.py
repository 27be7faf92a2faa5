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

On the CPU each bucket runs torch's fused flash attention for the CPU (the aten ops behind
`F.scaled_dot_product_attention`, forward and backward: blocked, no P x P matrix in memory; the
work is split by (segment, head) and query block, never by thread count, so it repeats bitwise).
It runs in fp32 at least, as the dense path computes its probabilities (in bf16/fp16 the kernel
would round P and each block's gradient share to the input dtype). Causal attention needs no
mask: padding is on the right, so a real row's keys j <= i are all real. Measured: 9.8x the
dense path over the same buckets on one core, forward + backward at L ~ 1000, B = 64, d = 32
(`benchmarks/bench_cpu_layer.py`). Elsewhere (and with q, k, v of different dtypes, or a torch
without these ops) the dense path below computes the same thing.

Padded positions are zeros, whatever row they were gathered from, so an extreme value in one
row cannot reach another segment through them.

The forward returns each row's log-sum-exp beside its output, as the kernels do, so that the
CPU flash backward rebuilds the probabilities from them (P = exp(S - lse)) instead of running the
forward again (which cost about a tenth of a transformer training step on the CPU). The dense
backward is written out (the flash-attention algebra on the padded tiles: dV = P^T dO,
dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T Q * scale), because the
reference is a custom op whose implementation runs below autograd; it recomputes P exactly.
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


def _heads(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, num_heads: int,
           dtype: torch.dtype) -> torch.Tensor:
    """x [N, d] read at index [G, P] -> [G, H, P, dh] in dtype, zero at the padded positions."""
    g, p = index.shape
    rows = torch.where(valid.flatten()[:, None], x[index.flatten()], 0)
    return rows.view(g, p, num_heads, -1).transpose(1, 2).to(dtype)


def _scores(qh, kh, valid, causal, scale):
    """Scores [G, H, P, P], -inf at keys a row may not attend. Every non-empty segment's key 0 is
    allowed for every query row, padded rows included; rows of empty segments (the one-bucket
    layout) are all -inf."""
    scores = qh @ kh.transpose(-1, -2) * scale
    allowed = valid[:, None, None, :]
    if causal:
        pos = torch.arange(valid.shape[1], device=valid.device)
        allowed = allowed & (pos[None, :] <= pos[:, None])
    return scores.masked_fill(~allowed, -math.inf)


def _probs(qh, kh, valid, causal, scale):
    """Softmax over allowed keys [G, H, P, P]; the all -inf rows of empty segments become zeros."""
    return torch.softmax(_scores(qh, kh, valid, causal, scale), dim=-1).nan_to_num(0.0)


def _rows(padded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[G, H, P, dh] -> the valid positions' rows [n, d] (row-major over (segment, position))."""
    g, h, p, dh = padded.shape
    return padded.transpose(1, 2).reshape(g, p, h * dh)[valid]


def _lse_rows(lse: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[G, H, P] -> the valid positions' rows [n, H]."""
    return lse.transpose(1, 2)[valid]


def _lse_heads(lse: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """lse [N, H] read at index [G, P] -> [G, H, P]; +inf at the padded positions, so that their
    probabilities exp(S - lse) are 0 (their output gradient is 0 too: 0 and not inf * 0)."""
    rows = torch.where(valid[..., None], lse[index], math.inf)
    return rows.transpose(1, 2).contiguous()


_FLASH_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def _cpu_flash(q, k, v) -> bool:
    """Whether torch's CPU flash attention runs the buckets: CPU tensors of one dtype, and a torch
    that has the ops (private aten ops; tests/ops/test_jagged_self_attention.py pins their schemas)."""
    return (q.device.type == "cpu" and k.dtype == q.dtype and v.dtype == q.dtype
            and all(hasattr(torch.ops.aten, op) for op in _FLASH_OPS))


def _key_mask(valid: torch.Tensor, causal: bool, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The additive mask [G, 1, 1, P] of the padded keys; None when causal (a real row never
    reaches them; padded rows' outputs are dropped)."""
    if causal:
        return None
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, -math.inf)[:, None, None, :]


def _flash(qh, kh, vh, valid, causal: bool, scale: float):
    """(output [G, H, P, dh], logsumexp [G, H, P]) of torch's CPU flash attention."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qh, kh, vh, 0.0, causal, attn_mask=_key_mask(valid, causal, qh.dtype), scale=scale)


def padded_attention_forward(q, k, v, segment_offsets, num_heads: int, max_len: Optional[int],
                             causal: bool, one_bucket: Optional[bool] = None,
                             flash: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [N, d] in v's dtype, lse [N, H] in fp32 at least): per head softmax(q k^T / sqrt(dh)) v
    inside each segment, and each row's log-sum-exp of its scores over the keys it attends (what
    the backward rebuilds the probabilities from). The probabilities are computed in fp32 at
    least (the dense path rounds them to v's dtype for the product; the CPU flash path
    accumulates in fp32). one_bucket: pad every segment to max_len (default: `one_bucket_here`).
    flash: torch's CPU flash attention (True) or the dense path (False); default: flash where it
    runs (`_cpu_flash`)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[1] // num_heads)
    out = v.new_zeros(q.shape)
    lse = q.new_zeros((q.shape[0], num_heads), dtype=acc)
    flash = _cpu_flash(q, k, v) if flash is None else flash
    for segments, length in _buckets(segment_offsets, max_len, one_bucket):
        index, valid = _tile(segment_offsets, segments, length)
        if flash:
            heads, lse_heads = _flash(*(_heads(x, index, valid, num_heads, acc) for x in (q, k, v)), valid,
                                         causal, scale)
        else:
            scores = _scores(_heads(q, index, valid, num_heads, acc), _heads(k, index, valid, num_heads, acc), valid,
                             causal, scale)
            lse_heads = torch.logsumexp(scores, dim=-1)
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            heads = probs.to(v.dtype) @ _heads(v, index, valid, num_heads, v.dtype)
        rows = index[valid]
        out[rows] = _rows(heads, valid).to(v.dtype)
        lse[rows] = _lse_rows(lse_heads, valid).to(acc)
    return out, lse


def padded_attention_backward(g_out, q, k, v, out, lse, segment_offsets, num_heads: int, max_len: Optional[int],
                              causal: bool, one_bucket: Optional[bool] = None, flash: Optional[bool] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `padded_attention_forward` for q, k, v (their dtypes), computed in fp32 at
    least from its out and lse (the CPU flash path; the dense path recomputes the probabilities);
    one_bucket and flash as there. In fp16/bf16 the flash path's row term rowsum(dO * O) reads the
    output as rounded to v's dtype, as the kernels' does."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[1] // num_heads)
    g_q, g_k, g_v = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    flash = _cpu_flash(q, k, v) if flash is None else flash
    for segments, length in _buckets(segment_offsets, max_len, one_bucket):
        index, valid = _tile(segment_offsets, segments, length)
        rows = index[valid]
        qh, kh, vh = (_heads(x, index, valid, num_heads, acc) for x in (q, k, v))
        # Padded query rows get a zero output gradient, so they add nothing.
        g_oh = _heads(g_out, index, valid, num_heads, acc)
        if flash:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g_oh, qh, kh, vh, _heads(out, index, valid, num_heads, acc), _lse_heads(lse.to(acc), index, valid),
                0.0, causal, attn_mask=_key_mask(valid, causal, acc), scale=scale)
            for grad, heads in zip((g_q, g_k, g_v), grads):
                grad[rows] = _rows(heads, valid).to(grad.dtype)
            continue
        probs = _probs(qh, kh, valid, causal, scale)
        g_probs = g_oh @ vh.transpose(-1, -2)
        g_scores = probs * (g_probs - (g_probs * probs).sum(-1, keepdim=True))
        g_q[rows] = _rows(g_scores @ kh * scale, valid).to(q.dtype)
        g_k[rows] = _rows(g_scores.transpose(-1, -2) @ qh * scale, valid).to(k.dtype)
        g_v[rows] = _rows(probs.transpose(-1, -2) @ g_oh, valid).to(v.dtype)
    return g_q, g_k, g_v
