"""`selective_scan`: the discretised selective state-space scan of Mamba (Gu and Dao, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces", 2023, Algorithm 2 with a diagonal A),
over the rows of each jagged segment, read out through C:

    h_t[d, s] = exp(delta_t[d] A[d, s]) h_{t-1}[d, s] + delta_t[d] u_t[d] B_t[s]     h = 0 before a segment
    y_t[d]    = sum_s h_t[d, s] C_t[s]

Segments are expert-major (the encoder protocol's layout, `mos.encoder_protocol`): E experts
share the G segments, G / E each in turn, and segment g uses its expert's A[g // (G / E)].

Reference: plain PyTorch, the decay and drive [N, D, S] materialised and scanned by
`linear_recurrence`'s reference (its chunked scan), then contracted with C; autograd
differentiates it. Triton (`selective_scan_kernels`): one program per (segment, block of
channels) walks its segment in chunks of CHUNK rows with the [D, S] state in fp32 registers, an
associative scan inside each chunk: the forward writes no state but each chunk's entering one
([chunks, D, S], 1/CHUNK of them; none when autograd will not differentiate it: inference writes
y only), from which the backward recomputes the chunk's states and
runs the adjoint scan back: lambda_t = y'_t C_t + exp(delta_{t+1} A) lambda_{t+1};
grad u_t = (sum_s lambda_t B_t) delta_t, grad B_t = sum_d lambda_t delta_t u_t,
grad C_t = sum_d h_t y'_t, X_t = lambda_t exp(delta_t A) h_{t-1},
grad delta_t = sum_s X_t A + (sum_s lambda_t B_t) u_t, grad A = sum_t X_t delta_t. The sums
over channels (grad B, grad C) are written per channel block ([D / BLOCK_D, N, S] fp32: the
backward's one tensor that grows with D) and those over an expert's segments (grad A) per
segment, then added on the host: no atomics, deterministic.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from ._alloc import new_output
from ._launch import cdiv, next_power_of_2
from ._layout import kernel_op
from .backend import resolve_backend
from .checks import FLOAT_DTYPES, check_finite, check_offsets, check_tensor, reads_data
from .jagged import expert_offsets as jagged_expert_offsets, positions_in_segment, segment_ids
from . import linear_recurrence as _registers_linear_recurrence_reference  # noqa: F401

CHUNK = 8           # rows per associative scan of the Triton kernels (a power of two)
MAX_STATE = 64      # the Triton kernels hold all of a channel's S state elements in one tile


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   segment_offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """y [N, D] in u's dtype (module docstring) from u, delta [N, D], A [E, D, S], B, C [N, S]
    (one floating dtype) and segment_offsets [G+1] int64 over the N rows, G a multiple of E;
    fp16/bf16 accumulate in fp32 (float64 stays float64 on the reference). An empty segment
    gives no rows, a segment's first row starts from h = 0 (its decay is not read); backend
    "triton" takes S <= 64 ("auto" runs a larger S on the reference).
    Raises ValueError / TypeError naming the argument: shapes, dtypes, devices, offsets, the
    number of segments, NaN/inf (a data check)."""
    check_tensor("u", u, ndim=2, dtypes=FLOAT_DTYPES)
    num_rows, dim = u.shape
    check_tensor("A", A, ndim=3, dtypes=(u.dtype,), device=u.device)
    if A.shape[1] != dim or A.shape[0] < 1 or A.shape[2] < 1:
        raise ValueError(f"A: expected [E, {dim}, S] with E, S >= 1 (u has {dim} channels), got {tuple(A.shape)}")
    state = A.shape[2]
    for name, value, shape in (("delta", delta, (num_rows, dim)), ("B", B, (num_rows, state)),
                               ("C", C, (num_rows, state))):
        check_tensor(name, value, ndim=2, dtypes=(u.dtype,), device=u.device)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (u is {tuple(u.shape)}, A {tuple(A.shape)}), "
                             f"got {tuple(value.shape)}")
    check_offsets("segment_offsets", segment_offsets, total=num_rows, device=u.device)
    num_segments, num_experts = segment_offsets.numel() - 1, A.shape[0]
    if num_segments % num_experts:
        raise ValueError(f"segment_offsets: expected a multiple of A's {num_experts} experts of segments, "
                         f"got {num_segments}")
    for name, value in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_finite(name, value)
    if reads_data():
        _check_decay(delta, A, segment_offsets)
    chosen = resolve_backend(backend, u, "selective_scan")
    if chosen == "triton" and state > MAX_STATE:
        if backend != "auto":
            raise ValueError(f"A: expected at most {MAX_STATE} state elements for backend 'triton', got {state}")
        chosen = "reference"            # "auto": the backend that can run it
    if chosen == "triton":
        # The chunks' entering states are for the backward alone: a forward that autograd will
        # not differentiate (inference, evaluation) writes y only.
        store_entering = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
        return torch.ops.mos.selective_scan(u, delta, A, B, C, segment_offsets, store_entering)[0]
    return _reference(u, delta, A, B, C, segment_offsets)


def _check_decay(delta: torch.Tensor, A: torch.Tensor, segment_offsets: torch.Tensor) -> None:
    """exp(delta_t A) must be finite wherever it is read (not at a segment's first row): an inf
    decay makes the states inf and the gradients NaN. Linear in delta, so per expert and channel
    the largest exponent is at the rows' largest or smallest delta: [E, D] reductions, no
    [N, D, S] tensor."""
    num_rows, dim = delta.shape
    if not num_rows:
        return
    acc = torch.promote_types(delta.dtype, torch.float32)
    first = positions_in_segment(segment_offsets, num_rows, check=False) == 0
    read = delta.to(acc).masked_fill(first[:, None], 0)          # 0: exp(0) = 1, no bound from first rows
    expert = segment_ids(jagged_expert_offsets(segment_offsets, A.shape[0]), num_rows, check=False)[:, None].expand(-1, dim)
    zeros = read.new_zeros(A.shape[:2])
    largest = zeros.scatter_reduce(0, expert, read, "amax")
    smallest = zeros.scatter_reduce(0, expert, read, "amin")
    a = A.to(acc)
    exponent = torch.maximum(largest[:, :, None] * a, smallest[:, :, None] * a)
    limit = math.log(torch.finfo(acc).max)
    if bool((exponent > limit).any()):
        e, d, s = (int(i) for i in (exponent > limit).nonzero()[0])
        raise ValueError(f"delta: expected exp(delta * A) finite (the state's decay; {limit:.4g} at most in "
                         f"{str(acc).replace('torch.', '')}), got delta * A[{e}, {d}, {s}] up to "
                         f"{float(exponent[e, d, s]):.4g}")


def _reference(u, delta, A, B, C, segment_offsets):
    # In fp32 at least, rounded once at the end as the kernels do (float64 stays float64).
    dtype = u.dtype
    acc = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (x.to(acc) for x in (u, delta, A, B, C))
    num_experts = A.shape[0]
    # One expert broadcasts its A over the rows: no [N, D, S] gather, and a sum, not a scatter, back.
    if num_experts == 1:
        a = A[0]
    else:
        a = A[segment_ids(jagged_expert_offsets(segment_offsets, num_experts), u.shape[0], check=False)]
    # A segment's first row reads no decay (h = drive there): its step is zeroed first, so that
    # an exp that overflows there sends no inf * 0 into the backward.
    first = positions_in_segment(segment_offsets, u.shape[0], check=False) == 0
    decay = torch.exp(delta.masked_fill(first[:, None], 0)[:, :, None] * a)         # [N, D, S]
    drive = torch.einsum("nd,ns->nds", delta * u, B)
    # The recurrence's reference op itself: its public checks would scan [N, D, S] twice more.
    states = torch.ops.mos.linear_recurrence_reference(decay, drive, segment_offsets)
    return torch.einsum("nds,ns->nd", states, C).to(dtype)


# ----------------------------------------------------------------------------- Triton

def scan_blocks(state: int, backward: bool) -> Tuple[int, int, int]:
    """(BLOCK_D, BLOCK_S, num_warps) of the Triton kernels: all of S (padded to a power of two)
    and as many channels as keep a row of the tiles at 256 values (64 in the backward, whose
    two scans and three decays keep about ten tiles live), at most 16 (4), on 8 warps: the
    choices of ptxas's register counts for sm_90 (tools/compile_check --resources) that spill
    nothing and keep the most warps resident."""
    block_s = next_power_of_2(state)
    block_d = max(1, min(4, 64 // block_s) if backward else min(16, 256 // block_s))
    return block_d, block_s, 8


@kernel_op("mos::selective_scan")
def _selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       segment_offsets: torch.Tensor, store_entering: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [N, D] in u's dtype, the state entering each chunk [chunks, D, S] fp32 for the backward;
    [0, D, S] without store_entering, and then no backward)."""
    num_rows, dim = u.shape
    num_segments, state = segment_offsets.numel() - 1, A.shape[2]
    y = new_output((num_rows, dim), dtype=u.dtype, device=u.device)
    chunks = _chunk_bound(num_rows, num_segments) if store_entering else 0
    entering = torch.empty((chunks, dim, state), dtype=torch.float32, device=u.device)
    if num_rows and num_segments:
        from .selective_scan_kernels import _selective_scan_fwd   # triton only where a kernel launches

        chunk_offsets = _first_chunks(segment_offsets)
        block_d, block_s, num_warps = scan_blocks(state, backward=False)
        _selective_scan_fwd[(num_segments * cdiv(dim, block_d),)](
            u, delta, A, B, C, segment_offsets, chunk_offsets, y, entering, dim, state,
            num_segments // A.shape[0], CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_S=block_s, STORE_ENTERING=store_entering,
            num_warps=num_warps)
    return y, entering


def _chunk_bound(num_rows, num_segments):
    """At least sum_g ceil(n_g / CHUNK), known without reading the offsets (no sync): the forward
    writes that many entering states, the backward reads only those. Ints or SymInts."""
    return (num_rows + num_segments * (CHUNK - 1)) // CHUNK


def _first_chunks(segment_offsets: torch.Tensor) -> torch.Tensor:
    """The index of each segment's first chunk [G] int64 (chunks of CHUNK rows, a segment's last
    one partial)."""
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    return torch.cumsum((lengths + CHUNK - 1) // CHUNK, 0) - (lengths + CHUNK - 1) // CHUNK


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, segment_offsets, store_entering):
    num_rows, dim = u.shape
    chunks = _chunk_bound(num_rows, segment_offsets.shape[0] - 1) if store_entering else 0
    return u.new_empty((num_rows, dim)), u.new_empty((chunks, dim, A.shape[2]), dtype=torch.float32)


@kernel_op("mos::selective_scan_backward")
def _selective_scan_backward_op(g_y: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                                B: torch.Tensor, C: torch.Tensor, segment_offsets: torch.Tensor,
                                entering: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """(grad u, grad delta [N, D] in u's dtype, grad A [E, D, S], grad B, grad C [N, S] in A's, B's
    and C's dtype)."""
    num_rows, dim = u.shape
    num_segments, (num_experts, _, state) = segment_offsets.numel() - 1, A.shape
    g_u = new_output((num_rows, dim), dtype=u.dtype, device=u.device)
    g_delta = new_output((num_rows, dim), dtype=u.dtype, device=u.device)
    block_d, block_s, num_warps = scan_blocks(state, backward=True)
    blocks = cdiv(dim, block_d)
    # Per channel block (B's and C's) and per segment (A's) partial sums, each element written by
    # one program, added here in a fixed order.
    g_b = new_output((blocks, num_rows, state), dtype=torch.float32, device=u.device)
    g_c = new_output((blocks, num_rows, state), dtype=torch.float32, device=u.device)
    g_a = new_output((num_segments, dim, state), dtype=torch.float32, device=u.device)
    if num_rows and num_segments:
        from .selective_scan_kernels import _selective_scan_bwd

        _selective_scan_bwd[(num_segments * blocks,)](
            g_y, u, delta, A, B, C, segment_offsets, _first_chunks(segment_offsets), entering,
            g_u, g_delta, g_a, g_b, g_c, num_rows, dim, state, num_segments // num_experts,
            CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=num_warps)
    else:
        g_a.zero_()                     # segments without rows: nothing launched, A still gets its zeros
    g_a = g_a.view(num_experts, -1, dim, state).sum(1) if num_segments else g_a.new_zeros(A.shape)
    return g_u, g_delta, g_a.to(A.dtype), g_b.sum(0).to(B.dtype), g_c.sum(0).to(C.dtype)


@_selective_scan_backward_op.register_fake
def _(g_y, u, delta, A, B, C, segment_offsets, entering):
    return u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape), B.new_empty(B.shape), C.new_empty(C.shape)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, segment_offsets, ctx.stored_entering = inputs
    ctx.save_for_backward(u, delta, A, B, C, segment_offsets, output[1])


def _backward(ctx, g_y, _g_entering):
    u, delta, A, B, C, segment_offsets, entering = ctx.saved_tensors
    if not ctx.stored_entering:
        raise RuntimeError("mos::selective_scan: differentiated after a forward with store_entering=False, which "
                           "kept no states to recompute from (mos_kernels.selective_scan sets it when autograd "
                           "will need it)")
    grads = torch.ops.mos.selective_scan_backward(g_y.contiguous(), u, delta, A, B, C, segment_offsets, entering)
    return (*grads, None, None)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- FLOPs

# What the counter sees of the reference, so that both backends count alike: the scan's
# multiply-add (2 N D S) and the readout's contraction with C (2 N D S) forward; the adjoint scan
# (3 N D S: a multiply-add and grad a) and the contraction's two gradients (4 N D S) backward.
# The elementwise decay and drive count nothing, as every elementwise op.
@register_flop_formula(torch.ops.mos.selective_scan, get_raw=True)
def _flops(u, delta, A, B, C, segment_offsets, *args, out_val=None, **kwargs):
    return 4 * u.shape[0] * u.shape[1] * A.shape[2]


@register_flop_formula(torch.ops.mos.selective_scan_backward, get_raw=True)
def _backward_flops(g_y, u, delta, A, B, C, *args, out_val=None, **kwargs):
    return 7 * u.shape[0] * u.shape[1] * A.shape[2]
