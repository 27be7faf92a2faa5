"""benchmarks/bench_attention.py as a smoke test: the whole --quick run (every op and provider
the device has, rows checked against the reference), the plan of the full run, and the ratio
targets of the harness (speedup over another provider or op, at another point).

On the CPU the Triton provider runs under TRITON_INTERPRET=1 (tests/conftest.py) in fp32.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `benchmarks` is not an installed package

from benchmarks import bench_attention, cuda_graph, harness, machine, tables  # noqa: E402


def test_bench_attention_quick_run(tmp_path, capsys, device):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--out", str(tmp_path), "--quick", "--device", device.type, "--dtype", "fp32",
                "--compile-backend", "eager", "--cpu-reps", "1", "--rep-ms", "5", "--warmup-ms", "2"]
        assert bench_attention.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    with (tmp_path / "bench_attention.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r for r in rows if r["error"]] == []
    expected = {(op, p, m) for op in bench_attention.OPS for p in bench_attention.OP_PROVIDERS[op]
                for m in harness.MODES if not (p in bench_attention.CUDA_ONLY and device.type != "cuda")}
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == expected
    for r in rows:
        assert float(r["median_ms"]) > 0
        if r["max_err"] != "":   # compared with the eager reference of the same case
            assert float(r["max_err"]) <= 1e-4, f"{r['op']} {r['provider']}: max_err {r['max_err']}"
    launch_bound = {"layer", "mos_transformer"}
    for r in rows:   # the CUDA-graph column: launch-bound cases only, on a CPU empty with the reason
        if r["op"] in launch_bound and device.type == "cpu":
            assert (r["graph_ms"], r["graph_note"]) == ("", cuda_graph.CPU_REASON), r
        elif r["op"] not in launch_bound:
            assert (r["graph_ms"], r["graph_note"]) == ("", ""), r
    attention = [r for r in rows if r["op"] == "jagged_self_attention" and r["mode"] == "fwd"]
    assert all(int(r["flops"]) > 0 for r in attention), "self-attention rows carry the jagged FLOP count"
    assert "Targets at" in printed.out and all(t.label in printed.out for t in bench_attention.TARGETS)
    assert "TFLOP/s" in printed.out


def test_full_plan_puts_the_targets_first():
    cases = bench_attention.plan(list(bench_attention.OPS), ["bf16", "fp16"], quick=False)
    first = [(op, shape.L) for op, shape, dtype in cases[:len(bench_attention.OPS)]]
    target_ops = [op for op in bench_attention.OPS if op not in ("mos_transformer", "dense_transformer")]
    assert first == [(op, 1000) for op in target_ops] + [("mos_transformer", 4096), ("dense_transformer", 4096)]
    assert max(shape.L for _, shape, _ in cases) == 8192
    assert len(cases) == len(set((op, shape, dtype) for op, shape, dtype in cases)), "a case planned twice"


def _row(op, provider, mode, median, **point):
    env = machine.Environment(card="cpu", device="cpu", peak_bw=None, peak_source="none", timing="t", date="d",
                              torch="t", triton="t", python="p", git_commit="unknown", note="")
    shape = dict(B=1, L=point.get("L", 2), T=3, S=1, rows=3, d=4, K=2, top_k=1)
    return harness.make_row(env, op=op, provider=provider, mode=mode, dtype=torch.float32, shape=shape,
                            median_ms=median)


def test_ratio_targets():
    rows = [_row("a", "triton", "fwd", 1.0), _row("a", "flex", "fwd", 1.5), _row("b", "sdpa", "fwd", 0.5, L=8),
            _row("c", "triton", "fwd", 1.0, L=8)]
    targets = [tables.Target("vs flex", "a", "fwd", "triton", "speedup", 1.2, versus=("a", "flex")),
               tables.Target("vs other op", "c", "fwd", "triton", "speedup", 1.0, versus=("b", "sdpa"), at=(("L", 8),)),
               tables.Target("missing", "a", "fwd", "triton", "speedup", 1.0, versus=("a", "nobody"))]
    results = tables.evaluate_targets(rows, targets, {"dtype": "fp32", "L": 2})
    assert [(value, status) for _, value, status in results] == [(1.5, "PASS"), (0.5, "MISS"), (None, "MISS")]
