"""Argument checks shared by every op, the layer and the configs (public: `mos` uses them too).

Each raises with the argument's name, what was expected and what came, so that a user
reading the message alone knows which call to fix.

Two kinds: checks of types, ranks, shapes and devices cost nothing and always run; checks
that read the data (NaN/inf scans, offsets monotone, index ranges) cost a pass over the
tensor and a device sync, so they can be switched off with `data_checks(False)` where the
data are already known good (the layer checks its inputs once, then runs its ops without;
the benchmarks time kernels without). They are also skipped while torch.compile traces.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch

_data_checks = True


@contextlib.contextmanager
def data_checks(enabled: bool):
    """Turn the data-reading checks on or off inside a block (not thread-safe: process-wide)."""
    global _data_checks
    previous, _data_checks = _data_checks, enabled
    try:
        yield
    finally:
        _data_checks = previous


def reads_data() -> bool:
    """True where data-reading checks should run."""
    return _data_checks and not torch.compiler.is_compiling()


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def check_count(name: str, value, *, minimum: int = 1) -> None:
    """An int (a bool or a float such as 2.0 is not) in [minimum, 2^63): sizes, lengths, numbers of
    heads or themes. A float would reach a tensor shape or an index as a bare torch error, or
    silently cut differently (a session length of 2.5). A size being traced is let through: a
    SymInt under torch.compile, a 0-dim tensor under torch.jit.trace (fvcore's FLOP count)."""
    if (torch.compiler.is_compiling() or isinstance(value, torch.SymInt)
            or (isinstance(value, torch.Tensor) and torch.jit.is_tracing())):
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if not minimum <= value < 2 ** 63:
        raise ValueError(f"{name}: expected an int in [{minimum}, 2^63), got {value!r}")


def check_flag(name: str, value) -> None:
    """A bool: a string such as "False" is truthy, so it would silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r} ({type(value).__name__})")


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Iterable] = None,
                 device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf where finite values are needed (a trainer tells a diverged model
    from bad input by this type)."""


def check_finite(name: str, t: torch.Tensor) -> None:
    """No NaN or inf in t (a data check: one pass over it); NonFiniteError (a ValueError) names t."""
    if reads_data() and t.numel() and not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name}: expected finite values, got NaN or inf")


def check_values(name: str, t: torch.Tensor, *, dim: Optional[int] = None) -> None:
    """A float tensor of token rows [N, dim]; NaN/inf are refused (they would poison every mean)."""
    check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES)
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} columns, got shape {tuple(t.shape)}")
    check_finite(name, t)


def check_offsets(name: str, offsets, total: Optional[int] = None, device=None) -> None:
    """Offsets [N+1] int64, starting at 0, non-decreasing, ending at `total`."""
    check_tensor(name, offsets, ndim=1, dtypes=(torch.int64,), device=device)
    if offsets.numel() < 1:
        raise ValueError(f"{name}: expected at least one entry (offsets[0] == 0), got an empty tensor")
    if not reads_data():
        return
    first = int(offsets[0])
    if first != 0:
        raise ValueError(f"{name}: expected offsets[0] == 0, got {first}")
    if offsets.numel() > 1:
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            raise ValueError(
                f"{name}: expected non-decreasing offsets, got offsets[{i}]={int(offsets[i])} > "
                f"offsets[{i + 1}]={int(offsets[i + 1])}")
    if total is not None and int(offsets[-1]) != total:
        raise ValueError(f"{name}: expected offsets[-1] == {total} (the number of rows), got {int(offsets[-1])}")


def check_gather_index(gather_index, row_gate, inverse_index, device, num_tokens: int, num_rows: int) -> None:
    """A gather of num_rows rows from num_tokens tokens: gather_index [num_rows] int64 in range,
    row_gate [num_rows] or None, inverse_index [num_tokens, m] int64 or None (`theme_gather`)."""
    check_tensor("gather_index", gather_index, ndim=1, dtypes=(torch.int64,), device=device)
    if gather_index.numel() != num_rows:
        raise ValueError(f"gather_index: expected {num_rows} entries (one per row), got {gather_index.numel()}")
    if row_gate is not None:
        check_tensor("row_gate", row_gate, ndim=1, dtypes=FLOAT_DTYPES, device=device)
        if row_gate.numel() != num_rows:
            raise ValueError(f"row_gate: expected {num_rows} entries like gather_index, got {row_gate.numel()}")
        check_finite("row_gate", row_gate)
    if inverse_index is not None:
        check_tensor("inverse_index", inverse_index, ndim=2, dtypes=(torch.int64,), device=device)
        if inverse_index.shape[0] != num_tokens:
            raise ValueError(f"inverse_index: expected {num_tokens} rows (one per token), got {inverse_index.shape[0]}")
    if reads_data() and num_rows:
        lo, hi = int(gather_index.min()), int(gather_index.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"gather_index: expected values in [0, {num_tokens - 1}], got min {lo}, max {hi}")
    if inverse_index is not None and reads_data():
        _check_inverse_index(gather_index, inverse_index, num_rows)


def _check_inverse_index(gather_index: torch.Tensor, inverse_index: torch.Tensor, num_rows: int) -> None:
    """inverse_index [T, m] must be gather_index's inverse: every row listed exactly once, under the
    token it reads, -1 elsewhere. The Triton scatter and backward read rows through it alone, so a
    row it misses or misplaces would be silently dropped or summed into the wrong token."""
    flat = inverse_index.reshape(-1)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -1 or hi >= num_rows:
            raise ValueError(f"inverse_index: expected row numbers in [0, {num_rows - 1}] or -1 (no row), "
                             f"got min {lo}, max {hi}")
    listed = flat >= 0
    rows = flat[listed]
    tokens = torch.div(torch.arange(flat.numel(), device=flat.device), max(inverse_index.shape[1], 1),
                       rounding_mode="floor")[listed]
    times = torch.bincount(rows, minlength=num_rows)          # a data check, never traced: bincount is fine
    if bool((times != 1).any()):
        row = int((times != 1).nonzero()[0, 0])
        raise ValueError(f"inverse_index: expected every row of gather_index listed exactly once, got row {row} "
                         f"listed {int(times[row])} times")
    wrong = gather_index[rows] != tokens
    if bool(wrong.any()):
        at = int(wrong.nonzero()[0, 0])
        raise ValueError(f"inverse_index: expected row {int(rows[at])} under token {int(gather_index[rows[at]])} "
                         f"(the token gather_index names), got it under token {int(tokens[at])}")
