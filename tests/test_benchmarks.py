"""The benchmarks as smoke tests: the cases of benchmarks/bench_kernels.py (one per op) at the --quick
size through pytest-benchmark (CI passes --benchmark-disable, so each runs once) with the
results checked against the reference, then the whole `bench_kernels --quick` run (CSV columns,
tables), then the harness's bookkeeping (CSV header, speedups, targets, failed compiles).

On the CPU the Triton provider runs under TRITON_INTERPRET=1 (tests/conftest.py) in fp32,
because the interpreter cannot do bf16 arithmetic.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `benchmarks` is not an installed package

from mos_kernels.backend import IMPLEMENTED  # noqa: E402
from benchmarks import bench_kernels, harness, machine, tables  # noqa: E402
from conftest import require_cuda_ext  # noqa: E402
from tolerances import assert_close  # noqa: E402

# Tolerance kinds (tests/tolerances.py) of every output, then of every input gradient.
KINDS = {
    # pooled (a mean), gate (exactly 1), probs and scores (cosine / temperature), themes
    "session_pool_route": (("reduction", "exact", "attention", "attention", "exact"),
                           ("attention_grad", "attention_grad")),
    # rows, gather_index, inverse_index, theme_offsets: data movement
    "theme_dispatch": (("exact",) * 4, ()),
    # gather moves rows; its backward sums top_k rows per token
    "theme_gather": (("exact",), ("reduction",)),
    "theme_scatter": (("reduction",), ("exact",)),
    # h, then grad a and grad b: sums in another order than the reference's chunked scan
    "linear_recurrence": (("reduction",), ("reduction", "reduction")),
    # y, then the gradients of u, delta, A, B, C: scans and sums in another order
    "selective_scan": (("reduction",), ("reduction",) * 5),
}


def _has(op: str, provider: str) -> bool:
    """Whether the op's case runs under the provider (an op without a CUDA C++ kernel does not)."""
    return harness.PROVIDERS[provider].backend in IMPLEMENTED[op]


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP's spinning makes tiny ops take 100 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same(actual, expected, kind: str, msg: str) -> None:
    if expected.dtype.is_floating_point:
        assert_close(actual, expected, kind, msg=msg)
    else:
        assert torch.equal(actual, expected), f"{msg}: integer outputs differ"


def _split(result, mode: str):
    return result if mode == "fwd+bwd" else (result, ())


@pytest.mark.parametrize("op, provider", [(op, provider) for op in bench_kernels.OPS
                                           for provider in ("reference", "triton", "cuda") if _has(op, provider)])
def test_kernel_case_matches_reference(benchmark, op, provider, device, one_thread):
    if provider == "cuda":
        require_cuda_ext()
    case = bench_kernels.build_case(op, bench_kernels.QUICK, torch.float32, device)
    mode = case.modes[-1]   # forward and backward, or the forward of an integer op
    timed = harness.mode_callable(case, harness.provider_callable(case, harness.PROVIDERS[provider]), mode)
    outputs, grads = _split(benchmark.pedantic(timed, rounds=3, warmup_rounds=1), mode)
    reference = harness.provider_callable(case, harness.PROVIDERS["reference"])
    expected, expected_grads = _split(harness.mode_callable(case, reference, mode)(), mode)
    output_kinds, grad_kinds = KINDS[op]
    assert len(outputs) == len(expected) == len(output_kinds)
    for i, (a, e, kind) in enumerate(zip(outputs, expected, output_kinds)):
        _assert_same(a.detach(), e.detach(), kind, f"{op} output {i}")
    assert len(grads) == len(expected_grads) == len(grad_kinds)
    for i, (a, e, kind) in enumerate(zip(grads, expected_grads, grad_kinds)):
        _assert_same(a, e, kind, f"{op} gradient of input {case.grad_inputs[i]}")


def test_quick_shapes_are_realistic_and_tiny(device):
    batch = bench_kernels.build_batch(bench_kernels.QUICK, torch.float32, device)
    lengths = (batch.offsets[1:] - batch.offsets[:-1]).cpu()
    assert (lengths == 0).any(), "expected an empty history among the examples"
    assert 0 < batch.values.shape[0] <= 512
    assert batch.dispatch.gather_index.numel() == batch.values.shape[0] * bench_kernels.QUICK.top_k


def test_bench_kernels_quick_run(tmp_path, capsys, device, one_thread):
    argv = ["--out", str(tmp_path), "--quick", "--device", device.type, "--dtype", "fp32",
            "--compile-backend", "eager", "--cpu-reps", "1", "--rep-ms", "5", "--warmup-ms", "2"]
    assert bench_kernels.main(argv) == 0
    printed = capsys.readouterr()
    with (tmp_path / "bench_kernels.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(harness.COLUMNS)
        rows = list(reader)
    assert [r for r in rows if r["error"]] == []
    expected = {(op, p, m) for op in bench_kernels.OPS for p in harness.PROVIDERS if _has(op, p)
                for m in (("fwd",) if op == "theme_dispatch" else harness.MODES)}
    assert {(r["op"], r["provider"], r["mode"]) for r in rows} == expected
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["bytes"]) > 0
        assert float(r["max_err"]) <= 1e-3, f"{r['op']} {r['provider']}: max_err {r['max_err']}"
        assert r["torch"] == torch.__version__ and r["date"] and r["git_commit"]
        if device.type == "cpu":
            assert r["card"] == "cpu" and "not meaningful" in r["note"] and r["pct_floor"] == ""
        else:
            assert float(r["pct_floor"]) > 0
    assert "x compiled" in printed.out and "% floor" in printed.out
    assert "Targets at" in printed.out and all(t.label in printed.out for t in bench_kernels.TARGETS)
    if device.type == "cpu":
        assert "not meaningful" in printed.out
    assert printed.err.count("[") >= len(bench_kernels.OPS), "expected one progress line per case"


# ----------------------------------------------------------------------------- harness bookkeeping

def _row(op="theme_gather", **values):
    env = machine.Environment(card="cpu", device="cpu", peak_bw=None, peak_source="none", timing="t", date="d",
                              torch="t", triton="t", python="p", git_commit="unknown", note="")
    shape = dict(B=1, L=2, T=3, S=1, rows=3, d=4, K=2, top_k=1)
    return harness.make_row(env, op=op, provider="triton", mode="fwd", dtype=torch.float32, shape=shape,
                            **values)


def test_append_csv_writes_the_header_once_and_spares_other_files(tmp_path):
    path = tmp_path / "out.csv"
    tables.append_csv(path, [_row(median_ms=1.0)])
    tables.append_csv(path, [_row(median_ms=2.0), _row(error="OutOfMemoryError: boom")])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(harness.COLUMNS) and len(lines) == 4
    other = tmp_path / "old.csv"
    other.write_text("a,b\n1,2\n")
    written = tables.append_csv(other, [_row(median_ms=1.0)])
    assert other.read_text() == "a,b\n1,2\n" and written != other
    assert written.read_text().splitlines()[0] == ",".join(harness.COLUMNS)


def test_targets_pass_and_miss():
    rows = [_row(median_ms=1.0, pct_floor=75.0), _row(op="theme_scatter", median_ms=1.0, pct_floor=50.0)]
    targets = [tables.Target("g", "theme_gather", "fwd", "triton", "pct_floor", 70.0),
               tables.Target("s", "theme_scatter", "fwd", "triton", "pct_floor", 70.0),
               tables.Target("x", "theme_dispatch", "fwd", "triton", "speedup_vs_eager", 5.0)]
    results = tables.evaluate_targets(rows, targets, {"dtype": "fp32", "d": 4})
    assert [(value, status) for _, value, status in results] == [(75.0, "PASS"), (50.0, "MISS"), (None, "MISS")]
    assert [status for *_, status in tables.evaluate_targets(rows, targets[:1], {"d": 8})] == ["MISS"]


def test_failed_compile_is_a_row_not_a_crash(device, one_thread):
    case = bench_kernels.build_case("theme_gather", bench_kernels.QUICK, torch.float32, device)
    timer = machine.Timer(rep_ms=5, warmup_ms=2, cpu_reps=1)
    env = machine.Environment.detect(device, timer)
    providers = [harness.PROVIDERS["compiled"], harness.PROVIDERS["reference"]]
    rows = harness.run_case(case, providers, env, timer, compile_backend="no_such_backend")
    by_provider = {(r["provider"], r["mode"]): r for r in rows}
    assert set(by_provider) == {(p, m) for p in ("reference", "compiled") for m in harness.MODES}
    for mode in harness.MODES:
        assert by_provider[("compiled", mode)]["error"] and by_provider[("compiled", mode)]["median_ms"] == ""
        reference = by_provider[("reference", mode)]
        assert reference["error"] == "" and reference["speedup_vs_eager"] == 1.0
        assert reference["speedup_vs_compiled"] == ""
