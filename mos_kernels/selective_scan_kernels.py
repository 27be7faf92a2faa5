"""The Triton kernels of `selective_scan`: `_selective_scan_fwd` and `_selective_scan_bwd`, one
program per (segment, block of BLOCK_D channels) on one flat grid axis. A program walks its
segment in chunks of CHUNK rows (forward from the first, backward from the last) and keeps the
[BLOCK_D, BLOCK_S] state in fp32 registers; within a chunk the recurrence is an associative scan
over [CHUNK, BLOCK_D, BLOCK_S] tiles. Row-major [N, D] and [N, S] operands, A [E, D, S]; every
row index is int64 (loaded from the int64 offsets), so no address wraps past 2^31 elements."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine(a1, b1, a2, b2):
    # The affine step h -> a h + b of element 1, then element 2's. In a reverse scan the
    # interpreter and the compiler pass the later rows' accumulation first, so the same
    # function composes lambda_t = b_t + a_t lambda_{t+1}.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _rows(ptr, rows, row_ok, cols, col_ok, width):
    # A [len(rows), len(cols)] tile of a row-major [*, width] tensor in fp32 (0 where masked).
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _program(pid, offsets_ptr, a_ptr, dim, state, segments_per_expert, BLOCK_D: tl.constexpr,
             BLOCK_S: tl.constexpr):
    # The program's segment, rows [start, end), channel block and its columns, and its expert's A.
    blocks = tl.cdiv(dim, BLOCK_D)
    pid = pid.to(tl.int64)
    segment = pid // blocks
    block = pid % blocks
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    s = tl.arange(0, BLOCK_S)
    state_at = cols[:, None] * state + s[None, :]
    state_ok = (cols < dim)[:, None] & (s < state)[None, :]
    # Padded channels and state elements read A = 0 (decay 1) and zero drive: their state stays 0.
    a = tl.load(a_ptr + (segment // segments_per_expert) * dim * state + state_at, mask=state_ok, other=0.0)
    return segment, block, start, end, cols, s, state_at, state_ok, a.to(tl.float32)


@triton.jit
def _selective_scan_fwd(u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, offsets_ptr, first_chunk_ptr, y_ptr, entering_ptr,
                        dim, state, segments_per_expert, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_S: tl.constexpr, STORE_ENTERING: tl.constexpr):
    segment, block, start, end, cols, s, state_at, state_ok, a = _program(
        tl.program_id(0), offsets_ptr, a_ptr, dim, state, segments_per_expert, BLOCK_D, BLOCK_S)
    col_ok, s_ok = cols < dim, s < state
    first_chunk = tl.load(first_chunk_ptr + segment)
    idx = tl.arange(0, CHUNK)
    h = tl.zeros([BLOCK_D, BLOCK_S], dtype=tl.float32)
    for c in range(0, tl.cdiv(end - start, CHUNK)):
        rows = start + c * CHUNK + idx
        ok = rows < end
        if STORE_ENTERING:      # only for a backward: without one y is the only write
            tl.store(entering_ptr + (first_chunk + c) * dim * state + state_at, h, mask=state_ok)
        dt = _rows(delta_ptr, rows, ok, cols, col_ok, dim)
        decay = tl.exp(dt[:, :, None] * a[None, :, :])
        drive = (dt * _rows(u_ptr, rows, ok, cols, col_ok, dim))[:, :, None] * _rows(b_ptr, rows, ok, s, s_ok,
                                                                                     state)[:, None, :]
        # The carried state enters at the chunk's first row; a segment's first row is its drive
        # whatever its decay (a selected-away inf * 0 stays out).
        drive += tl.where((idx == 0)[:, None, None] & (c > 0), decay * h[None, :, :], 0.0)
        _, hs = tl.associative_scan((decay, drive), 0, _combine)
        y = tl.sum(hs * _rows(c_ptr, rows, ok, s, s_ok, state)[:, None, :], axis=2)
        tl.store(y_ptr + rows[:, None] * dim + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & col_ok[None, :])
        # Rows past the segment's end have decay 1 and drive 0: the last row holds the last state.
        h = tl.sum(tl.where((idx == CHUNK - 1)[:, None, None], hs, 0.0), axis=0)


@triton.jit
def _selective_scan_bwd(g_y_ptr, u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, offsets_ptr, first_chunk_ptr, entering_ptr,
                        g_u_ptr, g_delta_ptr, g_a_ptr, g_b_ptr, g_c_ptr, num_rows, dim, state, segments_per_expert,
                        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    segment, block, start, end, cols, s, state_at, state_ok, a = _program(
        tl.program_id(0), offsets_ptr, a_ptr, dim, state, segments_per_expert, BLOCK_D, BLOCK_S)
    col_ok, s_ok = cols < dim, s < state
    first_chunk = tl.load(first_chunk_ptr + segment)
    idx = tl.arange(0, CHUNK)
    g_a = tl.zeros([BLOCK_D, BLOCK_S], dtype=tl.float32)
    lam_after = tl.zeros([BLOCK_D, BLOCK_S], dtype=tl.float32)     # lambda at the next chunk's first row
    num_chunks = tl.cdiv(end - start, CHUNK)
    for step in range(0, num_chunks):
        c = num_chunks - 1 - step
        rows = start + c * CHUNK + idx
        ok = rows < end
        dt = _rows(delta_ptr, rows, ok, cols, col_ok, dim)
        uu = _rows(u_ptr, rows, ok, cols, col_ok, dim)
        bb = _rows(b_ptr, rows, ok, s, s_ok, state)
        g_y = _rows(g_y_ptr, rows, ok, cols, col_ok, dim)
        decay = tl.exp(dt[:, :, None] * a[None, :, :])
        dtu = dt * uu
        drive = dtu[:, :, None] * bb[:, None, :]
        # h_{t-1} for every row: the scan of the rows one earlier, seeded at the chunk's first row
        # with the state the forward kept there (0 at a segment's first chunk).
        before = ok & (rows > start)
        dt_before = _rows(delta_ptr, rows - 1, before, cols, col_ok, dim)
        drive_before = (dt_before * _rows(u_ptr, rows - 1, before, cols, col_ok, dim))[:, :, None] * \
            _rows(b_ptr, rows - 1, before, s, s_ok, state)[:, None, :]
        entering = tl.load(entering_ptr + (first_chunk + c) * dim * state + state_at, mask=state_ok, other=0.0)
        drive_before = tl.where((idx == 0)[:, None, None], entering[None, :, :], drive_before)
        # The segment's first row has no decay (h = drive there): 0, not an overflowed exp times h = 0.
        decay_before = tl.where((rows - 1 > start)[:, None, None], tl.exp(dt_before[:, :, None] * a[None, :, :]), 0.0)
        _, h_prev = tl.associative_scan((decay_before, drive_before), 0, _combine)
        first = (rows == start)[:, None, None]
        h = tl.where(first, drive, decay * h_prev + drive)
        # lambda_t = y'_t C_t + a_{t+1} lambda_{t+1}, a_{t+1} = 0 past the segment's last row.
        after = (rows + 1) < end
        decay_after = tl.where(after[:, None, None],
                               tl.exp(_rows(delta_ptr, rows + 1, after, cols, col_ok, dim)[:, :, None] * a[None, :, :]),
                               0.0)
        cc = _rows(c_ptr, rows, ok, s, s_ok, state)
        g_h = g_y[:, :, None] * cc[:, None, :]
        g_h += tl.where((idx == CHUNK - 1)[:, None, None], decay_after * lam_after[None, :, :], 0.0)
        _, lam = tl.associative_scan((decay_after, g_h), 0, _combine, reverse=True)
        lam_after = tl.sum(tl.where((idx == 0)[:, None, None], lam, 0.0), axis=0)
        # This block's share of grad B and grad C (sums over its channels).
        bs_at = block * num_rows * state + rows[:, None] * state + s[None, :]
        bs_ok = ok[:, None] & s_ok[None, :]
        tl.store(g_c_ptr + bs_at, tl.sum(h * g_y[:, :, None], axis=1), mask=bs_ok)
        tl.store(g_b_ptr + bs_at, tl.sum(lam * dtu[:, :, None], axis=1), mask=bs_ok)
        # Through the decay (0 at a segment's first row, which reads no h_{t-1}) and the drive.
        x = tl.where(first, 0.0, lam * decay * h_prev)
        g_dtu = tl.sum(lam * bb[:, None, :], axis=2)
        rd_at = rows[:, None] * dim + cols[None, :]
        rd_ok = ok[:, None] & col_ok[None, :]
        tl.store(g_delta_ptr + rd_at, (tl.sum(x * a[None, :, :], axis=2) + g_dtu * uu).to(g_delta_ptr.dtype.element_ty),
                 mask=rd_ok)
        tl.store(g_u_ptr + rd_at, (g_dtu * dt).to(g_u_ptr.dtype.element_ty), mask=rd_ok)
        g_a += tl.sum(x * dt[:, :, None], axis=0)
    tl.store(g_a_ptr + segment * dim * state + state_at, g_a, mask=state_ok)


# The backward keeps about ten [CHUNK, BLOCK_D, BLOCK_S] tiles live (the decays of a row, the one
# before and the one after, two scans' operands and results, the gradient terms): 90-128
# registers a thread where S <= 16 (two programs of 8 warps an SM), 138-142 where S is 32 or 64
# (one program: 8 warps), for every tile size ptxas was given.
MIN_WARPS_PER_SM = {"_selective_scan_fwd": 16, "_selective_scan_bwd": 8}
