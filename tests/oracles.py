"""Loop oracles: a second, obviously correct implementation of every mos_kernels op.

Each one is written as plain Python loops over examples, sessions, segments, experts and heads,
straight from the ops' docstrings (what each computes, the jagged layout), with no vectorised index tricks, so a
bug in the vectorised reference (or in a kernel) cannot be copied here. They are slow on
purpose and meant for the small awkward shapes of the tests. Float ops use ordinary autograd,
so gradients of the oracle are the oracle of the gradients. Offsets and indices come and go as
CPU int64 tensors; float outputs keep the inputs' dtype and device.

The last section builds the random inputs that the op and layer tests share, and holds their
common set-up fixture.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def lengths_of(offsets: torch.Tensor) -> List[int]:
    o = [int(x) for x in offsets]
    return [o[i + 1] - o[i] for i in range(len(o) - 1)]


def offsets_of(lengths: Sequence[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int64)


# ---- Step 1: sessions -------------------------------------------------------------------------

def sessionize(offsets: torch.Tensor, *, mode: str = "fixed", session_len: int = 8,
               timestamps: Optional[torch.Tensor] = None, gap_seconds: float = 1800.0,
               max_session_len: int = 64):
    """-> (session_offsets [S+1], session_example [S], example_session_offsets [B+1])."""
    o = [int(x) for x in offsets]
    times = None if timestamps is None else [float(t) for t in timestamps]
    bounds, example, per_example = [], [], []
    for b in range(len(o) - 1):
        start, end = o[b], o[b + 1]
        sessions = []
        if mode == "fixed":
            # Cut from the newest item backwards, so the newest session is full.
            hi = end
            while hi > start:
                lo = max(start, hi - session_len)
                sessions.insert(0, (lo, hi))
                hi = lo
        else:
            gap_sessions = []
            for t in range(start, end):
                if t == start or times[t] - times[t - 1] > gap_seconds:
                    gap_sessions.append([t, t + 1])
                else:
                    gap_sessions[-1][1] = t + 1
            for lo, hi in gap_sessions:
                for chunk in range(lo, hi, max_session_len):
                    sessions.append((chunk, min(chunk + max_session_len, hi)))
        for lo, hi in sessions:
            bounds.append(lo)
            example.append(b)
        per_example.append(len(sessions))
    session_offsets = torch.tensor(bounds + [o[-1]], dtype=torch.int64)
    return session_offsets, torch.tensor(example, dtype=torch.int64), offsets_of(per_example)


# ---- Step 2: session pooling ------------------------------------------------------------------

def session_pool(values: torch.Tensor, session_offsets: torch.Tensor) -> torch.Tensor:
    """Mean of every session's rows; an empty session pools to zeros."""
    o = [int(x) for x in session_offsets]
    out = []
    for s in range(len(o) - 1):
        acc = values.new_zeros(values.shape[1])
        for t in range(o[s], o[s + 1]):
            acc = acc + values[t]
        out.append(acc / max(o[s + 1] - o[s], 1))
    return torch.stack(out) if out else values.new_zeros((0, values.shape[1]))


# ---- Step 3: routing --------------------------------------------------------------------------

def _unit(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    norm = torch.linalg.vector_norm(x)  # subgradient 0 at x = 0, like F.normalize
    return x / torch.clamp(norm, min=eps)


def route(pooled: torch.Tensor, prototypes: torch.Tensor, *, temperature: float, top_k: int):
    """-> (themes [S, top_k] best first, gate [S, top_k], probs [S, K], scores [S, K]).

    z_{s,k} = cos(h_s, c_k) / temperature; p_s = softmax(z_s); the gate is 1 in the forward
    pass and carries dp/dz backwards (1 + p - stopgrad(p), written so the forward is exactly 1).
    """
    num_themes = prototypes.shape[0]
    units = [_unit(prototypes[k]) for k in range(num_themes)]
    themes, gates, probs, scores = [], [], [], []
    for s in range(pooled.shape[0]):
        h = _unit(pooled[s])
        z = torch.stack([(h * units[k]).sum() / temperature for k in range(num_themes)])
        p = torch.exp(z - z.max().detach())
        p = p / p.sum()
        ranked = sorted(range(num_themes), key=lambda k: (-float(z[k].detach()), k))[:top_k]
        themes.append(ranked)
        gates.append(torch.stack([1.0 + (p[k] - p[k].detach()) for k in ranked]))
        probs.append(p)
        scores.append(z)
    if not themes:
        empty = pooled.new_zeros((0, num_themes))
        return torch.zeros((0, top_k), dtype=torch.int64), pooled.new_zeros((0, top_k)), empty, empty
    return torch.tensor(themes, dtype=torch.int64), torch.stack(gates), torch.stack(probs), torch.stack(scores)


# ---- Step 4: dispatch -------------------------------------------------------------------------

def theme_dispatch(themes: torch.Tensor, gate: torch.Tensor, session_offsets: torch.Tensor,
                   session_example: torch.Tensor, *, num_examples: int, num_themes: int,
                   max_theme_tokens: Optional[int] = None):
    """-> (gather_index [T'], row_gate [T'], theme_offsets [K*B+1], inverse_index [T, top_k]).

    Segment k*B + b: example b's tokens whose session chose theme k, in time order; with
    max_theme_tokens only the newest `max_theme_tokens` of them. inverse_index[t, j] is the row
    holding token t for its session's j-th choice, -1 if max_theme_tokens dropped it.
    """
    o = [int(x) for x in session_offsets]
    chosen = [[int(k) for k in row] for row in themes]
    owner = [int(b) for b in session_example]
    top_k = themes.shape[1]
    inverse = [[-1] * top_k for _ in range(o[-1])]
    index, row_gate, lengths = [], [], []
    for k in range(num_themes):
        for b in range(num_examples):
            rows = []
            for s in range(len(owner)):
                if owner[s] != b or k not in chosen[s]:
                    continue
                j = chosen[s].index(k)
                for t in range(o[s], o[s + 1]):
                    rows.append((t, j, gate[s, j]))
            if max_theme_tokens is not None:
                rows = rows[max(len(rows) - max_theme_tokens, 0):]
            for t, j, g in rows:
                inverse[t][j] = len(index)
                index.append(t)
                row_gate.append(g)
            lengths.append(len(rows))
    gates = torch.stack(row_gate) if row_gate else gate.new_zeros(0)
    inverse_index = torch.tensor(inverse, dtype=torch.int64).view(o[-1], top_k)
    return torch.tensor(index, dtype=torch.int64), gates, offsets_of(lengths), inverse_index


def theme_gather(values: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor] = None):
    rows = []
    for r, t in enumerate(int(i) for i in gather_index):
        rows.append(values[t] if row_gate is None else values[t] * row_gate[r])
    return torch.stack(rows) if rows else values.new_zeros((0, values.shape[1]))


def theme_scatter(rows: torch.Tensor, gather_index: torch.Tensor, row_gate: Optional[torch.Tensor],
                  num_tokens: int):
    out = [rows.new_zeros(rows.shape[1]) for _ in range(num_tokens)]
    for r, t in enumerate(int(i) for i in gather_index):
        out[t] = out[t] + (rows[r] if row_gate is None else rows[r] * row_gate[r])
    return torch.stack(out) if out else rows.new_zeros((0, rows.shape[1]))


# ---- Step 5: experts --------------------------------------------------------------------------

def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   expert_offsets: torch.Tensor) -> torch.Tensor:
    """Rows of expert e's block times weight[e] (+ bias[e]), one expert at a time."""
    o = [int(v) for v in expert_offsets]
    out = []
    for e in range(weight.shape[0]):
        for r in range(o[e], o[e + 1]):
            y = x[r] @ weight[e]
            out.append(y if bias is None else y + bias[e])
    return torch.stack(out) if out else x.new_zeros((0, weight.shape[2]))


def _softmax(z: torch.Tensor) -> torch.Tensor:
    p = torch.exp(z - z.max().detach())
    return p / p.sum()


def expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, segment_offsets, *,
                            num_heads: int, gather_index=None, row_gate=None) -> torch.Tensor:
    """Segment g = e*B + b: heads of query[g] attend over expert e's projections of its rows."""
    num_experts = w_key.shape[0]
    num_segments, dim = query.shape
    num_examples = num_segments // num_experts
    head_dim = dim // num_heads
    rows = tokens if gather_index is None else theme_gather(tokens, gather_index, row_gate)
    o = [int(v) for v in segment_offsets]
    out = []
    for g in range(num_segments):
        e = g // num_examples
        seg = rows[o[g]:o[g + 1]]
        if seg.shape[0] == 0:
            out.append(query.new_zeros(dim))
            continue
        keys = seg @ w_key[e] + (0 if b_key is None else b_key[e])
        vals = seg @ w_value[e] + (0 if b_value is None else b_value[e])
        heads = []
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            p = _softmax(keys[:, cols] @ query[g, cols] / math.sqrt(head_dim))
            heads.append(p @ vals[:, cols])
        out.append(torch.cat(heads))
    return torch.stack(out) if out else query.new_zeros((0, dim))


def jagged_self_attention(q, k, v, segment_offsets, *, num_heads: int, causal: bool = True) -> torch.Tensor:
    """Row i of a segment attends (per head) to the rows j of the same segment, j <= i if causal."""
    dim = q.shape[1]
    head_dim = dim // num_heads
    o = [int(x) for x in segment_offsets]
    out = []
    for g in range(len(o) - 1):
        for i in range(o[g], o[g + 1]):
            last = i + 1 if causal else o[g + 1]
            heads = []
            for h in range(num_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                p = _softmax(k[o[g]:last, cols] @ q[i, cols] / math.sqrt(head_dim))
                heads.append(p @ v[o[g]:last, cols])
            out.append(torch.cat(heads))
    return torch.stack(out) if out else q.new_zeros((0, dim))


def jagged_attention_logsumexp(q, k, segment_offsets, *, num_heads: int, causal: bool = True) -> torch.Tensor:
    """[N, H]: per row and head, log sum_j exp(q_i . k_j / sqrt(dh)) over the keys the row attends."""
    head_dim = q.shape[1] // num_heads
    o = [int(x) for x in segment_offsets]
    out = q.new_zeros((q.shape[0], num_heads))
    for g in range(len(o) - 1):
        for i in range(o[g], o[g + 1]):
            last = i + 1 if causal else o[g + 1]
            for h in range(num_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                out[i, h] = torch.logsumexp(k[o[g]:last, cols] @ q[i, cols] / math.sqrt(head_dim), dim=0)
    return out


def sdim(rows, target, segment_offsets, hyperplanes, w_value, b_value, w_out, b_out, *, rounds: int, bits: int,
         eps: float = 1e-12) -> torch.Tensor:
    """SDIM by loops: per expert e and example b, per round r, the rows whose `bits` signs
    [x . h_{e,r,i} > 0] all equal the target's; u_r = the sum of their values W_v x + b_v over
    its norm (0 if none); out = mean_r u_r @ W_o + b_o, zeros for an empty segment. [E, B, d]."""
    num_experts, dim = hyperplanes.shape[0], rows.shape[1]
    num_examples = target.shape[0]
    o = [int(x) for x in segment_offsets]
    out = rows.new_zeros((num_experts, num_examples, dim))
    for e in range(num_experts):
        for b in range(num_examples):
            first, last = o[e * num_examples + b], o[e * num_examples + b + 1]
            if last == first:
                continue
            pooled = rows.new_zeros(dim)
            for r in range(rounds):
                planes = hyperplanes[e][:, r * bits:(r + 1) * bits]
                target_signs = [bool(target[b] @ planes[:, i] > 0) for i in range(bits)]
                total = rows.new_zeros(dim)
                for j in range(first, last):
                    if [bool(rows[j] @ planes[:, i] > 0) for i in range(bits)] == target_signs:
                        total = total + rows[j] @ w_value[e] + b_value[e]
                pooled = pooled + total / total.norm().clamp_min(eps)
            out[e, b] = pooled / rounds @ w_out[e] + b_out[e]
    return out


def linear_recurrence(a, b, segment_offsets):
    """h_t = a_t * h_{t-1} + b_t row by row inside each segment, h = b at a segment's first row."""
    o = [int(x) for x in segment_offsets]
    out = []
    for g in range(len(o) - 1):
        h = None
        for t in range(o[g], o[g + 1]):
            h = b[t] if h is None else a[t] * h + b[t]
            out.append(h)
    return torch.stack(out) if out else b.new_zeros(b.shape)


def selective_scan(u, delta, A, B, C, segment_offsets):
    """y_t = h_t C_t with h_t = exp(delta_t A_e) h_{t-1} + (delta_t u_t) B_t^T row by row inside
    each segment (h = 0 before it), segment g using A[g // (G / E)]: Mamba's recurrence as written."""
    o = [int(x) for x in segment_offsets]
    per_expert = max(1, (len(o) - 1) // A.shape[0])
    out = []
    for g in range(len(o) - 1):
        h = u.new_zeros(A.shape[1:])
        for t in range(o[g], o[g + 1]):
            h = torch.exp(delta[t][:, None] * A[g // per_expert]) * h + (delta[t] * u[t])[:, None] * B[t][None, :]
            out.append(h @ C[t])
    return torch.stack(out) if out else u.new_zeros(u.shape)


def mamba_block(block, rows, segment_offsets, num_experts: int):
    """One Mamba4Rec block (mos/mamba4rec.py) by loops over segments and time, in rows' dtype,
    reading the block's parameters (cast to it): the selective scan one step at a time."""
    import torch.nn.functional as F
    from mos.mamba4rec import CONV_WIDTH
    p = {name: t.to(rows.dtype) for name, t in block.named_parameters()}
    o = [int(x) for x in segment_offsets]
    num_examples = (len(o) - 1) // num_experts
    inner, rank, state = block.inner, block.rank, block.state
    out = []
    for g in range(len(o) - 1):
        e, x = g // num_examples, rows[o[g]:o[g + 1]]
        if x.shape[0] == 0:
            continue
        h = F.layer_norm(x, (x.shape[1],)) * p["ln1_weight"][e] + p["ln1_bias"][e]
        u, z = (h @ p["w_in"][e]).split(inner, dim=1)
        conv = []
        for t in range(x.shape[0]):
            c = p["conv_bias"][e]
            for lag in range(CONV_WIDTH):
                if t - lag >= 0:
                    c = c + u[t - lag] * p["conv_weight"][e, :, CONV_WIDTH - 1 - lag]
            conv.append(c)
        u = F.silu(torch.stack(conv))
        r, b_in, c_out = (u @ p["w_x"][e]).split([rank, state, state], dim=1)
        delta = F.softplus(r @ p["w_dt"][e] + p["b_dt"][e])
        a_diag = -torch.exp(p["a_log"][e])
        s, ys = x.new_zeros((inner, state)), []
        for t in range(x.shape[0]):
            s = torch.exp(delta[t][:, None] * a_diag) * s + (delta[t] * u[t])[:, None] * b_in[t][None, :]
            ys.append(s @ c_out[t] + p["d_skip"][e] * u[t])
        x = x + (torch.stack(ys) * F.silu(z)) @ p["w_out"][e]
        h = F.layer_norm(x, (x.shape[1],)) * p["ln2_weight"][e] + p["ln2_bias"][e]
        out.append(x + F.gelu(h @ p["w_ff1"][e] + p["b_ff1"][e]) @ p["w_ff2"][e] + p["b_ff2"][e])
    return torch.cat(out) if out else rows.new_zeros(rows.shape)


# ---- Jagged helpers ---------------------------------------------------------------------------

def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0):
    o = [int(x) for x in offsets]
    out = values.new_full((len(o) - 1, max_len) + tuple(values.shape[1:]), padding_value)
    for g in range(len(o) - 1):
        for j, t in enumerate(range(o[g], o[g + 1])):
            out[g, j] = values[t]
    return out


def padded_to_jagged(padded: torch.Tensor, lengths: torch.Tensor):
    rows = [padded[g, j] for g in range(padded.shape[0]) for j in range(int(lengths[g]))]
    values = torch.stack(rows) if rows else padded.new_zeros((0,) + tuple(padded.shape[2:]))
    return values, offsets_of([int(n) for n in lengths])


# ---- Layer auxiliary losses -------------------------------------------------------------------

def aux_losses(pooled: torch.Tensor, prototypes: torch.Tensor, themes: torch.Tensor, probs: torch.Tensor):
    """Mean over sessions of |unit(h_s) - unit(c_{r_s})|^2 (commitment and codebook have the
    same value), and Switch load balance K * sum_k f_k * P_k, with f_k the share of routing
    choices that picked k and P_k the mean probability of k."""
    num_sessions, num_themes = probs.shape
    dist = 0.0
    for s in range(num_sessions):
        diff = _unit(pooled[s]) - _unit(prototypes[int(themes[s, 0])])
        dist += float((diff * diff).sum())
    vq = dist / max(num_sessions, 1)
    choices = [int(k) for k in themes.reshape(-1)]
    balance = 0.0
    for k in range(num_themes):
        share = choices.count(k) / max(len(choices), 1)
        mean_prob = sum(float(probs[s, k]) for s in range(num_sessions)) / max(num_sessions, 1)
        balance += share * mean_prob
    return vq, num_themes * balance


# ---- Random inputs shared by the tests --------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Fresh normal numbers drawn on the CPU (the same on every device), then moved."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def increasing_times(gen: torch.Generator, lengths: Sequence[int], gap_seconds: float) -> torch.Tensor:
    """[T] float64 times, non-decreasing inside each example, mixing repeats and steps below, at
    and above the gap; each example starts at its own random time (possibly before the previous
    example's last event)."""
    steps = [0.0, 1.0, gap_seconds, gap_seconds + 1.0, 5 * gap_seconds, 60.0]
    times = []
    for n in lengths:
        t = float(torch.randint(0, 10_000, (1,), generator=gen))
        for _ in range(n):
            t += steps[int(torch.randint(0, len(steps), (1,), generator=gen))]
            times.append(t)
    return torch.tensor(times, dtype=torch.float64)


def live_extras(layer, seed: int = 0):
    """Give a MoS layer's residual fusion nonzero weights for its other experts' term (zero at
    initialisation, where the output is the global expert's alone), as training does, so that
    a test comparing outputs or gradients also sees the short-term and theme experts."""
    out = getattr(layer, "extras_out", None)
    if out is not None:
        with torch.no_grad():
            out.weight.copy_(randn(generator(seed), *out.weight.shape, dtype=out.weight.dtype) / out.weight.shape[1] ** 0.5)
    if getattr(layer, "mass_value", None) is not None:       # theme_mass: zero at initialisation too
        with torch.no_grad():
            layer.mass_value.copy_(randn(generator(seed + 1), *layer.mass_value.shape, dtype=layer.mass_value.dtype))
            layer.mass_logit.fill_(0.5)
    if getattr(layer, "theme_recency_embedding", None) is not None:   # theme_recency: zero at initialisation too
        with torch.no_grad():
            table = layer.theme_recency_embedding
            table.copy_(randn(generator(seed + 1000), *table.shape, dtype=table.dtype))
    for index, module in enumerate(layer.modules()):           # attention_mass: zero at initialisation too
        if getattr(module, "w_mass", None) is not None:
            with torch.no_grad():
                module.w_mass.copy_(randn(generator(seed + 2 + index), *module.w_mass.shape, dtype=module.w_mass.dtype))
    return layer
