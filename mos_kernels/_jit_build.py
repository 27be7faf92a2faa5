"""Where the CUDA extension's JIT build lives, and one build at a time there.

torch's `cpp_extension.load` guards a build with a lock file that a process creates and deletes
(FileBaton, `<build dir>/lock`); a build killed mid-way leaves it behind, and every later load
polls it forever without a word. So our builds also run under a lock of our own, an flock taken
with the filelock library, which the kernel drops when its holder dies: a process holding it is
the only one of ours inside `load`, so a torch lock it finds was left by an interrupted build and
is removed.

That holds only if no other kind of process builds in the same folder: copies of this package
from before this lock used torch's default folder `<root>/<name>`, so builds now go one level
down, `<root>/mos/<name>`, where only processes that take the lock build.

Limits: on a filesystem without flock filelock falls back to a lock file that it recovers by
process id on this host only; where it cannot lock at all, the build runs unguarded, as torch's
alone, and says so. A process killed by SIGKILL mid-build leaves its ninja and compilers running;
the next build removes torch's lock and may compile beside them.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

import filelock
import torch

# After this long waiting for another process's build, say what we are waiting for.
BUILD_WAIT_NOTICE_SECONDS = 5.0
# How long to wait for it at most by default; MOS_CUDA_BUILD_WAIT (seconds) overrides it: a CUDA
# build for sm_90 takes minutes, more on a small busy machine.
BUILD_WAIT_SECONDS = 1800.0

LOCK_NAME = "mos_build.lock"
OWNER_NAME = "mos_build.owner"    # the holder's pid and host, for the messages of those who wait


class BuildWaitTimeout(RuntimeError):
    """Another live process held the build longer than the wait allows."""


def build_wait_seconds() -> float:
    """MOS_CUDA_BUILD_WAIT when set (a non-negative number of seconds), else BUILD_WAIT_SECONDS.
    Raises ValueError naming the variable when it is not such a number."""
    text = os.environ.get("MOS_CUDA_BUILD_WAIT")
    if text is None:
        return BUILD_WAIT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:     # also refuses nan
        raise ValueError(f"MOS_CUDA_BUILD_WAIT: expected a number of seconds >= 0, got {text!r}")
    return seconds


def extensions_root() -> Path:
    """torch's root for JIT extensions: TORCH_EXTENSIONS_DIR where set, else
    ~/.cache/torch_extensions/py<version>_<cpu|cuXYZ|rocmXYZ> (torch's own rule; a test keeps
    them equal)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{version}_{accelerator}"


def build_directory(name: str) -> Path:
    """The build folder of extension `name`: `extensions_root()/mos/name`."""
    return extensions_root() / "mos" / name


def _owner(directory: Path) -> str:
    try:
        return (directory / OWNER_NAME).read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextlib.contextmanager
def exclusive_build(directory: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Holds the build lock of `directory` (created if missing) for the body, after removing a
    torch lock left there by an interrupted build. `say(text)` gets the messages for the user.
    Raises BuildWaitTimeout, naming the lock and its holder, when another process holds it longer
    than `build_wait_seconds()`; ValueError for a bad MOS_CUDA_BUILD_WAIT."""
    wait = build_wait_seconds()
    directory.mkdir(parents=True, exist_ok=True)
    guard = filelock.FileLock(str(directory / LOCK_NAME))
    locked = True
    try:
        try:
            guard.acquire(timeout=min(BUILD_WAIT_NOTICE_SECONDS, wait))
        except filelock.Timeout:
            if wait <= BUILD_WAIT_NOTICE_SECONDS:
                raise
            say(f"mos: waiting for {_owner(directory)}, which is building or loading the extension (it holds "
                f"{guard.lock_file}); waiting up to {wait / 60:.0f} min (MOS_CUDA_BUILD_WAIT, seconds)")
            guard.acquire(timeout=wait - BUILD_WAIT_NOTICE_SECONDS)
    except filelock.Timeout:
        raise BuildWaitTimeout(f"waited {wait:g} s for {_owner(directory)}, which holds the build lock "
                               f"{guard.lock_file}; try again when its build ends, stop it if it hangs, or wait "
                               "longer with MOS_CUDA_BUILD_WAIT=<seconds>") from None
    except NotImplementedError as err:    # a filesystem without flock, and a filelock without a fallback
        say(f"mos: cannot lock {guard.lock_file} ({err}); building without our lock, as torch alone does")
        locked = False
    if not locked:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            (directory / OWNER_NAME).write_text(f"process {os.getpid()} on {socket.gethostname()}\n")
        stale = directory / "lock"
        if stale.exists():
            say(f"mos: removing {stale}, torch's build lock, left by an interrupted build (no process holds "
                f"{guard.lock_file})")
            stale.unlink(missing_ok=True)
        yield
    finally:
        guard.release()
