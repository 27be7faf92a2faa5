"""The benchmark harness every kernel benchmark shares.

Owns: `Case` (one op at one shape and dtype: its inputs, how to run it with a given backend, and
the minimum bytes / FLOPs each mode must move), `Provider` (how a case is run: the reference
eager, the reference under torch.compile, Triton; a new backend is one line in PROVIDERS), the
timers (do_bench, and a CUDA-graph replay beside it for launch-bound cases), the peak-bandwidth
table behind "% of floor", and rows stamped with the card, date, versions and commit (their CSV
and tables: benchmarks/tables.py). A benchmark module only builds cases and calls `run_case`;
see benchmarks/README.md for what every column means.

L2 cache: on CUDA, `triton.testing.do_bench` zeroes a 256 MB buffer before every timed call
(over 4x the 50 MB L2 of an H100 and the 60 MB of an H200), so every call starts cold and inputs
are not rotated.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import mos_kernels as mk
import triton
import triton.testing

from benchmarks.cuda_graph import graph_time
from benchmarks.tables import COLUMNS, MODES, SHAPE_COLUMNS, add_speedups, describe_error, shape_label
from mos_kernels.backend import IMPLEMENTED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Device-to-device copy bandwidth measured on the project's machines, B/s.
# Matched against torch.cuda.get_device_name; any other card (H100 PCIe included, whose HBM is
# slower) gets a measured 1 GiB copy instead.
PEAK_BANDWIDTH = (("H200", 4.3e12), ("H100", 3.0e12))
# Dense bf16/fp16 tensor-core rate measured on the same machines, FLOP/s: the
# FLOP floor of a half-precision case that counts its FLOPs. fp32 cases have only the byte floor.
PEAK_HALF_FLOPS = (("H200", 8.0e14), ("H100", 8.0e14))



def comma_subset(allowed: Sequence[str]):
    """An argparse type: a comma-separated, non-empty subset of `allowed`."""
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(allowed)}, got {text!r}")
        return items
    return parse


def progress_line(i: int, n: int, op: str, dtype: torch.dtype, rows, seconds: float, label: str = "") -> str:
    """One stderr line per case: the median of each provider per mode, and the first error."""
    parts = []
    for mode in MODES:
        timed = [f"{r['provider']} {r['median_ms']:.3f}" for r in rows if r["mode"] == mode and r["median_ms"] != ""]
        if timed:
            parts.append(f"{mode} " + " / ".join(timed) + " ms")
    errors = [f"{r['provider']} {r['mode']}: {r['error']}" for r in rows if r["error"]]
    label = shape_label(rows[0]) if rows else label
    line = f"[{i}/{n}] {op} {dtype_name(dtype)} {label} ({seconds:.1f} s): " + "; ".join(parts)
    return line + (f"; {len(errors)} errors, first: {errors[0]}" if errors else "")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


# ----------------------------------------------------------------------------- providers

@dataclass(frozen=True)
class Provider:
    """`backend` is the ops' backend= argument; `compiled` runs the call under
    torch.compile(dynamic=False)."""
    name: str
    backend: str
    compiled: bool = False


PROVIDERS = {p.name: p for p in (
    Provider("reference", "reference"),
    Provider("compiled", "reference", compiled=True),
    Provider("triton", "triton"),
    Provider("cuda", "cuda"),          # the C++ extension (csrc/); see available_providers
)}


def available_providers(requested: Optional[Sequence[str]], device: torch.device) -> List[str]:
    """The providers to run: `requested` as given (an unavailable one fails loudly later, in its
    rows), or by default all, less "cuda" where the extension cannot be had (said on stderr)."""
    if requested is not None:
        return list(requested)
    names = list(PROVIDERS)
    from mos_kernels.backend import cuda_emulating, cuda_ext_reason
    reason = cuda_ext_reason() if device.type == "cuda" or cuda_emulating() else "a CPU run without MOS_CUDA_EMULATE=1"
    if reason is not None:
        print(f"provider 'cuda' skipped: {reason}", file=sys.stderr)
        names.remove("cuda")
    return names


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    """One op at one shape and dtype.

    run(backend, *inputs) returns a tuple of tensors. Inputs listed in grad_inputs become leaves
    that require grad (the forward is timed as in training); a case without them is forward-only.
    bytes/flops hold the "fwd" and "bwd" floors; "fwd+bwd" is their sum.
    """
    op: str
    kernels: Tuple[str, ...]                  # the mos_kernels ops it calls (keys of backend.IMPLEMENTED)
    run: Callable[..., Tuple[torch.Tensor, ...]]
    inputs: Tuple[torch.Tensor, ...]
    dtype: torch.dtype
    shape: Dict[str, int]                     # SHAPE_COLUMNS
    bytes: Dict[str, int]
    flops: Dict[str, int] = field(default_factory=dict)
    grad_inputs: Tuple[int, ...] = ()
    grad_outputs: Tuple[int, ...] = ()         # outputs that receive a cotangent
    checked_outputs: Tuple[int, ...] = (0,)    # outputs compared with the eager reference (max_err)
    launch_bound: bool = False                 # many small launches: also time a CUDA-graph replay

    def __post_init__(self):
        unknown = set(self.shape) - set(SHAPE_COLUMNS)
        if unknown:
            raise ValueError(f"shape: expected keys among {list(SHAPE_COLUMNS)}, got extra {sorted(unknown)}")
        self.inputs = tuple(x.detach().requires_grad_(i in self.grad_inputs) for i, x in enumerate(self.inputs))

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device

    @property
    def modes(self) -> Tuple[str, ...]:
        return MODES if self.grad_inputs else ("fwd",)

    def per_mode(self, table: Dict[str, int], mode: str) -> Optional[int]:
        if mode == "fwd+bwd":
            return table["fwd"] + table["bwd"] if "fwd" in table and "bwd" in table else None
        return table.get(mode)

    def supports(self, provider: Provider) -> bool:
        return all(provider.backend in IMPLEMENTED[k] for k in self.kernels)


def provider_callable(case: Case, provider: Provider, compile_backend: str = "inductor") -> Callable:
    def call(*inputs):
        # Kernels are timed without the ops' data checks (a NaN scan and a sync each), for
        # every provider alike; under torch.compile they are skipped anyway.
        with mk.data_checks(False):
            return case.run(provider.backend, *inputs)
    if not provider.compiled:
        return call
    # Every case compiles `call` anew; without a reset dynamo would count each case as a
    # recompile of the same code and silently fall back to eager past its recompile limit.
    torch._dynamo.reset()
    return torch.compile(call, dynamic=False, backend=compile_backend)


def cotangents(case: Case, outputs: Sequence[torch.Tensor], seed: int = 0) -> List[torch.Tensor]:
    """One fixed random cotangent per grad output, the same for every provider."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    return [torch.randn(outputs[i].shape, generator=gen, device=case.device).to(outputs[i].dtype)
            for i in case.grad_outputs]


def mode_callable(case: Case, fn: Callable, mode: str, outputs: Optional[Sequence[torch.Tensor]] = None) -> Callable:
    """What is timed for `mode`: "fwd" returns the outputs; "bwd" differentiates `outputs`
    (a forward already run, graph kept) and returns the gradients; "fwd+bwd" returns both."""
    inputs = case.inputs
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode not in case.modes:
        raise ValueError(f"mode: expected one of {list(case.modes)} for {case.op}, got {mode!r}")
    leaves = [inputs[i] for i in case.grad_inputs]
    if outputs is None:
        outputs = fn(*inputs)
    grads = cotangents(case, outputs)
    if mode == "bwd":
        differentiated = [outputs[i] for i in case.grad_outputs]
        return lambda: torch.autograd.grad(differentiated, leaves, grads, retain_graph=True)

    def forward_backward():
        out = fn(*inputs)
        return out, torch.autograd.grad([out[i] for i in case.grad_outputs], leaves, grads)
    return forward_backward


def max_error(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], indices: Sequence[int]) -> float:
    """max |out - ref| / max |ref| over the checked outputs (0: identical; inf: shapes differ)."""
    worst = 0.0
    for i in indices:
        a, b = outputs[i].detach(), reference[i].detach()
        if a.shape != b.shape:
            return math.inf
        if b.numel() == 0:
            continue
        wide = torch.float32 if b.dtype.is_floating_point else torch.float64   # indices stay exact
        a, b = a.to(wide), b.to(wide)
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)))
    return worst


# ----------------------------------------------------------------------------- timing

def _quantile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (as triton.testing does)."""
    ordered = sorted(samples)
    point = q * (len(ordered) - 1)
    lo, hi = math.floor(point), math.ceil(point)
    return ordered[lo] + (point - lo) * (ordered[hi] - ordered[lo])


@dataclass(frozen=True)
class Timer:
    """(median, p20, p80) in ms. CUDA: do_bench (L2 flushed before every call); CPU: one warm-up
    call, then perf_counter over `cpu_reps` calls (smoke runs only: the numbers mean nothing)."""
    rep_ms: float = 50.0
    warmup_ms: float = 25.0
    cpu_reps: int = 3

    def method(self, device: torch.device) -> str:
        if device.type == "cuda":
            return f"do_bench(warmup={self.warmup_ms:g}ms, rep={self.rep_ms:g}ms, L2 flushed)"
        return f"perf_counter(median of {self.cpu_reps})"

    def __call__(self, fn: Callable, device: torch.device) -> Tuple[float, float, float]:
        if device.type == "cuda":
            median, p20, p80 = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                                       quantiles=[0.5, 0.2, 0.8], return_mode="median")
            return median, p20, p80
        fn()
        times = []
        for _ in range(self.cpu_reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return _quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- environment

def measure_copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """B/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median_ms = timer(lambda: dst.copy_(src), device)[0]
    del src, dst
    free_memory(device)
    return 2 * 2 ** 30 / (median_ms * 1e-3)


def peak_bandwidth(device: torch.device, timer: Timer) -> Tuple[Optional[float], str]:
    if device.type != "cuda":
        return None, "none (cpu)"
    name = torch.cuda.get_device_name(device)
    for key, bandwidth in PEAK_BANDWIDTH:
        if key in name and "PCIe" not in name:
            return bandwidth, f"table ({key})"
    return measure_copy_bandwidth(device, timer), "measured (1 GiB device copy)"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


@dataclass(frozen=True)
class Environment:
    card: str
    device: str
    peak_bw: Optional[float]
    peak_source: str
    timing: str
    date: str
    torch: str
    triton: str
    python: str
    git_commit: str
    note: str

    @classmethod
    def detect(cls, device: torch.device, timer: Timer) -> "Environment":
        peak, source = peak_bandwidth(device, timer)
        notes = []
        if device.type != "cuda":
            notes.append("cpu: timings not meaningful")
        if os.environ.get("MOS_POISON_OUTPUTS", "0") == "1":
            notes.append("MOS_POISON_OUTPUTS=1: kernel outputs NaN-filled before every call")
        return cls(card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   device=str(device), peak_bw=peak, peak_source=source, timing=timer.method(device),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                   git_commit=git_commit(), note="; ".join(notes))


# ----------------------------------------------------------------------------- rows

def make_row(env: Environment, *, op: str, provider: str, mode: str, dtype: torch.dtype,
             shape: Dict[str, int], **values) -> Dict[str, object]:
    row: Dict[str, object] = dict.fromkeys(COLUMNS, "")
    row.update(op=op, provider=provider, mode=mode, dtype=dtype_name(dtype), **shape)
    row.update({k: getattr(env, k) for k in ("card", "device", "peak_source", "timing", "date", "torch",
                                              "triton", "python", "git_commit", "note")})
    row["peak_bw"] = "" if env.peak_bw is None else env.peak_bw
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"values: expected columns among COLUMNS, got extra {sorted(unknown)}")
    row.update(values)
    return row


def _case_row(env: Environment, case: Case, provider: Provider, mode: str, **values) -> Dict[str, object]:
    return make_row(env, op=case.op, provider=provider.name, mode=mode, dtype=case.dtype, shape=case.shape, **values)


def _timing_values(case: Case, mode: str, env: Environment, median: float, p20: float, p80: float) -> Dict[str, object]:
    moved, flops = case.per_mode(case.bytes, mode), case.per_mode(case.flops, mode)
    values: Dict[str, object] = dict(median_ms=median, p20_ms=p20, p80_ms=p80)
    seconds = median * 1e-3
    floors = []
    if moved is not None:
        values.update(bytes=moved, gbps=moved / seconds / 1e9 if seconds > 0 else "")
        if env.peak_bw:
            floors.append(moved / env.peak_bw * 1e3)
    if flops:
        values.update(flops=flops, tflops=flops / seconds / 1e12 if seconds > 0 else "")
        peak_flops = peak_half_flops(env.card) if case.dtype in (torch.bfloat16, torch.float16) else None
        if peak_flops:
            floors.append(flops / peak_flops * 1e3)
    if floors:
        # The binding floor: whichever of moving the bytes and doing the FLOPs takes longer.
        floor_ms = max(floors)
        values.update(floor_ms=floor_ms, pct_floor=100.0 * floor_ms / median if median > 0 else "")
    return values


def peak_half_flops(card: str) -> Optional[float]:
    for key, rate in PEAK_HALF_FLOPS:
        if key in card and "PCIe" not in card:
            return rate
    return None


def run_case(case: Case, providers: Sequence[Provider], env: Environment, timer: Timer, *,
             compile_backend: str = "inductor",
             emit: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Time `case` under every provider it supports and every mode it has; errors (compile
    failures, OOM, ...) become rows with the `error` column set. The eager reference runs first:
    max_err and the speedups are relative to it. `emit` gets each provider's rows as soon as they
    are timed (a run cut short keeps them), with the speedups over the providers timed before it."""
    rows: List[Dict[str, object]] = []
    reference_outputs = None
    for provider in sorted(providers, key=lambda p: p.name != "reference"):
        if not case.supports(provider):
            continue
        provider_rows, outputs = _run_provider(case, provider, env, timer, compile_backend, reference_outputs)
        reference_outputs = outputs if outputs is not None else reference_outputs
        rows.extend(provider_rows)
        add_speedups(rows)
        if emit is not None:
            emit(provider_rows)
    return rows


def _run_provider(case: Case, provider: Provider, env: Environment, timer: Timer, compile_backend: str,
                  reference_outputs) -> Tuple[List[Dict[str, object]], Optional[Tuple[torch.Tensor, ...]]]:
    """The rows of one provider (one per mode) and, for the reference, its detached outputs (the
    others' are freed before the next provider runs)."""
    try:
        fn = provider_callable(case, provider, compile_backend)
        start = time.perf_counter()
        outputs = fn(*case.inputs)
        synchronize(case.device)
        first_call_s = time.perf_counter() - start
        max_err: object = ""
        if provider.name == "reference":
            max_err = 0.0
        elif reference_outputs is not None:
            max_err = max_error(outputs, reference_outputs, case.checked_outputs)
    except Exception as exc:   # a failed compile or launch must not end the run
        free_memory(case.device)
        return [_case_row(env, case, provider, mode, error=describe_error(exc)) for mode in case.modes], None
    rows = []
    for mode in case.modes:
        values: Dict[str, object] = dict(first_call_s=first_call_s, max_err=max_err)
        try:
            timed = mode_callable(case, fn, mode, outputs)
            values.update(_timing_values(case, mode, env, *timer(timed, case.device)))
            if case.launch_bound:
                graph_ms, graph_note = graph_time(timed, case.device, timer)
                values.update(graph_ms="" if graph_ms is None else graph_ms, graph_note=graph_note)
        except Exception as exc:
            values["error"] = describe_error(exc)
            free_memory(case.device)
        rows.append(_case_row(env, case, provider, mode, **values))
    detached = tuple(o.detach() for o in outputs) if provider.name == "reference" else None
    del fn, outputs
    if provider.compiled:
        torch._dynamo.reset()
    return rows, detached
