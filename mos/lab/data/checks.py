"""Checks on loaded data: warnings about input that loads but is probably wrong, and the split
check that runs before any training.

Warnings go into the log's report (printed before training): timestamps that look like
milliseconds, microseconds or nanoseconds read as seconds (every gap between events then looks
1000 times too long, so every session holds one event), and rows that repeat an earlier row in
every column read (kept and counted, or dropped with `data.logs.drop_duplicates`). Without a
timestamp column each row is its own moment, so no row repeats another.
"""
from __future__ import annotations

import numpy as np

from mos.lab.data.config import DataConfig, LogConfig
from mos.lab.errors import InputError

# (smallest median, unit, units per second): seconds since 1970 pass 1e11 only in the year 5138,
# milliseconds passed it in 1973.
_TIME_UNITS = ((1e17, "nanoseconds", 1e9), (1e14, "microseconds", 1e6), (1e11, "milliseconds", 1e3))
_SECONDS_PER_YEAR = 31_557_600
_EXAMPLES = 3


def warn_time_unit(seconds: np.ndarray, column: str, warnings: list) -> None:
    """Append a warning to `warnings` when the times read as seconds look like a finer unit."""
    if not len(seconds):
        return
    median = float(np.median(seconds))
    for floor, unit, per_second in _TIME_UNITS:
        if median >= floor:
            warnings.append(
                f"column {column!r} looks like {unit}, not seconds: its median {median:.4g} read as seconds is the "
                f"year {1970 + median / _SECONDS_PER_YEAR:,.0f}, so every gap between events is {per_second:g} times "
                f"too long and sessions cut at time gaps hold one event each; divide the column by {per_second:g}")
            return


def duplicate_rows(events: dict, columns: list, cfg: LogConfig, report) -> dict:
    """Count the rows that repeat an earlier one in every column read (`columns` names them);
    warn about them, or refuse them when `cfg.drop_duplicates`. Returns the events kept."""
    fields = [events[name] for name in ("user", "item", "exact_time", "value", "category") if events[name] is not None]
    _, first, group = np.unique(np.rec.fromarrays(fields), return_index=True, return_inverse=True)
    repeat = np.ones(len(events["line"]), dtype=bool)
    repeat[first] = False
    if not repeat.any():
        return events
    lines = events["line"][repeat]
    earlier = events["line"][first[group.reshape(-1)[repeat]]]
    read = ", ".join(repr(name) for name in columns)
    if not cfg.drop_duplicates:
        pairs = "; ".join(f"line {a} = line {b}" for a, b in zip(lines[:_EXAMPLES], earlier[:_EXAMPLES]))
        report.warnings.append(
            f"{len(lines)} rows repeat an earlier row in every column read ({read}), e.g. {pairs}: duplicates are "
            f"kept and count twice; data.logs.drop_duplicates=true drops them")
        return events
    report.refuse(f"repeats an earlier row in every column read ({read}; data.logs.drop_duplicates)", lines,
                  [f"same as line {b}" for b in earlier[:_EXAMPLES]])
    report.used -= len(lines)
    return {name: None if value is None else value[~repeat] for name, value in events.items()}


def check_splits(splits: tuple, cfg: DataConfig) -> None:
    """Before training: a train and a validation split with samples of both classes (training
    needs both, and early stopping ranks validation samples by AUC) and a non-empty test split. A
    test split of one class is allowed: its AUC is reported as undefined."""
    for name, split, option in (("train", splits[0], "data.source"), ("validation", splits[1], "data.valid_fraction"),
                                ("test", splits[2], "data.test_fraction")):
        if not len(split):
            of = "the users" if cfg.source == "synthetic" else "each user's samples, rounded"
            raise InputError(f"{option}: expected a {name} split with samples, got none (valid_fraction="
                             f"{cfg.valid_fraction}, test_fraction={cfg.test_fraction} of {of})")
        positives = int(split.label.sum())
        if name != "test" and positives in (0, len(split)):
            hint = "; data.logs.label_source=sampled draws negatives" if positives and cfg.source != "synthetic" else ""
            raise InputError(f"{option}: expected {name} samples of both classes (labels 0 and 1), got "
                             f"{len(split)} samples all labelled {int(positives > 0)}{hint}")
