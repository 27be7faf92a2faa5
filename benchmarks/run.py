"""The command line every kernel benchmark shares.

`python -m benchmarks.bench_kernels` and `python -m benchmarks.bench_attention` each describe
themselves as a `Bench` (their ops, plan, cases, providers and targets) and hand it to `main`,
which parses the options, runs the planned cases one by one (rows appended to DIR/<name>.csv as
each provider finishes), prints a progress line per case, then the table of every row and the
targets.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.harness import DTYPES, Case, Provider, comma_subset, make_row, progress_line, run_case
from benchmarks.machine import Environment, Timer, free_memory
from benchmarks.tables import CsvSink, Target, describe_error, print_table, print_targets

# One planned case: (op, shape, dtype). A shape is the bench's own dataclass; `shape.columns`
# are the shape columns it fixes (the row of a case whose inputs could not be built).
Planned = Tuple[str, Any, torch.dtype]


@dataclass(frozen=True)
class Bench:
    name: str                 # the program (benchmarks.<name>) and its CSV, DIR/<name>.csv
    description: str
    ops: Tuple[str, ...]
    providers: Tuple[str, ...]                                    # what --providers may name
    # (requested --providers or None, device) -> the provider names to run
    default_providers: Callable[[Optional[Sequence[str]], torch.device], List[str]]
    plan: Callable[[Sequence[str], Sequence[str], bool, bool], List[Planned]]   # (ops, dtypes, quick, targets_only)
    build_case: Callable[[str, Any, torch.dtype, torch.device], Case]
    # (op, shape, provider names, device) -> the providers that time this case
    providers_for: Callable[[str, Any, Sequence[str], torch.device], List[Provider]]
    # (quick, dtypes) -> the targets, the row columns of their point, and the table's title
    targets: Callable[[bool, Sequence[str]], Tuple[Sequence[Target], Dict[str, object], str]]
    dtype_help: str
    plan_help: str


def parse_args(bench: Bench, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{bench.name}", description=bench.description)
    parser.add_argument("--out", required=True, help=f"folder of {bench.name}.csv (rows are appended)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run (CPU interpreter included)")
    parser.add_argument("--ops", type=comma_subset(bench.ops), default=list(bench.ops),
                        help=f"default: {','.join(bench.ops)}")
    parser.add_argument("--dtype", type=comma_subset(tuple(DTYPES)), default=None, help=bench.dtype_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when visible)")
    parser.add_argument("--providers", type=comma_subset(bench.providers), default=None,
                        help=f"default: {','.join(bench.providers)} (cuda where the extension can be had)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the 'compiled' provider (default inductor)")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="CUDA: do_bench timed repetition budget")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench warm-up budget")
    parser.add_argument("--cpu-reps", type=int, default=3, help="CPU: timed calls per row")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new case after this (the plan runs the targets first)")
    parser.add_argument("--plan", choices=("full", "targets"), default="full", help=bench.plan_help)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device: expected cuda or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: expected cpu (no CUDA device is visible), got cuda")
    if args.cpu_reps < 1:
        parser.error(f"--cpu-reps: expected at least 1, got {args.cpu_reps}")
    args.providers = bench.default_providers(args.providers, device)
    if args.dtype is None:
        args.dtype = (["fp32"] if device.type == "cpu" else ["bf16"]) if args.quick else list(DTYPES)
    return args


def _run_one(bench: Bench, planned: Planned, args: argparse.Namespace, env: Environment, timer: Timer,
             sink: CsvSink) -> List[Dict[str, object]]:
    op, shape, dtype = planned
    device = torch.device(args.device)
    case = None
    try:
        case = bench.build_case(op, shape, dtype, device)
        providers = bench.providers_for(op, shape, args.providers, device)
        return run_case(case, providers, env, timer, compile_backend=args.compile_backend, emit=sink)
    except Exception as exc:   # building the inputs failed (OOM, ...): one row says so
        rows = [make_row(env, op=op, provider="-", mode="-", dtype=dtype, shape=shape.columns,
                         error=describe_error(exc))]
        sink(rows)
        return rows
    finally:
        case = None
        free_memory(device)


def _print_targets(bench: Bench, rows: Sequence[Dict[str, object]], args: argparse.Namespace) -> None:
    targets, where, title = bench.targets(args.quick, args.dtype)
    title += ((" (--quick shape, not the target point)" if args.quick else "")
              + (" [CPU: not meaningful]" if torch.device(args.device).type == "cpu" else ""))
    print_targets(rows, targets, where, title)


def main(bench: Bench, argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(bench, argv)
    # The compiled reference dispatch breaks its graph at a .item() (the reference reads T back);
    # dynamo's multi-line warning about it would drown the progress lines.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    device = torch.device(args.device)
    timer = Timer(rep_ms=args.rep_ms, warmup_ms=args.warmup_ms, cpu_reps=args.cpu_reps)
    env = Environment.detect(device, timer)
    cases = bench.plan(args.ops, args.dtype, args.quick, args.plan == "targets")
    sink = CsvSink(Path(args.out) / f"{bench.name}.csv")
    peak = "none" if env.peak_bw is None else f"{env.peak_bw / 1e12:.2f} TB/s"
    print(f"{bench.name}: {len(cases)} cases on {env.card} ({env.device}), peak bandwidth {peak} "
          f"[{env.peak_source}], {env.timing}", file=sys.stderr)
    rows: List[Dict[str, object]] = []
    begin = time.perf_counter()
    for i, planned in enumerate(cases, 1):
        start = time.perf_counter()
        if args.time_budget is not None and start - begin > args.time_budget:
            print(f"{bench.name}: time budget of {args.time_budget:g} s spent; {len(cases) - i + 1} of "
                  f"{len(cases)} cases not run", file=sys.stderr)
            break
        case_rows = _run_one(bench, planned, args, env, timer, sink)
        rows.extend(case_rows)
        op, shape, dtype = planned
        print(progress_line(i, len(cases), op, dtype, case_rows, time.perf_counter() - start, str(shape)),
              file=sys.stderr)
    print_table(rows)
    print()
    _print_targets(bench, rows, args)
    errors = sum(1 for r in rows if r["error"])
    print(f"\n{len(rows)} rows ({errors} with errors) appended to {sink.path}")
    return 0
