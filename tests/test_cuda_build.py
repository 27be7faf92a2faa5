"""Building the CUDA extension with ninja (`mos_kernels.cuda_ops._build`, `mos_kernels._jit_build`):
where it is built, and that an interrupted build never leaves later processes waiting forever.

torch's `load` guards a build with a lock file it creates and deletes; one killed mid-build
leaves the file behind and every later `load` polls it forever without a word. Our builds run
under an flock too, which the kernel drops when its holder dies, so a torch lock found while
holding it is stale. `load` is replaced here by a stand-in that fails where torch would hang, so
these tests build nothing; the other process holding the lock is a real one.
"""
from __future__ import annotations

import functools
import inspect
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import filelock
import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from mos_kernels import _jit_build, cuda_ops

NAME = "mos_cuda_emulated"


@pytest.fixture
def root(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("MOS_CUDA_EMULATE", "1")
    monkeypatch.delenv("MOS_CUDA_BUILD_WAIT", raising=False)
    return tmp_path


@pytest.fixture
def loads(monkeypatch):
    """Replaces torch's `load`; records each call's keyword arguments. Like torch, it would wait on
    a lock file left in the build folder: here it fails instead."""
    calls = []

    def load(**kwargs):
        lock = Path(kwargs["build_directory"]) / "lock"
        assert not lock.exists(), f"torch would wait on {lock} forever"
        calls.append(kwargs)

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


@pytest.fixture
def said(monkeypatch):
    """The messages the build prints, in order; `said.on_wait` (if set) runs when the build says it
    is waiting for another process."""
    messages = []

    def say(text):
        messages.append(text)
        if "waiting for" in text and getattr(say, "on_wait", None):
            say.on_wait()

    say.messages = messages
    monkeypatch.setattr(cuda_ops, "_say", say)
    return say


class Holder:
    """Another process holding our build lock until told to end: `release()` lets it unlock and
    exit, `kill()` ends it by SIGKILL (no release: the kernel drops the flock)."""

    def __init__(self, lock_path: Path):
        code = textwrap.dedent(f"""
            import sys, filelock
            lock = filelock.FileLock({str(lock_path)!r})
            lock.acquire()
            print("held", flush=True)
            sys.stdin.readline()
            lock.release()
        """)
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def release(self):
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)


def _directory(root: Path) -> Path:
    directory = root / "mos" / NAME
    directory.mkdir(parents=True)
    return directory


@pytest.mark.parametrize("accelerator", [None, "cuda", "hip"])
def test_the_build_folder_is_below_torchs_default(monkeypatch, tmp_path, accelerator):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path / "default"))
    monkeypatch.setattr(torch.version, "cuda", "13.0" if accelerator == "cuda" else None)
    monkeypatch.setattr(torch.version, "hip", "7.1.2" if accelerator == "hip" else None)
    torch_default = Path(cpp_extension._get_build_directory("mos", False))
    assert cuda_ops.build_directory(NAME) == torch_default / NAME
    assert torch_default.parent.name.endswith({None: "_cpu", "cuda": "_cu130", "hip": "_rocm712"}[accelerator])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "chosen"))
    assert cuda_ops.build_directory(NAME) == tmp_path / "chosen" / "mos" / NAME


def test_torch_still_locks_its_build_with_the_file_we_clear():
    """The stale file the build removes is the one torch's JIT build waits on (a private detail of
    torch: this fails when an upgrade changes it)."""
    source = inspect.getsource(cpp_extension._jit_compile)
    assert "FileBaton(os.path.join(build_directory, 'lock'))" in source and "baton.wait()" in source


def test_a_lock_left_by_an_interrupted_build_is_removed(root, loads, said):
    directory = _directory(root)
    (directory / "lock").touch()     # what a build killed mid-way leaves
    assert cuda_ops._load_library() is None
    assert len(loads) == 1 and loads[0]["build_directory"] == str(directory) and loads[0]["name"] == NAME
    assert not (directory / "lock").exists()
    assert any(f"removing {directory / 'lock'}" in text for text in said.messages)


def test_a_build_by_a_copy_without_our_lock_is_left_alone(root, loads, said):
    """Copies from before our lock build in torch's default folder, under torch's lock alone: a
    live one's lock there must never be removed, so ours build elsewhere."""
    old = root / NAME
    old.mkdir()
    (old / "lock").touch()
    assert cuda_ops._load_library() is None
    assert (old / "lock").exists() and loads[0]["build_directory"] == str(root / "mos" / NAME)


def test_a_live_build_is_waited_for_and_named_when_it_takes_too_long(root, loads, said, monkeypatch):
    directory = _directory(root)
    (directory / "lock").touch()     # the live build's own torch lock: not ours to remove
    monkeypatch.setattr(_jit_build, "BUILD_WAIT_NOTICE_SECONDS", 0.1)
    monkeypatch.setenv("MOS_CUDA_BUILD_WAIT", "0.5")
    holder = Holder(directory / "mos_build.lock")
    (directory / "mos_build.owner").write_text(f"process {holder.process.pid} on here\n")
    try:
        reason = cuda_ops._load_library()
    finally:
        holder.kill()
    assert isinstance(reason, cuda_ops._Retry), reason
    assert "waited 0.5 s for process" in reason and str(directory / "mos_build.lock") in reason
    assert f"process {holder.process.pid}" in reason and "MOS_CUDA_BUILD_WAIT" in reason
    assert loads == [] and (directory / "lock").exists()


@pytest.mark.parametrize("end", ["release", "kill"])
def test_the_wait_ends_when_the_other_build_ends(root, loads, said, monkeypatch, end):
    directory = _directory(root)
    monkeypatch.setattr(_jit_build, "BUILD_WAIT_NOTICE_SECONDS", 0.1)
    holder = Holder(directory / "mos_build.lock")
    if end == "kill":
        (directory / "lock").touch()   # killed mid-build: torch's lock stays behind
    said.on_wait = getattr(holder, end)
    assert cuda_ops._load_library() is None
    assert holder.process.returncode == (0 if end == "release" else -signal.SIGKILL)
    assert len(loads) == 1 and not (directory / "lock").exists()
    assert "waiting for" in said.messages[0] and "up to 30 min" in said.messages[0]
    assert (directory / "mos_build.owner").read_text().startswith(f"process {os.getpid()} on ")


@pytest.mark.parametrize("value", ["abc", "-1", "nan", ""])
def test_a_bad_wait_is_refused_naming_the_variable(root, loads, said, monkeypatch, value):
    monkeypatch.setenv("MOS_CUDA_BUILD_WAIT", value)
    reason = cuda_ops._load_library()
    assert f"MOS_CUDA_BUILD_WAIT: expected a number of seconds >= 0, got {value!r}" in reason and loads == []


def test_without_flock_the_build_runs_unguarded_and_says_so(root, loads, said, monkeypatch):
    class NoLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr(_jit_build.filelock, "FileLock", NoLock)
    assert cuda_ops._load_library() is None and len(loads) == 1
    assert "cannot lock" in said.messages[0] and "without our lock" in said.messages[0]


def test_only_a_wait_is_asked_again(monkeypatch):
    """A failed build is remembered for the process (it would fail again, minutes later); a wait
    for another process's build is not (that build may have ended)."""
    def loader(*outcomes):
        left = iter(outcomes)
        monkeypatch.setattr(cuda_ops, "_load_once", functools.lru_cache(maxsize=None)(lambda: next(left)))

    loader(cuda_ops._Retry("waited"), None)
    assert cuda_ops._load() == "waited" and cuda_ops._load() is None and cuda_ops._load() is None
    loader("building the extension failed", None)
    assert cuda_ops._load() == cuda_ops._load() == "building the extension failed"
