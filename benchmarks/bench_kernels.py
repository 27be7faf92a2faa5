"""Benchmarks of the pooling, dispatch, gather and scan kernels: fused session pooling + routing
(`session_pool_route`), `theme_dispatch` (with the gather it feeds), `theme_gather`,
`theme_scatter`, `linear_recurrence` (a scan over d channels of the same jagged histories) and
`selective_scan` (Mamba4Rec's scan and readout, d channels of S = 16 states), each against the
reference eager and the reference under torch.compile.

    python -m benchmarks.bench_kernels --out DIR [--quick]
        [--ops session_pool_route,theme_dispatch,theme_gather,theme_scatter,linear_recurrence,selective_scan]
        [--dtype bf16,fp16,fp32] [--device cuda]

Inputs are jagged histories of about L tokens per example (±50 %, every 64th one empty),
B = 2^21 // L examples, cut into sessions of 8 by `sessionize(mode="fixed")`, routed by the
reference `session_pool_route` against random prototypes; the routing and the dispatch are
built once per case, so every provider sees the same ones. The minimum bytes of every op (its
floor) are written beside its case builder. Rows are appended to DIR/bench_kernels.csv.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import mos_kernels as mk
from benchmarks import run, targets
from benchmarks.harness import DTYPES, PROVIDERS, Case, Provider, available_providers
from benchmarks.run import Bench
from benchmarks.tables import Target

TOKENS = 2 ** 21          # B·L of every full-size case (~2M tokens)
SESSION_LEN = 8
TEMPERATURE = 0.1


@dataclass(frozen=True)
class Shape:
    L: int            # mean history length
    d: int
    K: int            # themes
    top_k: int = 1
    B: int = 0        # examples; 0: TOKENS // L

    @property
    def examples(self) -> int:
        return self.B or max(TOKENS // self.L, 1)

    @property
    def columns(self) -> Dict[str, int]:
        return dict(B=self.examples, L=self.L, d=self.d, K=self.K, top_k=self.top_k)


# The target point (benchmarks/targets.py), and the tiny shape of --quick (interpreter smoke runs).
TARGET = Shape(**targets.KERNELS_POINT)
QUICK = Shape(L=64, d=32, K=4, top_k=2, B=4)

# Full sweep: one axis at a time away from TARGET (never the cartesian product), only the axes
# that change an op's work: K does not change what gather/scatter move, d hardly changes dispatch.
AXES = {"d": (64, 128, 256), "K": (4, 8, 16, 32), "L": (256, 1024, 4096), "top_k": (1, 2)}
SWEEPS = {
    "session_pool_route": ("d", "K", "L"),
    "theme_dispatch": ("K", "L", "top_k"),
    "theme_gather": ("d", "L", "top_k"),
    "theme_scatter": ("d", "L", "top_k"),
    "linear_recurrence": ("d", "L"),
    "selective_scan": ("d", "L"),
}
OPS = tuple(SWEEPS)

TARGETS = targets.KERNELS_TARGETS


# ----------------------------------------------------------------------------- inputs

@dataclass
class Batch:
    """One jagged batch with its sessions, routing and dispatch (all built once)."""
    shape: Shape
    dtype: torch.dtype
    values: torch.Tensor          # [T, d]
    offsets: torch.Tensor         # [B+1]
    sessions: mk.Sessions
    prototypes: torch.Tensor      # [K, d] fp32
    themes: torch.Tensor          # [S, top_k]
    gate: torch.Tensor            # [S, top_k]
    dispatch: mk.Dispatch

    @property
    def columns(self) -> Dict[str, int]:
        s, tokens = self.shape, self.values.shape[0]
        return dict(B=s.examples, L=s.L, T=tokens, S=self.sessions.num_sessions, rows=tokens * s.top_k, d=s.d,
                    K=s.K, top_k=s.top_k)


def build_batch(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shape.L - shape.L // 2, shape.L + shape.L // 2 + 1, (shape.examples,), generator=gen)
    lengths[1::64] = 0                      # a few empty histories (cold users)
    offsets = mk.offsets_from_lengths(lengths)
    tokens = int(offsets[-1])
    device_gen = torch.Generator(device=device).manual_seed(seed)
    values = torch.randn(tokens, shape.d, generator=device_gen, device=device).to(dtype)
    prototypes = torch.randn(shape.K, shape.d, generator=device_gen, device=device)
    offsets = offsets.to(device)
    sessions = mk.sessionize(offsets, mode="fixed", session_len=SESSION_LEN)
    _, routing = mk.session_pool_route(values, sessions.session_offsets, prototypes, temperature=TEMPERATURE,
                                       top_k=shape.top_k, backend="reference")
    themes, gate = routing.themes, routing.gate.detach()
    dispatch = mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                                 num_examples=shape.examples, num_themes=shape.K, backend="reference")
    return Batch(shape, dtype, values, offsets, sessions, prototypes, themes, gate, dispatch)


# ----------------------------------------------------------------------------- cases
# Byte floors: T tokens, S sessions, T' = T·top_k theme rows, e = bytes per value element,
# int64 indices and offsets (8 bytes), fp32 scores/probs/prototypes (4 bytes).

def session_pool_route_case(batch: Batch) -> Case:
    c = batch.columns
    tokens, sessions, d, num_themes, top_k = c["T"], c["S"], c["d"], c["K"], c["top_k"]
    e = batch.values.element_size()

    def run(backend, values, session_offsets, prototypes):
        pooled, routing = mk.session_pool_route(values, session_offsets, prototypes, temperature=TEMPERATURE,
                                                top_k=top_k, backend=backend)
        return pooled, routing.gate, routing.probs, routing.scores, routing.themes

    return Case(
        op="session_pool_route", kernels=("session_pool_route",), run=run,
        inputs=(batch.values, batch.sessions.session_offsets, batch.prototypes), dtype=batch.dtype, shape=c,
        bytes={
            # read values T·d·e, prototypes K·d·4, offsets (S+1)·8; write pooled S·d·e,
            # scores + probs S·K·(4+4), themes S·top_k·8.
            "fwd": tokens * d * e + num_themes * d * 4 + (sessions + 1) * 8 + sessions * d * e
                   + sessions * num_themes * 8 + sessions * top_k * 8,
            # read g_pooled + pooled 2·S·d·e; write g_values T·d·e; small terms: read probs and
            # g_probs and write g_scores S·K·4·3, offsets (S+1)·8, prototypes read + grad 2·K·d·4.
            "bwd": 2 * sessions * d * e + tokens * d * e + 3 * sessions * num_themes * 4 + (sessions + 1) * 8
                   + 2 * num_themes * d * 4,
        },
        flops={
            # sum every row, divide, normalise (3·S·d), K dot products (2·S·K·d)
            "fwd": tokens * d + sessions * d + sessions * (3 * d + 2 * num_themes * d),
            # back through the dot products and the prototype GEMM (4·S·K·d), the normalisation
            # and the mean (9·S·d)
            "bwd": sessions * d * (4 * num_themes + 9),
        },
        grad_inputs=(0, 2), grad_outputs=(0, 1, 2), checked_outputs=(0, 2), launch_bound=True)


def theme_dispatch_case(batch: Batch) -> Case:
    """theme_dispatch's index build + the gather it feeds (the layer always runs them together)."""
    c = batch.columns
    tokens, rows, sessions, d, top_k = c["T"], c["rows"], c["S"], c["d"], c["top_k"]
    examples, num_themes = c["B"], c["K"]
    e = batch.values.element_size()

    def run(backend, themes, gate, session_offsets, session_example, example_session_offsets, values):
        # The layer passes the per-example session offsets that sessionize already made.
        dispatch = mk.theme_dispatch(themes, gate, session_offsets, session_example, num_examples=examples,
                                     num_themes=num_themes, num_tokens=tokens,
                                     example_session_offsets=example_session_offsets, backend=backend)
        gathered = mk.theme_gather(values, dispatch.gather_index, dispatch.row_gate,
                                   inverse_index=dispatch.inverse_index, backend=backend)
        return gathered, dispatch.gather_index, dispatch.inverse_index, dispatch.theme_offsets

    s = batch.sessions
    return Case(
        op="theme_dispatch", kernels=("theme_dispatch", "theme_gather"), run=run,
        inputs=(batch.themes, batch.gate, s.session_offsets, s.session_example, s.example_session_offsets,
                batch.values),
        dtype=batch.dtype, shape=c,
        bytes={
            # read themes S·top_k·8, gate S·top_k·e, session offsets (S+1)·8, examples S·8 and
            # example session offsets (B+1)·8, values T·d·e; write gather_index + inverse_index
            # T'·(8+8), rows T'·d·e, theme_offsets (K·B+1)·8.
            "fwd": sessions * top_k * (8 + e) + (sessions + 1) * 8 + sessions * 8 + (examples + 1) * 8
                   + tokens * d * e
                   + rows * 16 + rows * d * e + (num_themes * examples + 1) * 8,
        },
        checked_outputs=(0, 1, 2, 3), launch_bound=True)


def _gather_bytes(tokens: int, rows: int, d: int, e: int) -> int:
    # read T'·d·e source rows (a token read by top_k rows counts top_k times), write T'·d·e,
    # read gather_index + gate T'·(8+e)
    return 2 * rows * d * e + rows * (8 + e)


def _scatter_bytes(tokens: int, rows: int, d: int, e: int) -> int:
    # read T'·d·e rows, write T·d·e, read inverse_index + gate T'·(8+e)
    return rows * d * e + tokens * d * e + rows * (8 + e)


def theme_gather_case(batch: Batch) -> Case:
    c, dispatch = batch.columns, batch.dispatch
    e = batch.values.element_size()
    sizes = (c["T"], c["rows"], c["d"], e)

    def run(backend, values, gather_index, row_gate, inverse_index):
        return (mk.theme_gather(values, gather_index, row_gate, inverse_index=inverse_index, backend=backend),)

    return Case(
        op="theme_gather", kernels=("theme_gather",), run=run,
        inputs=(batch.values, dispatch.gather_index, dispatch.row_gate, dispatch.inverse_index),
        dtype=batch.dtype, shape=c,
        bytes={"fwd": _gather_bytes(*sizes), "bwd": _scatter_bytes(*sizes)},   # backward = scatter
        grad_inputs=(0,), grad_outputs=(0,))


def theme_scatter_case(batch: Batch) -> Case:
    c, dispatch = batch.columns, batch.dispatch
    e = batch.values.element_size()
    sizes = (c["T"], c["rows"], c["d"], e)
    tokens = c["T"]
    device_gen = torch.Generator(device=batch.values.device).manual_seed(1)
    theme_rows = torch.randn(c["rows"], c["d"], generator=device_gen, device=batch.values.device).to(batch.dtype)

    def run(backend, rows, gather_index, row_gate, inverse_index):
        return (mk.theme_scatter(rows, gather_index, row_gate, num_tokens=tokens, inverse_index=inverse_index,
                                 backend=backend),)

    return Case(
        op="theme_scatter", kernels=("theme_scatter",), run=run,
        inputs=(theme_rows, dispatch.gather_index, dispatch.row_gate, dispatch.inverse_index),
        dtype=batch.dtype, shape=c,
        bytes={"fwd": _scatter_bytes(*sizes), "bwd": _gather_bytes(*sizes)},   # backward = gather
        grad_inputs=(0,), grad_outputs=(0,))


def linear_recurrence_case(batch: Batch) -> Case:
    """The scan over every history's tokens, d channels each, decays a in (0.01, 0.99)."""
    c = batch.columns
    e = batch.values.element_size()
    device_gen = torch.Generator(device=batch.values.device).manual_seed(2)
    decay = torch.rand(batch.values.shape, generator=device_gen, device=batch.values.device).mul(0.98).add(0.01)

    def run(backend, a, b, offsets):
        return (mk.linear_recurrence(a, b, offsets, backend=backend),)

    elements = c["T"] * c["d"]
    return Case(
        op="linear_recurrence", kernels=("linear_recurrence",), run=run,
        inputs=(decay.to(batch.dtype), batch.values, batch.offsets), dtype=batch.dtype, shape=c,
        # read a, b T·d·e each, write h; backward: read g, a, h, write grad a, grad b.
        bytes={"fwd": 3 * elements * e, "bwd": 5 * elements * e},
        flops={"fwd": 2 * elements, "bwd": 3 * elements},
        grad_inputs=(0, 1), grad_outputs=(0,))


SCAN_STATE = 16           # Mamba's state size per channel
# The reference materialises [T, d, S] fp32 tensors (about ten of them with the backward): at the
# target point's 2M tokens one is 17 GB. The scan's case takes the first histories up to 2^18
# tokens (2 GB each), where the reference fits a card's memory.
SCAN_TOKENS = 2 ** 18


def selective_scan_case(batch: Batch) -> Case:
    """Mamba's scan and readout over the first histories of the batch (up to SCAN_TOKENS tokens)
    as one expert: u the token values, steps delta in (1e-3, 0.101), A = -(1..S) per channel
    (Mamba's initialisation), B and C random."""
    examples = int(torch.searchsorted(batch.offsets, SCAN_TOKENS, right=True)) - 1
    offsets = batch.offsets[:examples + 1]
    num_rows = int(offsets[-1])
    u = batch.values[:num_rows]
    dim = u.shape[1]
    c = dict(batch.columns, B=examples, T=num_rows, rows=num_rows)
    e = u.element_size()
    device = u.device
    gen = torch.Generator(device=device).manual_seed(3)
    delta = torch.rand(u.shape, generator=gen, device=device).mul(0.1).add(1e-3)
    a = -torch.arange(1, SCAN_STATE + 1, device=device, dtype=torch.float32).repeat(1, dim, 1)
    b, c_out = (torch.randn(num_rows, SCAN_STATE, generator=gen, device=device) for _ in range(2))

    def run(backend, u, delta, a, b, c_out, offsets):
        return (mk.selective_scan(u, delta, a, b, c_out, offsets, backend=backend),)

    rows, states = num_rows * dim, num_rows * SCAN_STATE
    return Case(
        op="selective_scan", kernels=("selective_scan",), run=run,
        inputs=(u, delta.to(batch.dtype), a.to(batch.dtype), b.to(batch.dtype), c_out.to(batch.dtype), offsets),
        dtype=batch.dtype, shape=c,
        # read u, delta (T·d·e each), B, C (T·S·e each), write y; backward: read the incoming
        # gradient, u, delta, B, C, write grad u, grad delta, grad B, grad C. The [T, d, S]
        # states never reach memory: they are not in the floor.
        bytes={"fwd": (3 * rows + 2 * states) * e, "bwd": (5 * rows + 4 * states) * e},
        flops={"fwd": 4 * rows * SCAN_STATE, "bwd": 7 * rows * SCAN_STATE},
        grad_inputs=(0, 1, 2, 3, 4), grad_outputs=(0,))


CASE_BUILDERS = {"session_pool_route": session_pool_route_case, "theme_dispatch": theme_dispatch_case,
                 "theme_gather": theme_gather_case, "theme_scatter": theme_scatter_case,
                 "linear_recurrence": linear_recurrence_case, "selective_scan": selective_scan_case}


def build_case(op: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    return CASE_BUILDERS[op](build_batch(shape, dtype, device))


# ----------------------------------------------------------------------------- plan

def sweep_shapes(op: str) -> List[Shape]:
    """TARGET, then every other value of each axis the op sweeps."""
    return [TARGET] + [replace(TARGET, **{axis: v}) for axis in SWEEPS[op] for v in AXES[axis]
                       if v != getattr(TARGET, axis)]


def plan(ops: Sequence[str], dtypes: Sequence[str], quick: bool,
         targets_only: bool = False) -> List[Tuple[str, Shape, torch.dtype]]:
    """Quick: QUICK for every op and dtype; targets_only: TARGET for every op and dtype. Full: the
    target point of every op first (so a run cut short still has the targets), then the bf16
    sweeps, then fp16/fp32 at the target point."""
    if quick or targets_only:
        return [(op, QUICK if quick else TARGET, DTYPES[dt]) for dt in dtypes for op in ops]
    cases = []
    if "bf16" in dtypes:
        cases += [(op, TARGET, torch.bfloat16) for op in ops]
        cases += [(op, shape, torch.bfloat16) for op in ops for shape in sweep_shapes(op)[1:]]
    cases += [(op, TARGET, DTYPES[dt]) for dt in dtypes if dt != "bf16" for op in ops]
    return cases


def targets_at(quick: bool, dtypes: Sequence[str]) -> Tuple[Sequence[Target], Dict[str, object], str]:
    """The targets, at the target point (bf16) or, with --quick, at QUICK in the first dtype."""
    shape = QUICK if quick else TARGET
    where = dict(dtype=dtypes[0] if quick else "bf16", L=shape.L, d=shape.d, K=shape.K, top_k=shape.top_k)
    title = "Targets at " + ", ".join(f"{k}={v}" for k, v in where.items()) + ("" if quick else " (T ~ 2M)")
    return TARGETS, where, title


def providers_for(op: str, shape: Shape, names: Sequence[str], device: torch.device) -> List[Provider]:
    """Every op is timed by every provider asked for (a case skips those its kernels lack)."""
    return [PROVIDERS[name] for name in names]


BENCH = Bench(
    name="bench_kernels", description=__doc__.split("\n\n")[0], ops=OPS, providers=tuple(PROVIDERS),
    default_providers=available_providers, plan=plan, build_case=build_case,
    providers_for=providers_for, targets=targets_at,
    dtype_help="default: bf16,fp16,fp32 (fp16/fp32 at the target point only); "
               "--quick: fp32 on CPU (the interpreter cannot do bf16), bf16 on CUDA",
    plan_help="targets: the target point of every op in every --dtype, no sweep")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
