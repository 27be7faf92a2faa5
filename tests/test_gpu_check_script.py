"""scripts/gpu_check.sh on the CPU: its deadline, its summary, and that no step runs untimed.

A fake `python` (PYTHON=...) stands in for every command the script runs: it records its
arguments and its parent process (which must be `timeout`: a step outside one could outlast the
deadline), answers at once, or, for the phase named in FAKE_SLOW, sleeps until a SIGINT, or fails
for the phase named in FAKE_FAIL. Only `benchmarks.summarize` runs for real, on rows written here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # `benchmarks` is not an installed package

from benchmarks import harness, machine, tables  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform != "linux",
                                reason="the fake python reads its parent from /proc")

FAKE_PYTHON = """#!/usr/bin/env bash
echo "parent=$(cat /proc/$PPID/comm) args=$*" >> "$FAKE_LOG"
case "$*" in
  *benchmarks.summarize*) exec "$REAL_PYTHON" "$@" ;;
esac
if [ -n "${FAKE_SLOW:-}" ] && [[ "$*" == *"$FAKE_SLOW"* ]]; then
  sleep 1000 & pid=$!
  trap 'kill $pid; echo "fake: SIGINT in $FAKE_SLOW"; exit 130' INT
  wait $pid
fi
if [ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"$FAKE_FAIL"* ]]; then echo "fake: failing"; exit 3; fi
[[ "$*" == *pytest* ]] && echo "==== 3 passed, 1 skipped in 0.5s ===="
echo "fake: $*"
"""


def _rows():
    env = machine.Environment(card="NVIDIA H200", device="cuda", peak_bw=4.3e12, peak_source="table", timing="t",
                              date="d", torch="t", triton="t", python="p", git_commit="unknown", note="")
    shape = dict(B=256, L=1000, T=256000, S=32000, rows=256000, d=64, K=8, top_k=1)
    return [harness.make_row(env, op="layer", provider=p, mode="fwd+bwd", dtype=torch.bfloat16, shape=shape,
                             median_ms=ms) for p, ms in (("reference", 40.0), ("triton", 4.0))]


def _run(tmp_path, *, deadline=480, slow="", fail="", min_phase=15, popen=False):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    tables.append_csv(out / "bench_attention.csv", _rows())   # what an earlier phase measured
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_LOG=str(tmp_path / "calls.log"),
               FAKE_SLOW=slow, FAKE_FAIL=fail, MOS_GPU_DEADLINE=str(deadline), MOS_MIN_PHASE=str(min_phase),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)]
    if popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_interruptible), out
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=deadline + 60)
    return done, out, time.monotonic() - start


def _interruptible():
    """In the child before exec: SIGINT as a user's shell gives it (default action, not blocked).
    A test runner's worker may ignore or block it, and bash cannot trap a signal ignored on entry;
    then the script never sees the test's SIGINT (seen in full-suite runs under pytest-xdist)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _calls(tmp_path):
    return (tmp_path / "calls.log").read_text().splitlines()


def _assert_summarized(printed: str, out: Path):
    last = printed.strip().splitlines()[-1]
    assert last.startswith("summary: 2 rows"), f"expected the summary last, got {last!r}"
    assert (out / "summary.txt").read_text().strip().splitlines()[-1] == last
    assert "layer fwd+bwd bf16" in printed, "expected the short table of the rows already measured"


def test_cut_run_keeps_its_deadline_summarizes_and_times_every_step(tmp_path):
    done, out, seconds = _run(tmp_path, deadline=50, slow="bench_attention", min_phase=5)
    phases = (out / "phases.log").read_text()
    assert done.returncode == 0, f"a cut phase is no failure: {done.stdout[-2000:]}"
    assert seconds < 50, f"the run took {seconds:.1f} s of its 50 s deadline"
    assert "attention: cut at its budget (rc=124)" in phases
    for later in ("kernels", "tests_gpu", "tests_attention", "compiled", "compiled_kernels", "tests"):
        assert f"\n{later}: skipped" in phases, f"{later} should be skipped past the deadline:\n{phases}"
    assert "fake: SIGINT in bench_attention" in (out / "run.log").read_text(), "the phase must get SIGINT first"
    calls = _calls(tmp_path)
    assert any("benchmarks.summarize" in c for c in calls)
    assert all(c.startswith("parent=timeout ") for c in calls), f"an untimed step: {calls}"
    _assert_summarized(done.stdout, out)
    assert len(list(out.iterdir())) <= 8, "a GPU run brings back at most 8 files"


def test_full_run_order_failures_and_test_selection(tmp_path):
    done, out, _ = _run(tmp_path, fail="bench_kernels")
    phases = (out / "phases.log").read_text()
    assert done.returncode == 1, "a failed phase fails the check"
    assert "kernels: rc=3" in phases and "attention: rc=0" in phases
    assert "tests_gpu: rc=0" in phases and "tests_attention: rc=0" in phases
    assert "3 passed, 1 skipped" in phases, "pytest's counts are logged"
    assert "extension not ready" in phases
    calls = [c.split(" args=")[1] for c in _calls(tmp_path)]
    # (tmp_path holds "pytest" too: the module names are matched after -m)
    order = [next(name for name in ("ceilings", "cuda_ops", "bench_attention", "bench_kernels", "pytest",
                                    "summarize") if f"-m {name}" in c or f".{name}" in c) for c in calls]
    assert order.count("cuda_ops") == 1, "one build, in the background (its place in the log is a race)"
    foreground = [name for name in order if name != "cuda_ops"]
    assert foreground == ["ceilings", "bench_attention", "bench_kernels", "pytest", "pytest", "bench_attention",
                          "bench_kernels", "pytest", "summarize"], foreground
    attention = [c for c in calls if "bench_attention" in c]
    assert "compiled" not in attention[0] and "compiled_fused,compiled" in attention[1], "torch.compile last"
    tests = [c for c in calls if "-m pytest" in c]
    assert len(tests) == 3, tests
    # GPU scale by marker, out of every op's file and the layer's
    assert " -m gpu tests/ops tests/test_layer_backends.py" in tests[0], tests[0]
    kernel_tests, rest = tests[1].split(), tests[2].split()
    assert "tests/ops/test_expert_target_attention.py" in kernel_tests and "tests/test_layer_backends.py" in \
        kernel_tests, "the attention kernels and the layer on every backend in the guaranteed part"
    # Each test once: the `gpu` ones in the first phase, the other ones of the attention files and
    # the layer's in the second, the rest of tests/ops in the last.
    assert " -m not gpu " in tests[1] and " -m not gpu " in tests[2]
    assert "--ignore=tests/ops/test_expert_target_attention.py" in rest and rest[-1] == "tests/ops", "not twice"
    assert "tests/test_layer_backends.py" not in rest and "tests/ops" not in kernel_tests
    # The lab's training on the GPU, which needs no extension: nothing in its path matches the
    # `-k "not cuda"` that deselects the extension's tests here.
    assert "tests/test_train_gpu.py" in rest and "not cuda" in tests[2] and "cuda" not in "tests/test_train_gpu.py"
    assert all("not cuda" in c and "install" not in c for c in tests), "no extension: its tests deselected"
    assert not any("pip" in c for c in calls), "the check installs nothing"
    _assert_summarized(done.stdout, out)


def test_interrupted_run_still_summarizes(tmp_path):
    process, out = _run(tmp_path, slow="bench_attention", popen=True)
    deadline = time.monotonic() + 60
    calls = tmp_path / "calls.log"
    # Interrupt the phase once its command runs (the fake logs its call first), not while the
    # script is still between the phase's header line and its `wait`.
    while "bench_attention" not in (calls.read_text() if calls.exists() else ""):
        assert time.monotonic() < deadline and process.poll() is None, "the attention phase never started"
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    printed, _ = process.communicate(timeout=60)
    phases = (out / "phases.log").read_text()
    assert process.returncode == 130
    assert "interrupted" in phases and "the running phase: stopped" in phases
    _assert_summarized(printed, out)
