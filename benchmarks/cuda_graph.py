"""CUDA-graph replay timing: the device-only time of a call, beside do_bench's.

do_bench times each call between two events on the stream. When the host takes longer to issue
a call's kernels than the device takes to run them (many small launches, Python autograd glue),
the stream idles between kernels and do_bench measures the host. A CUDA graph issues all the
recorded kernels at once, so its replay time is the device's work with the launch gaps gone;
the difference between the two columns is the host overhead. Capture fails on anything that
waits for the host (`.item()`, `nonzero`, a data check): the row then says why instead of a time.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from benchmarks.tables import describe_error

CPU_REASON = "cpu: CUDA graphs need a CUDA device"
WARMUP_CALLS = 2


def capture(fn: Callable, device: torch.device) -> "torch.cuda.CUDAGraph":
    """A graph of one call of `fn`. Warm-up calls run on a side stream first, as torch asks:
    they allocate the autograd and allocator state that a capture must not create."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _settle(device: torch.device) -> str:
    """After a failed capture: wait for the device, so the next timing starts clean; says if that failed."""
    try:
        torch.cuda.synchronize(device)
    except Exception as exc:   # a broken context would spoil every later row: say so in this one
        return f"; synchronize after it failed: {describe_error(exc)}"
    return ""


def graph_time(fn: Callable, device: torch.device, timer: Callable) -> Tuple[Optional[float], str]:
    """(median ms of replaying a graph of `fn` under `timer`, "") or (None, why there is none).
    `timer(fn, device)` returns (median, p20, p80): the same do_bench settings as the row's."""
    if device.type != "cuda":
        return None, CPU_REASON
    try:
        graph = capture(fn, device)
    except Exception as exc:
        return None, f"graph capture failed: {describe_error(exc)}" + _settle(device)
    try:
        return timer(graph.replay, device)[0], ""
    except Exception as exc:
        return None, f"graph replay failed: {describe_error(exc)}" + _settle(device)
    finally:
        del graph
