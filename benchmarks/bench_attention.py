"""Benchmarks of the Triton kernels II and the fused MoS layer.

    python -m benchmarks.bench_attention --out DIR [--quick] [--ops layer,target_attention,...]
                                         [--dtype bf16,fp16,fp32] [--device cuda]

Inputs: jagged histories of about L tokens (±50 %, every 64th one empty), B examples (B = 256 at
the issue's point L = 1000; B·L ≈ 256k elsewhere), d = 64, H = 2 heads, cut into sessions of 8
and routed by the reference `session_pool_route` to K = 8 themes (top-1) against random
prototypes; the dispatch is built once per case, so every provider sees the same one.

Ops (rows of DIR/bench_attention.csv):
  target_attention  the theme experts' target attention over the dispatch (gather fused)
  self_attention    causal attention inside every theme subsequence (the theme-major layout)
  dense_attention   causal SDPA over every whole sequence, padded to the longest: what MoS replaces
  layer             MoSLayer (target-attention experts) forward + backward, parameters included
  mos_transformer   MoSLayer(encoder="transformer", global_scope="sessions"), Triton
  dense_transformer one pre-LN causal transformer layer (SDPA) over the padded whole sequences
Providers: `reference`, `compiled` (the reference under torch.compile), `triton`, and for
self-attention `sdpa_padded` (SDPA on the theme subsequences padded to the longest, the copies
included), `flex` (compiled FlexAttention with a document mask on the same jagged layout; the
block mask is built once, outside the timing; CUDA only). The floors of every case are written
beside its builder; self-attention FLOPs are the jagged count (sum over segments of L_g (L_g+1)/2
query-key pairs, 4·d FLOPs each forward, 10·d backward).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from benchmarks.harness import comma_subset, progress_line
from benchmarks.harness import (DTYPES, PROVIDERS, Case, Environment, Provider, Target, Timer, append_csv,
                                describe_error, free_memory, make_row, print_table, print_targets,
                                run_case)
from mos import MoSConfig, MoSLayer
from mos_kernels.self_attention import attention_pairs

TOKENS = 256_000
SESSION_LEN = 8
TEMPERATURE = 0.1
HEADS = 2


@dataclass(frozen=True)
class Shape:
    L: int              # mean history length
    d: int = 64
    K: int = 8
    B: int = 0          # examples; 0: TOKENS // L

    @property
    def examples(self) -> int:
        return self.B or max(TOKENS // self.L, 1)


TARGET = Shape(L=1000, B=256)
QUICK = Shape(L=64, d=32, K=4, B=4)
SWEEP_L = (1000, 2048, 4096, 8192)

EXTRA_PROVIDERS = {p.name: p for p in (Provider("sdpa_padded", "sdpa_padded"), Provider("flex", "flex"),
                                       Provider("sdpa", "sdpa"))}
ALL_PROVIDERS = {**PROVIDERS, **EXTRA_PROVIDERS}
# Which providers time each op.
OP_PROVIDERS = {
    "layer": ("reference", "compiled", "triton"),
    "target_attention": ("reference", "compiled", "triton"),
    "self_attention": ("reference", "triton", "sdpa_padded", "flex"),
    "dense_attention": ("sdpa",),
    "mos_transformer": ("triton",),
    "dense_transformer": ("sdpa",),
}
OPS = tuple(OP_PROVIDERS)

TARGETS = (
    Target("layer fwd+bwd: speedup over reference eager", "layer", "fwd+bwd", "triton", "speedup_vs_eager", 4.0, "x"),
    Target("layer fwd+bwd: speedup over reference compiled", "layer", "fwd+bwd", "triton", "speedup_vs_compiled",
           2.0, "x"),
    Target("target attention fwd: % of bandwidth floor", "target_attention", "fwd", "triton", "pct_floor", 60.0, " %"),
    Target("self-attention fwd+bwd: speedup over FlexAttention", "self_attention", "fwd+bwd", "triton", "speedup",
           1.2, "x", versus=("self_attention", "flex")),
    Target("L=4096: MoS transformer layer fwd+bwd speedup over one dense SDPA layer", "mos_transformer", "fwd+bwd",
           "triton", "speedup", 1.0, "x", versus=("dense_transformer", "sdpa"), at=(("L", 4096),)),
)


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
                                 num_tokens=num_tokens, backend="reference")
    segment_lengths = dispatch.segment_lengths
    return Batch(shape, dtype, values, target, offsets, int(lengths.max()), sessions, dispatch,
                 int(segment_lengths.max()) if segment_lengths.numel() else 0)


def _randn(batch: Batch, *shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device=batch.values.device).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=batch.values.device) * scale).to(batch.dtype)


# ----------------------------------------------------------------------------- cases
# Byte floors: T tokens, G = K·B segments, e bytes per element, int64 indices and offsets.

def target_attention_case(batch: Batch) -> Case:
    c, dispatch = batch.columns, batch.dispatch
    tokens, d, num_themes = c["T"], c["d"], c["K"]
    segments = num_themes * c["B"]
    e = batch.values.element_size()
    inputs = (batch.values, _randn(batch, segments, d, seed=1), _randn(batch, num_themes, d, d, seed=2, scale=d ** -0.5),
              _randn(batch, num_themes, d, seed=3), _randn(batch, num_themes, d, d, seed=4, scale=d ** -0.5),
              _randn(batch, num_themes, d, seed=5), dispatch.row_gate.detach().to(batch.dtype))

    def run(backend, tokens, query, w_key, b_key, w_value, b_value, gate):
        return (mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, dispatch.theme_offsets,
                                           num_heads=HEADS, gather_index=dispatch.gather_index, row_gate=gate,
                                           inverse_index=dispatch.inverse_index, backend=backend),)

    weights = 2 * num_themes * d * d * e + 2 * num_themes * d * e
    return Case(
        op="target_attention", kernels=("expert_target_attention",), run=run, inputs=inputs, dtype=batch.dtype,
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


def _sdpa_padded(q, k, v, offsets, max_len: int):
    """Causal SDPA on every segment padded to max_len (right padding: a real row never sees a
    padded key under the causal mask), back to the jagged rows."""
    num_segments, dim = offsets.numel() - 1, q.shape[1]

    def heads(x):
        return mk.jagged_to_padded(x, offsets, max_len).view(num_segments, max_len, HEADS, dim // HEADS).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    out = out.transpose(1, 2).reshape(num_segments, max_len, dim)
    return out[mk.segment_ids(offsets, q.shape[0]), mk.positions_in_segment(offsets, q.shape[0])]


_compiled_flex = None


def _flex(q, k, v, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)

    def heads(x):                                                 # [T, d] -> [1, H, T, dh]
        return x.view(1, x.shape[0], HEADS, -1).transpose(1, 2)

    out = _compiled_flex(heads(q), heads(k), heads(v), block_mask=block_mask)
    return out.transpose(1, 2).reshape(q.shape)


def _document_mask(offsets, num_rows, device):
    from torch.nn.attention.flex_attention import create_block_mask
    document = mk.segment_ids(offsets, num_rows)

    def causal_document(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    # Compiled, the mask is evaluated block by block; eager would materialise all T x T entries.
    return create_block_mask(causal_document, 1, 1, num_rows, num_rows, device=device, _compile=True)


def self_attention_case(batch: Batch) -> Case:
    c, offsets = batch.columns, batch.dispatch.theme_offsets
    rows, d = c["T"], c["d"]
    e = batch.values.element_size()
    inputs = tuple(_randn(batch, rows, d, seed=seed) for seed in (11, 12, 13))
    block_mask = _document_mask(offsets, rows, batch.values.device) if batch.values.is_cuda else None
    pairs = attention_pairs(offsets, causal=True)

    def run(backend, q, k, v):
        if backend == "sdpa_padded":
            return (_sdpa_padded(q, k, v, offsets, batch.max_segment),)
        if backend == "flex":
            return (_flex(q, k, v, block_mask),)
        return (mk.jagged_self_attention(q, k, v, offsets, num_heads=HEADS, max_len=batch.max_segment,
                                         backend=backend),)

    return Case(
        op="self_attention", kernels=(), run=run, inputs=inputs, dtype=batch.dtype, shape=c,
        # fwd: read q, k, v, write out (4·T·d·e) and the log-sum-exp T·H·4; bwd: read q, k, v, out,
        # dout, lse, write dq, dk, dv (8·T·d·e + T·H·4).
        bytes={"fwd": 4 * rows * d * e + rows * HEADS * 4, "bwd": 8 * rows * d * e + rows * HEADS * 4},
        flops={"fwd": 4 * d * pairs, "bwd": 10 * d * pairs},
        grad_inputs=(0, 1, 2), grad_outputs=(0,))


def _padded_sequences(batch: Batch, dim: int, seed: int) -> torch.Tensor:
    return mk.jagged_to_padded(_randn(batch, batch.values.shape[0], dim, seed=seed), batch.offsets, batch.max_len)


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


def _layer_case(op: str, batch: Batch, backends: Sequence[str], **options) -> Case:
    """MoSLayer forward + backward: the parameters are inputs of the case, so that the backward
    computes every gradient a training step needs."""
    c = batch.columns
    config = dict(dim=c["d"], num_heads=HEADS, num_themes=c["K"], session_len=SESSION_LEN, validate_inputs=False,
                  **options)
    torch.manual_seed(0)
    layers = {}
    for backend in backends:
        layer = MoSLayer(MoSConfig(backend=backend, **config)).to(device=batch.values.device, dtype=batch.dtype)
        if layers:
            layer.load_state_dict(next(iter(layers.values())).state_dict())
        layers[backend] = layer
    names = [n for n, _ in next(iter(layers.values())).named_parameters()]
    params = tuple(p.detach() for _, p in next(iter(layers.values())).named_parameters())
    offsets, max_len = batch.offsets, batch.max_len

    def run(backend, values, target, *weights):
        out = torch.func.functional_call(layers[backend], dict(zip(names, weights)), (values, target, offsets),
                                         {"max_len": max_len})
        return out.output, out.aux_loss

    return Case(op=op, kernels=(), run=run, inputs=(batch.values, batch.target) + params, dtype=batch.dtype,
                shape=c, bytes={}, grad_inputs=tuple(range(2 + len(params))), grad_outputs=(0, 1))


def layer_case(batch: Batch) -> Case:
    return _layer_case("layer", batch, ("reference", "triton"))


def mos_transformer_case(batch: Batch) -> Case:
    return _layer_case("mos_transformer", batch, ("triton",), encoder="transformer", global_scope="sessions")


class DenseTransformerLayer(nn.Module):
    """One pre-LN causal transformer layer (the block of the MoS experts) over padded sequences."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        examples, length, dim = x.shape
        q, k, v = (t.view(examples, length, self.num_heads, -1).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(dim, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(attn)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


def dense_transformer_case(batch: Batch) -> Case:
    c = batch.columns
    torch.manual_seed(0)
    layer = DenseTransformerLayer(c["d"], HEADS).to(device=batch.values.device, dtype=batch.dtype)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach() for _, p in layer.named_parameters())

    def run(backend, x, *weights):
        return (torch.func.functional_call(layer, dict(zip(names, weights)), (x,)),)

    return Case(op="dense_transformer", kernels=(), run=run, inputs=(_padded_sequences(batch, c["d"], 31),) + params,
                dtype=batch.dtype, shape=c, bytes={}, grad_inputs=tuple(range(1 + len(params))), grad_outputs=(0,))


CASE_BUILDERS: Dict[str, Callable[[Batch], Case]] = {
    "layer": layer_case, "target_attention": target_attention_case, "self_attention": self_attention_case,
    "dense_attention": dense_attention_case, "mos_transformer": mos_transformer_case,
    "dense_transformer": dense_transformer_case,
}


def build_case(op: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    return CASE_BUILDERS[op](build_batch(shape, dtype, device))


# ----------------------------------------------------------------------------- plan

def plan(ops: Sequence[str], dtypes: Sequence[str], quick: bool) -> List[Tuple[str, Shape, torch.dtype]]:
    """Quick: QUICK for every op and dtype. Full, so that a run cut short keeps the targets: the
    target point of every op in bf16, the L = 4096 transformer comparison, the bf16 sweep of L for
    the attention and transformer ops, then fp16/fp32 at the target point."""
    if quick:
        return [(op, QUICK, DTYPES[dt]) for dt in dtypes for op in ops]
    swept = [op for op in ("self_attention", "dense_attention", "mos_transformer", "dense_transformer") if op in ops]
    cases = []
    if "bf16" in dtypes:
        cases += [(op, TARGET, torch.bfloat16) for op in ops if op not in ("mos_transformer", "dense_transformer")]
        cases += [(op, Shape(L=4096), torch.bfloat16) for op in ("mos_transformer", "dense_transformer") if op in ops]
        cases += [(op, Shape(L=length), torch.bfloat16) for length in SWEEP_L for op in swept
                  if (op, length) not in {(o, 4096) for o in ("mos_transformer", "dense_transformer")}
                  and not (length == TARGET.L and op in ("self_attention", "dense_attention"))]
    cases += [(op, TARGET, DTYPES[dt]) for dt in dtypes if dt != "bf16" for op in ops]
    return cases


def providers_for(op: str, shape: Shape, names: Sequence[str], device: torch.device) -> List[Provider]:
    chosen = [ALL_PROVIDERS[n] for n in OP_PROVIDERS[op] if n in names]
    # FlexAttention has no CPU backward. It compiles anew for every shape (~20 s with its
    # backward) and the padded reference is slow: in the sweep both run at L = 1000 and 4096 only.
    swept = shape.L not in (TARGET.L, 4096, QUICK.L)
    return [p for p in chosen if not (p.name == "flex" and device.type != "cuda")
            and not (swept and p.name in ("flex", "reference"))]


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of bench_attention.csv (rows are appended)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run (CPU interpreter included)")
    parser.add_argument("--ops", type=comma_subset(OPS), default=list(OPS), help=f"default: {','.join(OPS)}")
    parser.add_argument("--dtype", type=comma_subset(tuple(DTYPES)), default=None,
                        help="default: bf16 (the sweeps), fp16,fp32 at the target point; --quick: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", type=comma_subset(tuple(ALL_PROVIDERS)), default=list(ALL_PROVIDERS),
                        help=f"default: {','.join(ALL_PROVIDERS)}")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled'")
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--cpu-reps", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new case after this (the plan runs the targets first)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device: expected cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: expected cpu (no CUDA device is visible), got cuda")
    if args.dtype is None:
        args.dtype = (["fp32"] if device.type == "cpu" else ["bf16"]) if args.quick else list(DTYPES)
    return args


def _run_one(op, shape, dtype, device, providers, env, timer, compile_backend):
    case = None
    try:
        case = build_case(op, shape, dtype, device)
        return run_case(case, providers, env, timer, compile_backend=compile_backend)
    except Exception as exc:   # building the inputs failed (OOM, ...): one row says so
        columns = dict(B=shape.examples, L=shape.L, d=shape.d, K=shape.K)
        return [make_row(env, op=op, provider="-", mode="-", dtype=dtype, shape=columns, error=describe_error(exc))]
    finally:
        case = None
        free_memory(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    device = torch.device(args.device)
    timer = Timer(rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, cpu_reps=args.cpu_reps)
    env = Environment.detect(device, timer)
    cases = plan(args.ops, args.dtype, args.quick)
    csv_path = Path(args.out) / "bench_attention.csv"
    print(f"bench_attention: {len(cases)} cases on {env.card} ({env.device}), {env.timing}", file=sys.stderr)
    rows: List[Dict[str, object]] = []
    begin = time.perf_counter()
    for i, (op, shape, dtype) in enumerate(cases, 1):
        start = time.perf_counter()
        if args.time_budget is not None and start - begin > args.time_budget:
            print(f"bench_attention: time budget of {args.time_budget:g} s spent; {len(cases) - i + 1} of "
                  f"{len(cases)} cases not run", file=sys.stderr)
            break
        case_rows = _run_one(op, shape, dtype, device, providers_for(op, shape, args.providers, device), env,
                             timer, args.compile_backend)
        csv_path = append_csv(csv_path, case_rows)
        rows.extend(case_rows)
        print(progress_line(i, len(cases), op, dtype, case_rows, time.perf_counter() - start), file=sys.stderr)
    print_table(rows)
    print()
    shape, dtype = (QUICK, args.dtype[0]) if args.quick else (TARGET, "bf16")
    where = dict(dtype=dtype, L=shape.L, d=shape.d, K=shape.K)
    targets = TARGETS if not args.quick else tuple(replace(t, at=()) for t in TARGETS)
    title = (f"Targets at {dtype}, B={shape.examples}, L={shape.L}, d={shape.d}, K={shape.K}, H={HEADS}"
             + (" (--quick shape, not the target point)" if args.quick else "")
             + (" [CPU: not meaningful]" if device.type == "cpu" else ""))
    print_targets(rows, targets, where, title)
    errors = sum(1 for r in rows if r["error"])
    print(f"\n{len(rows)} rows ({errors} with errors) appended to {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
