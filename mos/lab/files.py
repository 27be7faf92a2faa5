"""Writing files so that a crash or a second writer never leaves part of one.

`write_atomic` writes a whole file: a unique temporary file beside the target, flushed to the
disk, renamed over the target, the directory entry synced. Readers see the old file or the new
one, never part of one; a crash while writing leaves only a temporary file (named
`.<target>.<random>.tmp`, which no reader opens). Concurrent writers to one path never collide:
each has its own temporary file, and the last rename wins whole.

`append_line` adds one line to a log of lines (results.jsonl) with a single write to a file
opened for appending: concurrent appenders never interleave within a line, and a process killed
around it leaves the line whole or absent.
"""
from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Callable, IO, Union

# The process's umask, read once (setting it is the only way to read it): mkstemp creates its
# file readable by the owner alone, and the target should get the permissions open() would give.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temporary_prefix_suffix(path: Path) -> tuple[str, str]:
    return f".{path.name}.", ".tmp"


def remove_leftovers(path: Union[str, Path]) -> int:
    """Delete the temporary files that writers of `path` killed mid-write left beside it (never
    `path` itself); returns how many. Only safe while no process is writing `path`."""
    path = Path(path)
    prefix, suffix = _temporary_prefix_suffix(path)
    removed = 0
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*{suffix}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def write_atomic(path: Union[str, Path], write: Union[str, bytes, Callable[[IO], None]], *, binary: bool = False) -> None:
    """Write `write` (text, bytes, or a function writing into the open stream) to `path`
    atomically; `binary` opens the stream in binary mode for a function (bytes always are)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = binary or isinstance(write, bytes)
    prefix, suffix = _temporary_prefix_suffix(path)
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as stream:
            if callable(write):
                write(stream)
            else:
                stream.write(write)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable only once the directory entry is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def append_line(path: Union[str, Path], line: str) -> None:
    """Append `line` and a newline to `path` (created if absent) in one write(2) call, then fsync."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(handle, data)
        if written != len(data):      # a regular file takes all of it, or the disk is full
            raise OSError(f"{path}: wrote {written} of {len(data)} bytes of a line")
        os.fsync(handle)
    finally:
        os.close(handle)
