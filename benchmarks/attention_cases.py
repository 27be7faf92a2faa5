"""The inputs and the cases of the attention benchmarks (benchmarks/bench_attention.py).

Inputs: jagged histories of about L tokens (±50 %, every 64th one empty), B examples (B = 256 at
the target point L = 1000; B·L ≈ 256k elsewhere), d = 64, H = 2 heads, cut into sessions of 8
and routed by the reference `session_pool_route` to K = 8 themes (top-1) against random
prototypes; the dispatch is built once per case, so every provider sees the same one.

The floors of every case are written beside its builder; attention FLOPs are the jagged count
(sum over segments of L_g (L_g+1)/2 query-key pairs, 4·d FLOPs each forward, 10·d backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

import mos_kernels as mk
from benchmarks import attention_baselines as baselines
from benchmarks.harness import Case
from benchmarks.providers_fused import fuse_layer, fused_grouped_linear, fused_target_attention
from mos import MoSConfig, MoSLayer
from mos_kernels.jagged_self_attention import attention_pairs

TOKENS = 256_000
SESSION_LEN = 8
TEMPERATURE = 0.1
HEADS = 2
QKV_WIDTH = 3     # grouped_linear's d_out = QKV_WIDTH * d: the query-key-value projection


@dataclass(frozen=True)
class Shape:
    L: int              # mean history length
    d: int = 64
    K: int = 8
    B: int = 0          # examples; 0: TOKENS // L

    @property
    def examples(self) -> int:
        return self.B or max(TOKENS // self.L, 1)

    @property
    def columns(self) -> Dict[str, int]:
        return dict(B=self.examples, L=self.L, d=self.d, K=self.K)


# ----------------------------------------------------------------------------- inputs

@dataclass
class Batch:
    shape: Shape
    dtype: torch.dtype
    values: torch.Tensor          # [T, d]
    target: torch.Tensor          # [B, d]
    offsets: torch.Tensor         # [B+1]
    max_len: int                  # longest history
    sessions: mk.Sessions
    dispatch: mk.Dispatch
    max_segment: int              # longest theme subsequence

    @property
    def columns(self) -> Dict[str, int]:
        s, tokens = self.shape, self.values.shape[0]
        return dict(B=s.examples, L=s.L, T=tokens, S=self.sessions.num_sessions, rows=tokens, d=s.d, K=s.K, top_k=1)

    def randn(self, *shape, seed: int, scale: float = 1.0) -> torch.Tensor:
        gen = torch.Generator(device=self.values.device).manual_seed(seed)
        return (torch.randn(*shape, generator=gen, device=self.values.device) * scale).to(self.dtype)


def build_batch(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shape.L - shape.L // 2, shape.L + shape.L // 2 + 1, (shape.examples,), generator=gen)
    lengths[1::64] = 0
    offsets = mk.offsets_from_lengths(lengths).to(device)
    num_tokens = int(lengths.sum())
    device_gen = torch.Generator(device=device).manual_seed(seed)
    values = torch.randn(num_tokens, shape.d, generator=device_gen, device=device).to(dtype)
    target = torch.randn(shape.examples, shape.d, generator=device_gen, device=device).to(dtype)
    prototypes = torch.randn(shape.K, shape.d, generator=device_gen, device=device)
    sessions = mk.sessionize(offsets, session_len=SESSION_LEN, num_tokens=num_tokens)
    _, routing = mk.session_pool_route(values, sessions.session_offsets, prototypes, temperature=TEMPERATURE,
                                       backend="reference")
    dispatch = mk.theme_dispatch(routing.themes, routing.gate.detach(), sessions.session_offsets,
                                 sessions.session_example, num_examples=shape.examples, num_themes=shape.K,
                                 num_tokens=num_tokens, example_session_offsets=sessions.example_session_offsets,
                                 backend="reference")
    segment_lengths = dispatch.segment_lengths
    return Batch(shape, dtype, values, target, offsets, int(lengths.max()), sessions, dispatch,
                 int(segment_lengths.max()) if segment_lengths.numel() else 0)


# ----------------------------------------------------------------------------- cases
# Byte floors: T tokens, G = K·B segments, e bytes per element, int64 indices and offsets.

def expert_target_attention_case(batch: Batch) -> Case:
    c, dispatch = batch.columns, batch.dispatch
    tokens, d, num_themes = c["T"], c["d"], c["K"]
    segments = num_themes * c["B"]
    e = batch.values.element_size()
    inputs = (batch.values, batch.randn(segments, d, seed=1), batch.randn(num_themes, d, d, seed=2, scale=d ** -0.5),
              batch.randn(num_themes, d, seed=3), batch.randn(num_themes, d, d, seed=4, scale=d ** -0.5),
              batch.randn(num_themes, d, seed=5), dispatch.row_gate.detach().to(batch.dtype))

    def run(backend, tokens, query, w_key, b_key, w_value, b_value, gate):
        if backend == "fused":
            return (fused_target_attention(tokens, query, w_key, b_key, w_value, b_value, dispatch.theme_offsets,
                                           num_heads=HEADS, gather_index=dispatch.gather_index, row_gate=gate),)
        return (mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, dispatch.theme_offsets,
                                           num_heads=HEADS, gather_index=dispatch.gather_index, row_gate=gate,
                                           inverse_index=dispatch.inverse_index, backend=backend),)

    weights = 2 * num_themes * d * d * e + 2 * num_themes * d * e
    return Case(
        op="expert_target_attention", kernels=(), run=run, inputs=inputs, dtype=batch.dtype,
        shape=c,
        bytes={
            # read every gathered row T·d·e once, its index and gate T·(8+e), the offsets (G+1)·8,
            # the queries G·d·e and the weights; write G·d·e.
            "fwd": tokens * d * e + tokens * (8 + e) + (segments + 1) * 8 + 2 * segments * d * e + weights,
            # read the rows again, index, gate, offsets, queries, dout G·d·e, weights; write the
            # tokens' gradient T·d·e, the gates' T·e, the queries' G·d·e and the weights'.
            "bwd": 2 * tokens * d * e + tokens * (8 + 2 * e) + (segments + 1) * 8 + 3 * segments * d * e
                   + 2 * weights,
        },
        flops={"fwd": 4 * tokens * HEADS * d + 4 * segments * d * d,
               "bwd": 10 * tokens * HEADS * d + 6 * segments * d * d},
        grad_inputs=(0, 1, 2, 4, 5, 6), grad_outputs=(0,))


def jagged_self_attention_case(batch: Batch) -> Case:
    c, offsets = batch.columns, batch.dispatch.theme_offsets
    rows, d = c["T"], c["d"]
    e = batch.values.element_size()
    inputs = tuple(batch.randn(rows, d, seed=seed) for seed in (11, 12, 13))
    block_mask = baselines.document_mask(offsets, rows, batch.values.device) if batch.values.is_cuda else None
    pairs = attention_pairs(offsets, causal=True)

    def run(backend, q, k, v):
        if backend == "sdpa_padded":
            return (baselines.sdpa_padded(q, k, v, offsets, batch.max_segment, HEADS),)
        if backend == "flex":
            return (baselines.flex(q, k, v, block_mask, HEADS),)
        return (mk.jagged_self_attention(q, k, v, offsets, num_heads=HEADS, max_len=batch.max_segment,
                                         backend=backend),)

    return Case(
        op="jagged_self_attention", kernels=(), run=run, inputs=inputs, dtype=batch.dtype, shape=c,
        # fwd: read q, k, v, write out (4·T·d·e) and the log-sum-exp T·H·4; bwd: read q, k, v, out,
        # dout, lse, write dq, dk, dv (8·T·d·e + T·H·4).
        bytes={"fwd": 4 * rows * d * e + rows * HEADS * 4, "bwd": 8 * rows * d * e + rows * HEADS * 4},
        flops={"fwd": 4 * d * pairs, "bwd": 10 * d * pairs},
        grad_inputs=(0, 1, 2), grad_outputs=(0,))


def grouped_linear_case(batch: Batch) -> Case:
    """The experts' grouped linear at the query-key-value projection's shape, d -> 3d, over the
    theme-major rows (already gathered). Differentiated: the rows, the weight, the bias."""
    c, dispatch = batch.columns, batch.dispatch
    num_rows, d, num_themes = c["T"], c["d"], c["K"]
    d_out = QKV_WIDTH * d
    e = batch.values.element_size()
    expert_offsets = dispatch.expert_offsets
    max_rows = int((expert_offsets[1:] - expert_offsets[:-1]).max())     # the reference pads to it
    x = batch.randn(num_rows, d, seed=41)
    weight = batch.randn(num_themes, d, d_out, seed=42, scale=d ** -0.5)
    bias = batch.randn(num_themes, d_out, seed=43)
    inputs = (x, weight, bias)

    def run(backend, x, weight, bias):
        if backend == "fused":
            return (fused_grouped_linear(x, weight, bias, expert_offsets, max_rows=max_rows),)
        return (mk.grouped_linear(x, weight, bias, expert_offsets, max_rows=max_rows, backend=backend),)

    weights = num_themes * d * d_out * e + num_themes * d_out * e
    return Case(
        op="grouped_linear", kernels=(), run=run, inputs=inputs,
        dtype=batch.dtype, shape=c,
        bytes={
            # read the rows N·d·e, the weight and bias, the offsets (K+1)·8; write N·d_out·e
            "fwd": num_rows * d * e + weights + (num_themes + 1) * 8 + num_rows * d_out * e,
            # read the output gradient N·d_out·e, the rows and the weight; write the rows' and the
            # weight's and bias's gradients
            "bwd": num_rows * d_out * e + 2 * num_rows * d * e + 2 * weights + (num_themes + 1) * 8,
        },
        flops={"fwd": 2 * num_rows * d * d_out, "bwd": 4 * num_rows * d * d_out},
        grad_inputs=tuple(range(len(inputs))), grad_outputs=(0,))


def _padded_sequences(batch: Batch, dim: int, seed: int) -> torch.Tensor:
    return mk.jagged_to_padded(batch.randn(batch.values.shape[0], dim, seed=seed), batch.offsets, batch.max_len)


def dense_attention_case(batch: Batch) -> Case:
    c = batch.columns
    examples, length, d = c["B"], batch.max_len, c["d"]
    e = batch.values.element_size()
    inputs = tuple(_padded_sequences(batch, d, seed) for seed in (21, 22, 23))

    def run(backend, q, k, v):
        def heads(x):
            return x.view(examples, length, HEADS, d // HEADS).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return (out.transpose(1, 2),)

    pairs = examples * length * (length + 1) // 2     # what the padded causal attention computes
    moved = examples * length * d * e
    return Case(op="dense_attention", kernels=(), run=run, inputs=inputs, dtype=batch.dtype, shape=c,
                bytes={"fwd": 4 * moved, "bwd": 8 * moved}, flops={"fwd": 4 * d * pairs, "bwd": 10 * d * pairs},
                grad_inputs=(0, 1, 2), grad_outputs=(0,))


def dense_attention_varlen_case(batch: Batch) -> Case:
    """dense_attention without the padding: every whole history, jagged."""
    c = batch.columns
    tokens, d = c["T"], c["d"]
    e = batch.values.element_size()
    inputs = tuple(batch.randn(tokens, d, seed=seed) for seed in (21, 22, 23))
    offsets, max_len = batch.offsets, batch.max_len

    def run(backend, q, k, v):
        return (baselines.varlen(q, k, v, offsets, max_len, HEADS),)

    pairs = attention_pairs(offsets, causal=True)
    # as self-attention: q, k, v, out and the log-sum-exp; backward adds dout in, dq, dk, dv out
    return Case(op="dense_attention_varlen", kernels=(), run=run, inputs=inputs, dtype=batch.dtype, shape=c,
                bytes={"fwd": 4 * tokens * d * e + tokens * HEADS * 4, "bwd": 8 * tokens * d * e + tokens * HEADS * 4},
                flops={"fwd": 4 * d * pairs, "bwd": 10 * d * pairs}, grad_inputs=(0, 1, 2), grad_outputs=(0,))


def _layer_case(op: str, batch: Batch, backends: Sequence[str], **options) -> Case:
    """MoSLayer forward + backward: the parameters are inputs of the case, so that the backward
    computes every gradient a training step needs."""
    c = batch.columns
    config = dict(dim=c["d"], num_heads=HEADS, num_themes=c["K"], session_len=SESSION_LEN, validate_inputs=False,
                  **options)
    torch.manual_seed(0)
    layers = {}
    for backend in backends:
        # "fused": the reference layer with its target attention folded (benchmarks/providers_fused.py)
        layer = MoSLayer(MoSConfig(backend="reference" if backend == "fused" else backend, **config))
        layer = layer.to(device=batch.values.device, dtype=batch.dtype)
        if layers:
            layer.load_state_dict(next(iter(layers.values())).state_dict())
        layers[backend] = fuse_layer(layer) if backend == "fused" else layer
    names = [n for n, _ in next(iter(layers.values())).named_parameters()]
    params = tuple(p.detach() for _, p in next(iter(layers.values())).named_parameters())
    offsets, max_len = batch.offsets, batch.max_len

    def run(backend, values, target, *weights):
        out = torch.func.functional_call(layers[backend], dict(zip(names, weights)), (values, target, offsets),
                                         {"max_len": max_len})
        return out.output, out.aux_loss

    return Case(op=op, kernels=(), run=run, inputs=(batch.values, batch.target) + params, dtype=batch.dtype,
                shape=c, bytes={}, grad_inputs=tuple(range(2 + len(params))), grad_outputs=(0, 1), launch_bound=True)


def layer_case(batch: Batch) -> Case:
    return _layer_case("layer", batch, ("reference", "triton", "fused"))


def mos_transformer_case(batch: Batch) -> Case:
    return _layer_case("mos_transformer", batch, ("triton",), encoder="transformer", global_scope="sessions")


def dense_transformer_case(batch: Batch) -> Case:
    c = batch.columns
    torch.manual_seed(0)
    layer = baselines.DenseTransformerLayer(c["d"], HEADS).to(device=batch.values.device, dtype=batch.dtype)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach() for _, p in layer.named_parameters())

    def run(backend, x, *weights):
        return (torch.func.functional_call(layer, dict(zip(names, weights)), (x,)),)

    return Case(op="dense_transformer", kernels=(), run=run, inputs=(_padded_sequences(batch, c["d"], 31),) + params,
                dtype=batch.dtype, shape=c, bytes={}, grad_inputs=tuple(range(1 + len(params))), grad_outputs=(0,))


CASE_BUILDERS: Dict[str, Callable[[Batch], Case]] = {
    "layer": layer_case, "expert_target_attention": expert_target_attention_case,
    "jagged_self_attention": jagged_self_attention_case,
    "dense_attention": dense_attention_case, "dense_attention_varlen": dense_attention_varlen_case,
    "grouped_linear": grouped_linear_case,
    "mos_transformer": mos_transformer_case, "dense_transformer": dense_transformer_case,
}


def build_case(op: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    return CASE_BUILDERS[op](build_batch(shape, dtype, device))
