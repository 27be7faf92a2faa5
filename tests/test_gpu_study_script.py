"""scripts/gpu_study.sh on the CPU: the commands it runs, its deadline and its exit status.

A fake `python` (PYTHON=...) stands in for `python -m mos profile`: it records its arguments and
its parent process (which must be `timeout`), answers at once and writes a finished run, or, for
the encoder named in FAKE_SLOW, sleeps until a SIGINT, or fails for the one in FAKE_FAIL. The
arguments themselves are checked against the real CLI with --print-config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform != "linux",
                                reason="the fake python reads its parent from /proc")

FAKE_PYTHON = """#!/usr/bin/env bash
echo "parent=$(cat /proc/$PPID/comm) args=$*" >> "$FAKE_LOG"
out=$(printf '%s\\n' "$@" | sed -n 's/^train.out_dir=//p')
if [ -n "${FAKE_SLOW:-}" ] && [[ "$*" == *"encoder=$FAKE_SLOW "* ]]; then
  sleep 1000 & pid=$!
  if [ -n "${FAKE_DEAF:-}" ]; then trap '' INT; else trap 'kill $pid; exit 130' INT; fi
  wait $pid
fi
if [ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"encoder=$FAKE_FAIL "* ]]; then echo "fake: failing"; exit 3; fi
mkdir -p "$out/runs" && echo '{}' > "$out/runs/backbone-0.json"
"""


def _run(tmp_path, *encoders, deadline=540, slow="", fail="", deaf=""):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(tmp_path / "calls.log"), FAKE_SLOW=slow, FAKE_FAIL=fail,
               MOS_STUDY_DEADLINE=str(deadline), MOS_MIN_STUDY="2", MOS_STUDY_GRACE="2", FAKE_DEAF=deaf)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_study.sh"), str(tmp_path / "out"), *encoders],
                          env=env, capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
    return done, calls


def test_each_encoder_gets_its_long_study_on_cuda_under_a_timeout(tmp_path):
    done, calls = _run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(calls) == 2
    for call, encoder in zip(calls, ("transformer", "mamba4rec")):
        assert call.startswith("parent=timeout ")
        for word in ("-m mos profile --config configs/profile_long.yaml --no-tuning --jobs 4",
                     "models=[backbone,mos]", f"model.mos.encoder={encoder} ", "train.device=cuda",
                     f"train.out_dir={tmp_path / 'out' / ('long_' + encoder)}"):
            assert word in call, (word, call)
    summary = (tmp_path / "out" / "studies.txt").read_text()
    assert "long_transformer: rc=0" in summary and "long_mamba4rec: rc=0" in summary
    assert "1 of 10 runs finished" in summary


@pytest.mark.parametrize("deaf, rc", [("", 124), ("1", 137)], ids=["stops", "killed_after_its_grace"])
def test_the_deadline_cuts_a_study_and_skips_the_next(tmp_path, deaf, rc):
    """A study past its budget is cut, not failed, whether it stops at the SIGINT or (as the
    profile's process pool does, finishing the runs it holds) is killed after the grace."""
    done, calls = _run(tmp_path, "sdim", "mamba4rec", deadline=8, slow="sdim", deaf=deaf)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(calls) == 1
    assert "long_sdim: cut at" in done.stdout and f"(rc={rc})" in done.stdout
    assert "long_mamba4rec: skipped" in done.stdout


def test_a_failed_study_fails_the_script_and_the_next_still_runs(tmp_path):
    done, calls = _run(tmp_path, fail="transformer")
    assert done.returncode == 1
    assert len(calls) == 2 and "long_transformer: rc=3" in done.stdout and "long_mamba4rec: rc=0" in done.stdout


def test_the_real_cli_accepts_the_study_arguments(tmp_path):
    """The same arguments, --print-config: every key exists and every value is accepted."""
    done, calls = _run(tmp_path, "mamba4rec")
    args = calls[0].split(" args=", 1)[1].split(" ")
    printed = subprocess.run([sys.executable, *args, "--print-config"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert printed.returncode == 0, printed.stderr
    assert "encoder: mamba4rec" in printed.stdout and "device: cuda" in printed.stdout
