"""Training checkpoints on disk: written atomically, verified when read.

A checkpoint file is `MAGIC`, the payload's length and sha256, then the payload (the bytes of
`torch.save`). `save` writes it with `mos.lab.files.write_atomic` (a unique temporary file beside the
target, flushed and renamed over it), so the target always holds one whole checkpoint, the old
one or the new one, even with several writers; a crash while writing leaves only a temporary
file, which `load` never reads.
`load` checks the length and the digest as well, so a file damaged later (a copy cut short, a
bad disk) raises `CheckpointError` instead of being loaded as if it were complete.

What a checkpoint holds is the training loop's business (`mos.lab.run_state`); here it is a dict of
tensors, numbers, strings, lists and dicts, read back with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path
from typing import Optional

import torch

from mos.lab.files import write_atomic

MAGIC = b"MOS-CKPT-1\n"
_HEADER = struct.Struct("<Q32s")   # payload length, sha256 of the payload


class CheckpointError(RuntimeError):
    """A checkpoint file exists but is not a complete checkpoint written by `save`."""


def save(path, state: dict) -> None:
    """Write `state` to `path` atomically (`mos.lab.files.write_atomic`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    write_atomic(path, MAGIC + _HEADER.pack(len(payload), hashlib.sha256(payload).digest()) + payload)


def load(path) -> Optional[dict]:
    """The state saved at `path`, or None when there is no file; `CheckpointError` when the file
    is not a whole checkpoint."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:        # a folder, a file without read permission
        raise CheckpointError(f"checkpoint {path}: expected a checkpoint file, got one that cannot be read "
                              f"({err.strerror or err})") from None
    start = len(MAGIC) + _HEADER.size
    if not data.startswith(MAGIC) or len(data) < start:
        raise CheckpointError(f"checkpoint {path}: expected a file written by mos.lab.checkpoint.save "
                              f"(starting with {MAGIC!r}), got {len(data)} bytes starting with {data[:len(MAGIC)]!r}")
    length, digest = _HEADER.unpack_from(data, len(MAGIC))
    payload = data[start:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {path}: expected a payload of {length} bytes, got {len(payload)} "
                              f"(the file was cut short); delete it to start this run over")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: the payload's sha256 does not match the one recorded "
                              f"when it was written (the file is damaged); delete it to start this run over")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
