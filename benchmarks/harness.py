"""The benchmark harness every kernel benchmark shares.

Owns: `Case` (one op at one shape and dtype: its inputs, how to run it with a given backend, and
the minimum bytes / FLOPs each mode must move), `Provider` (how a case is run: the reference
eager, the reference under torch.compile, Triton; a new backend is one line in PROVIDERS), and
`run_case`, which times a case under each provider (the timer, the peak-bandwidth table behind
"% of floor" and the rows' stamp of card, date, versions and commit: benchmarks/machine.py; a
CUDA-graph replay beside it for launch-bound cases: benchmarks/cuda_graph.py) into rows (their
CSV and tables: benchmarks/tables.py). A benchmark module only builds cases and calls
`run_case`; see benchmarks/README.md for what every column means.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import mos_kernels as mk
from benchmarks.cuda_graph import graph_time
from benchmarks.machine import Environment, Timer, free_memory, peak_half_flops, synchronize
from benchmarks.tables import COLUMNS, MODES, SHAPE_COLUMNS, add_speedups, describe_error, shape_label
from mos_kernels.backend import IMPLEMENTED

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}



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
