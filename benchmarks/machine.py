"""The machine a benchmark runs on: how it is timed and what its floors are.

`Timer` times a call (do_bench with the L2 flushed on CUDA, perf_counter on a CPU);
`Environment` is what every row is stamped with: the card, its peak bandwidth (the table below
or a measured copy), the timing method, the date, the versions and the commit.

L2 cache: on CUDA, `triton.testing.do_bench` zeroes a 256 MB buffer before every timed call
(over 4x the 50 MB L2 of an H100 and the 60 MB of an H200), so every call starts cold and inputs
are not rotated.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.testing

# Device-to-device copy bandwidth measured on the project's machines, B/s.
# Matched against torch.cuda.get_device_name; any other card (H100 PCIe included, whose HBM is
# slower) gets a measured 1 GiB copy instead.
PEAK_BANDWIDTH = (("H200", 4.3e12), ("H100", 3.0e12))
# Dense bf16/fp16 tensor-core rate measured on the same machines, FLOP/s: the
# FLOP floor of a half-precision case that counts its FLOPs. fp32 cases have only the byte floor.
PEAK_HALF_FLOPS = (("H200", 8.0e14), ("H100", 8.0e14))


def peak_half_flops(card: str) -> Optional[float]:
    for key, rate in PEAK_HALF_FLOPS:
        if key in card and "PCIe" not in card:
            return rate
    return None


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
