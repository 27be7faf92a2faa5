"""The CPU cost of MoS against its own backbone: wall time beside FLOPs, in one process.

    python -m benchmarks.bench_cpu_layer [--out DIR] [--lengths 100,1000] [--reps 3] [--threads N]

What a CPU user runs: the reference path (`backend="reference"`), forward + backward of a training
step (the layer's output summed plus its auxiliary losses; every parameter's gradient) for
  backbone  the layer's own global expert over the whole sequences (the model MoS contains)
  mos       the whole MoSLayer: global, short-term and K theme experts, router, fusion
with B = 64 examples of L ± 50 % tokens, d = 32, H = 2, K = 8 themes (top-1), sessions of 8, for
each built-in encoder (target attention, transformer, SDIM, Mamba4Rec: the backbone rows give
each encoder's own CPU cost), and for the transformer also `global_scope="sessions"` (the global
expert over the session vectors: the configuration whose FLOPs are below the backbone's).

Columns: median wall time of `--reps` interleaved repetitions of each side (after one warm-up),
the MoS/backbone wall-time ratio, the MoS/backbone FLOP ratio (torch's FlopCounterMode over the
same step; the ops' formulas count jagged work, so it is what the algorithm costs), and their
quotient: how far the CPU path is from costing what its FLOPs say (1.0 = in proportion).
Rows go to DIR/bench_cpu_layer.csv. Timings are only comparable within one run.

A second table puts the transformer's attention beside what the machine can do: forward + backward
of `jagged_self_attention`'s reference (the causal self-attention every transformer expert runs)
over the same B histories and the same length buckets, on its CPU path (torch's flash attention)
and on the dense masked path (the CPU's path before it; other devices pad to max_len instead), in
GFLOP/s of the op's registered FLOP formulas, beside a 1024^3 fp32 matmul's GFLOP/s in the same
process (DIR/bench_cpu_attention.csv). `refwd_ms` times the flash path with its forward run twice,
as when the backward had to run it again for the log-sum-exp it now receives: `saved_lse_speedup`
is what saving it gains.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos import MoSConfig, MoSLayer
from mos_kernels._padded_attention import padded_attention_backward, padded_attention_forward
from mos_kernels.jagged_self_attention import attention_pairs

EXAMPLES, DIM, HEADS, THEMES, SESSION_LEN = 64, 32, 2, 8, 8
CONFIGS = {   # name: MoSConfig options beyond the shared ones
    "target_attention": dict(encoder="target_attention"),
    "transformer": dict(encoder="transformer"),
    "transformer_global_sessions": dict(encoder="transformer", global_scope="sessions"),
    "sdim": dict(encoder="sdim"),
    "mamba4rec": dict(encoder="mamba4rec"),
}
COLUMNS = ("config", "L", "tokens", "backbone_ms", "mos_ms", "wall_ratio", "flop_ratio", "wall_per_flop_ratio",
           "threads")
ATTENTION_COLUMNS = ("L", "tokens", "flash_ms", "refwd_ms", "saved_lse_speedup", "dense_ms", "speedup",
                     "flash_gflops", "dense_gflops", "matmul_gflops", "threads")
MATMUL_SIZE = 1024


@dataclass
class Inputs:
    values: torch.Tensor
    target: torch.Tensor
    offsets: torch.Tensor
    max_len: int


def make_inputs(length: int, seed: int = 0) -> Inputs:
    """B histories of length L ± 50 % (uniform), values and targets ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 2), length + length // 2 + 1, (EXAMPLES,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randn(int(offsets[-1]), DIM, generator=gen)
    return Inputs(values, torch.randn(EXAMPLES, DIM, generator=gen), offsets, int(lengths.max()))


def training_steps(options: Dict[str, object], inputs: Inputs) -> Dict[str, Callable[[], None]]:
    """One forward + backward for each side, sharing the global expert's weights."""
    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(dim=DIM, num_heads=HEADS, num_themes=THEMES, session_len=SESSION_LEN,
                               backend="reference", validate_inputs=False, **options)).train()
    x = inputs.values.requires_grad_()

    def backbone():
        # As the layer runs its experts (and the lab its backbone): inputs known good, no op
        # rescans them; with the checks on, this side alone would pay a NaN scan per op.
        with mk.data_checks(False):
            out = layer.global_expert(x, inputs.target, inputs.offsets, max_len=inputs.max_len)
        out.sum().backward()

    def mos():
        out = layer(x, inputs.target, inputs.offsets, max_len=inputs.max_len)
        (out.output.sum() + out.aux_loss).backward()

    return {"backbone": backbone, "mos": mos}


def flops_of(step: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def median_seconds(steps: Dict[str, Callable[[], None]], reps: int) -> Dict[str, float]:
    """Each side once to warm up, then `reps` rounds alternating the sides, so that a load change
    on the machine hits both alike."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(config: str, length: int, reps: int) -> Dict[str, object]:
    inputs = make_inputs(length)
    steps = training_steps(CONFIGS[config], inputs)
    flops = {name: flops_of(step) for name, step in steps.items()}
    seconds = median_seconds(steps, reps)
    wall_ratio = seconds["mos"] / seconds["backbone"]
    flop_ratio = flops["mos"] / flops["backbone"]
    return {"config": config, "L": length, "tokens": inputs.values.shape[0],
            "backbone_ms": round(1e3 * seconds["backbone"], 1), "mos_ms": round(1e3 * seconds["mos"], 1),
            "wall_ratio": round(wall_ratio, 3), "flop_ratio": round(flop_ratio, 3),
            "wall_per_flop_ratio": round(wall_ratio / flop_ratio, 3), "threads": torch.get_num_threads()}


def attention_steps(inputs: Inputs) -> Dict[str, Callable[[], None]]:
    """Forward + backward of the causal self-attention over the inputs' histories (q, k, v
    projections of d = 32, H = 2), on the CPU flash path, on it with the forward run again before
    the backward (what the backward did before the forward returned its log-sum-exp), and on the
    dense path."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, g_out = (torch.randn(inputs.values.shape, generator=gen) for _ in range(4))

    def step(flash: bool, forward_again: bool = False) -> Callable[[], None]:
        def run():
            for _ in range(2 if forward_again else 1):
                out, lse = padded_attention_forward(q, k, v, inputs.offsets, HEADS, None, True, one_bucket=False,
                                                    flash=flash)
            padded_attention_backward(g_out, q, k, v, out, lse, inputs.offsets, HEADS, None, True, one_bucket=False,
                                      flash=flash)
        return run

    return {"flash": step(True), "refwd": step(True, forward_again=True), "dense": step(False)}


def attention_flops(offsets: torch.Tensor) -> int:
    """Forward + backward FLOPs of the causal self-attention over `offsets`, by the op's registered
    formulas (mos_kernels.jagged_self_attention): 4 d per (query, key) pair forward (q.k, p.v),
    10 d backward (q.k recomputed, dV, dP, dK, dQ)."""
    return (4 + 10) * DIM * attention_pairs(offsets, True)


def matmul_gflops(reps: int) -> float:
    """GFLOP/s of a MATMUL_SIZE^3 fp32 matmul (median of reps, after a warm-up)."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    seconds = median_seconds({"mm": lambda: a @ b}, reps)["mm"]
    return 2 * MATMUL_SIZE ** 3 / seconds / 1e9


def measure_attention(length: int, reps: int, matmul: float) -> Dict[str, object]:
    inputs = make_inputs(length)
    flops = attention_flops(inputs.offsets)
    seconds = median_seconds(attention_steps(inputs), reps)
    return {"L": length, "tokens": inputs.values.shape[0], "flash_ms": round(1e3 * seconds["flash"], 1),
            "refwd_ms": round(1e3 * seconds["refwd"], 1),
            "saved_lse_speedup": round(seconds["refwd"] / seconds["flash"], 2),
            "dense_ms": round(1e3 * seconds["dense"], 1), "speedup": round(seconds["dense"] / seconds["flash"], 2),
            "flash_gflops": round(flops / seconds["flash"] / 1e9, 2),
            "dense_gflops": round(flops / seconds["dense"] / 1e9, 2), "matmul_gflops": round(matmul, 1),
            "threads": torch.get_num_threads()}


def print_table(rows: List[Dict[str, object]], out=None, columns=COLUMNS) -> None:
    out = sys.stdout if out is None else out
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns), file=out)
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns), file=out)


def write_csv(path: Path, rows: List[Dict[str, object]], columns) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Optional[List[str]] = None) -> Dict[str, List[Dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_cpu_layer.csv")
    parser.add_argument("--lengths", default="100,1000", help="mean history lengths L, comma-separated")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, any of {list(CONFIGS)}")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each side (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"--configs: expected names from {list(CONFIGS)}, got {c!r}")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    if args.reps < 1 or min(lengths) < 1:
        parser.error(f"--reps and --lengths: expected positive numbers, got {args.reps} and {lengths}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for config in configs:
        for length in lengths:
            print(f"{config}, L = {length} ...", file=sys.stderr, flush=True)
            rows.append(measure(config, length, args.reps))
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"B = {EXAMPLES}, d = {DIM}, K = {THEMES}, sessions of {SESSION_LEN}; forward + backward, reference path")
    print_table(rows)
    print("attention ...", file=sys.stderr, flush=True)
    matmul = matmul_gflops(args.reps)
    attention = [measure_attention(length, args.reps, matmul) for length in lengths]
    print(f"\ncausal self-attention, forward + backward, reference: CPU flash path vs dense path; "
          f"{MATMUL_SIZE}^3 fp32 matmul for scale")
    print_table(attention, columns=ATTENTION_COLUMNS)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "bench_cpu_layer.csv", rows, COLUMNS)
        write_csv(args.out / "bench_cpu_attention.csv", attention, ATTENTION_COLUMNS)
    return {"layer": rows, "attention": attention}


if __name__ == "__main__":
    main()
