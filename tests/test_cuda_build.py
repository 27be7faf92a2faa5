"""Building the CUDA extension with ninja (`mos_kernels.cuda_ops._build`): where it is built, and
that an interrupted build never leaves later processes waiting forever.

torch's `load` guards a build with a lock file it creates and deletes; one killed mid-build
leaves the file behind and every later `load` polls it forever without a word. The build runs
under an flock of ours too, which the kernel drops when its holder dies, so a torch lock found
while holding it is stale. `load` is replaced here by a stand-in that fails where torch would
hang, so these tests build nothing.
"""
from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from mos_kernels import cuda_ops

NAME = "mos_cuda_emulated"


@pytest.fixture
def build_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("MOS_CUDA_EMULATE", "1")
    return tmp_path / NAME


@pytest.fixture
def loads(monkeypatch):
    """Replaces torch's `load`; records each call's keyword arguments. Like torch, it would wait on
    a lock file left in the build directory: here it fails instead."""
    calls = []

    def load(**kwargs):
        lock = Path(kwargs["build_directory"]) / "lock"
        assert not lock.exists(), f"torch would wait on {lock} forever"
        calls.append(kwargs)

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


def _holder(lock_path: Path, seconds: float, *, kill: bool) -> subprocess.Popen:
    """A process that takes our build lock, says so, holds it `seconds` and then exits, killed by
    SIGKILL when `kill` (no clean release: the kernel drops the flock)."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time, filelock
        lock = filelock.FileLock({str(lock_path)!r})
        lock.acquire()
        print("held", flush=True)
        time.sleep({seconds})
        if {kill}:
            os.kill(os.getpid(), signal.SIGKILL)
        lock.release()
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_the_build_directory_is_where_torch_puts_it(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path / "default"))
    assert cuda_ops.build_directory(NAME) == Path(cpp_extension._get_build_directory(NAME, False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "chosen"))
    assert cuda_ops.build_directory(NAME) == Path(cpp_extension._get_build_directory(NAME, False))
    assert cuda_ops.build_directory(NAME) == tmp_path / "chosen" / NAME


def test_torch_still_locks_its_build_with_the_file_we_clear():
    """The stale file `_build` removes is the one torch's JIT build waits on (a private detail of
    torch: this fails when an upgrade changes it)."""
    source = inspect.getsource(cpp_extension._jit_compile)
    assert "FileBaton(os.path.join(build_directory, 'lock'))" in source and "baton.wait()" in source


def test_a_lock_left_by_an_interrupted_build_is_removed(build_root, loads, capfd):
    build_root.mkdir(parents=True)
    (build_root / "lock").touch()     # what a build killed mid-way leaves
    assert cuda_ops._load_library() is None
    assert len(loads) == 1 and loads[0]["build_directory"] == str(build_root) and loads[0]["name"] == NAME
    assert not (build_root / "lock").exists()
    assert f"removing {build_root / 'lock'}" in capfd.readouterr().err


def test_a_live_build_is_waited_for_and_named_when_it_takes_too_long(build_root, loads, monkeypatch):
    build_root.mkdir(parents=True)
    (build_root / "lock").touch()     # the live build's own torch lock: not ours to remove
    monkeypatch.setattr(cuda_ops, "BUILD_WAIT_NOTICE_SECONDS", 0.1)
    monkeypatch.setattr(cuda_ops, "BUILD_WAIT_SECONDS", 0.5)
    holder = _holder(build_root / "mos_build.lock", 60, kill=False)
    try:
        reason = cuda_ops._load_library()
    finally:
        holder.kill()
        holder.wait()
    assert reason is not None and "another process has held the build lock" in reason
    assert str(build_root / "mos_build.lock") in reason
    assert loads == [] and (build_root / "lock").exists()


@pytest.mark.parametrize("kill", [False, True], ids=["finishes", "is_killed"])
def test_the_wait_ends_when_the_other_build_ends(build_root, loads, monkeypatch, capfd, kill):
    build_root.mkdir(parents=True)
    monkeypatch.setattr(cuda_ops, "BUILD_WAIT_NOTICE_SECONDS", 0.1)
    holder = _holder(build_root / "mos_build.lock", 1.0, kill=kill)
    if kill:
        (build_root / "lock").touch()   # killed mid-build: torch's lock stays behind
    start = time.monotonic()
    try:
        assert cuda_ops._load_library() is None
    finally:
        holder.wait()
    assert holder.returncode == (-signal.SIGKILL if kill else 0)
    assert len(loads) == 1 and time.monotonic() - start < 30
    assert "waiting for another process" in capfd.readouterr().err
    assert not (build_root / "lock").exists()
