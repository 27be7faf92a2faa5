"""The harness's timing bookkeeping that a CPU can check: the CUDA-graph column (empty with its
reason on a CPU; a capture or replay failure becomes the reason, a replay's time the value), rows
emitted per provider as they are timed, the target-point plans and the machine probe.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `benchmarks` is not an installed package

from benchmarks import bench_attention, bench_kernels, ceilings, cuda_graph, harness, machine  # noqa: E402

CUDA = torch.device("cuda")   # a device object only: nothing below runs on it


def test_graph_time_on_cpu_is_empty_with_its_reason():
    assert cuda_graph.graph_time(lambda: None, torch.device("cpu"), machine.Timer()) == (None, cuda_graph.CPU_REASON)


def test_graph_time_replays_what_it_captured(monkeypatch):
    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    monkeypatch.setattr(cuda_graph, "capture", lambda fn, device: Graph())

    def timer(fn, device):
        fn()
        return 0.25, 0.2, 0.3

    assert cuda_graph.graph_time(lambda: None, CUDA, timer) == (0.25, "")
    assert replays == [1], "the timer must time the graph's replay"


def test_graph_capture_failure_is_the_reason(monkeypatch):
    def capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    monkeypatch.setattr(cuda_graph, "capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    median, note = cuda_graph.graph_time(lambda: None, CUDA, machine.Timer())
    assert median is None
    assert note == "graph capture failed: RuntimeError: operation not permitted when stream is capturing"


def test_graph_replay_failure_says_so_and_that_the_device_is_unwell(monkeypatch):
    monkeypatch.setattr(cuda_graph, "capture", lambda fn, device: object())

    def broken_sync(device=None):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken_sync)
    median, note = cuda_graph.graph_time(lambda: None, CUDA, lambda fn, device: fn.replay())
    assert median is None and note.startswith("graph replay failed: AttributeError")
    assert note.endswith("synchronize after it failed: RuntimeError: an illegal memory access was encountered")


def test_rows_are_emitted_per_provider_with_the_speedups_known_then(device):
    case = bench_kernels.build_case("session_pool_route", bench_kernels.QUICK, torch.float32, device)
    timer = machine.Timer(rep_ms=5, warmup_ms=2, cpu_reps=1)
    env = machine.Environment.detect(device, timer)
    batches = []
    providers = [harness.PROVIDERS["triton"], harness.PROVIDERS["reference"]]
    rows = harness.run_case(case, providers, env, timer, emit=lambda batch: batches.append([dict(r) for r in batch]))
    assert [{r["provider"] for r in batch} for batch in batches] == [{"reference"}, {"triton"}], "reference first"
    assert [r["mode"] for r in batches[1]] == list(harness.MODES)
    assert all(r["speedup_vs_eager"] != "" for r in batches[1]), "the reference was timed before triton"
    assert [r["median_ms"] for batch in batches for r in batch] == [r["median_ms"] for r in rows]
    # session_pool_route is launch-bound: every row has the graph column, on a CPU empty with the reason.
    if device.type == "cpu":
        assert {(r["graph_ms"], r["graph_note"]) for r in rows} == {("", cuda_graph.CPU_REASON)}
    else:
        assert all(r["graph_ms"] != "" or r["graph_note"].startswith("graph ") for r in rows)


def test_target_plans():
    kernels = bench_kernels.plan(list(bench_kernels.OPS), ["bf16", "fp32"], quick=False, targets_only=True)
    assert kernels == [(op, bench_kernels.TARGET, dt) for dt in (torch.bfloat16, torch.float32)
                       for op in bench_kernels.OPS]
    attention = bench_attention.plan(list(bench_attention.OPS), ["bf16"], quick=False, targets_only=True)
    assert [(op, shape.L) for op, shape, _ in attention] == \
        [(op, 1000) for op in bench_attention.OPS if op not in bench_attention.TRANSFORMERS] + \
        [(op, 4096) for op in bench_attention.TRANSFORMERS]
    full = bench_attention.plan(list(bench_attention.OPS), ["bf16"], quick=False)
    assert full[:len(attention)] == attention, "the full plan starts with the target cases"
    assert bench_attention.OP_PROVIDERS["layer"][-2:] == ("compiled_fused", "compiled"), "torch.compile last"


def test_machine_probe_on_this_machine(capsys):
    found = ceilings.features()
    assert set(found) == {"torch.nn.functional.grouped_mm", "torch._grouped_mm", "torch.nn.attention.varlen.varlen_attn",
                          "torch.nn.attention.flex_attention.flex_attention"}
    assert found["torch._grouped_mm"] == hasattr(torch, "_grouped_mm")
    if torch.cuda.is_available():
        pytest.skip("measures the ceilings on a GPU: the GPU check runs it")
    assert ceilings.main() == 0
    printed = capsys.readouterr().out
    assert f"torch {torch.__version__}" in printed and printed.strip().endswith("ceilings: not measured (no CUDA device)")
