"""A log's rows as typed arrays: every value parsed as its column's type, and `LogReport`, what
loading the log found.

A row is used when it has the header's number of fields, a value in every column read, and its
timestamp (seconds, or an ISO-8601 date read as UTC without a zone), label (0/1, true/false) and
rating parse. Every other row is refused under the first reason it fails, counted in the report
with a few examples (line number and value); nothing is dropped silently.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mos.lab.data.config import LogConfig
from mos.lab.errors import InputError

_EXAMPLES = 3                 # examples kept per reason a row was refused


@dataclass
class LogReport:
    """What loading a log found: rows read and used, refused rows by reason, the choices made."""

    path: str
    rows: int = 0
    used: int = 0
    refused: dict = field(default_factory=dict)     # reason -> {"count": n, "examples": [...]}
    notes: list = field(default_factory=list)       # counted decisions that kept the row
    warnings: list = field(default_factory=list)    # what is probably wrong with the input, though it loads
    has_timestamps: bool = True
    has_labels: bool = True                         # False: read for scoring from a log without labels
    label_source: str = ""
    users: int = 0
    items: int = 0
    categories: int = 0
    samples: int = 0
    positive_rate: float = float("nan")

    def refuse(self, reason: str, lines: np.ndarray, values: list) -> None:
        self.refused[reason] = {
            "count": len(lines),
            "examples": [f"line {line}: {'(empty)' if value is None else repr(value)}"
                         for line, value in zip(lines[:_EXAMPLES], values[:_EXAMPLES])],
        }

    def format(self) -> str:
        lines = [f"log {self.path}: {self.rows} rows, {self.used} used, {self.rows - self.used} refused"]
        for reason, entry in self.refused.items():
            lines.append(f"  refused {entry['count']}: {reason} (e.g. {'; '.join(entry['examples'])})")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  WARNING: {warning}" for warning in self.warnings]
        time = "timestamps" if self.has_timestamps else "no timestamp column: the file's row order is the time order"
        positive = f", {self.positive_rate:.3f} positive" if self.has_labels else ""
        lines.append(f"  {self.users} users, {self.items} items, {self.categories} categories, {time}; "
                     f"labels from {self.label_source}: {self.samples} samples{positive}")
        return "\n".join(lines)


def parse_rows(columns: dict, fields: np.ndarray, width: int, line: np.ndarray, cfg: LogConfig,
                label_source: str, report: LogReport, known_items: Optional[set] = None) -> dict:
    """The usable rows as arrays (file order); refused rows go into `report`. With `known_items`
    (scoring), rows whose item is not among them are refused too."""
    num_rows = len(line)
    refused = np.zeros(num_rows, dtype=bool)

    def refuse(reason: str, bad: np.ndarray, values) -> None:
        new = bad & ~refused
        if new.any():
            at = np.flatnonzero(new)
            report.refuse(reason, line[at], [values[i] for i in at[:_EXAMPLES]])
            refused[new] = True

    refuse(f"expected {width} fields (as in the header), got another number", fields != width,
           [f"{n} fields" for n in fields])
    read = [role for role in ("user", "item", "time", "category") if role in columns]
    if label_source in ("label", "rating"):
        read.append(label_source)
    for role in read:
        values = columns[role]
        refuse(f"no value in column {getattr(cfg, f'{role}_column')!r}",
               np.array([value is None for value in values], dtype=bool), values)
    if "time" in columns:
        # Exact times order the events and tell rows apart; whole seconds are what the dataset
        # keeps (sessions cut at gaps of many seconds). Ordering by whole seconds would put an
        # event at 165.9 s before one at 165.1 s that follows it in the file.
        exact, ok = _parse(columns["time"], refused, _as_seconds, np.float64)
        refuse(f"column {cfg.time_column!r} is not seconds or an ISO-8601 date", ~ok, columns["time"])
    else:
        exact = np.arange(num_rows, dtype=np.float64)
    seconds = np.floor(exact).astype(np.int64)
    # Sampled negatives come later, so every event is a positive; unlabelled scoring data gets 0.
    label = np.full(num_rows, label_source == "sampled", dtype=np.float32)
    value = label.astype(np.float64)     # what tells two rows apart besides ids and time
    if label_source == "label":
        label, ok = _parse(columns["label"], refused, _as_label, np.float32)
        refuse(f"column {cfg.label_column!r} is not 0 or 1", ~ok, columns["label"])
        value = label.astype(np.float64)
    elif label_source == "rating":
        value, ok = _parse(columns["rating"], refused, _as_number, np.float64)
        refuse(f"column {cfg.rating_column!r} is not a number", ~ok, columns["rating"])
        label = (value >= cfg.rating_threshold).astype(np.float32)
    if known_items is not None:
        refuse(f"column {cfg.item_column!r} names an item the model never saw in training (it has no embedding)",
               np.array([item not in known_items for item in columns["item"]], dtype=bool), columns["item"])
    used = ~refused
    report.used = int(used.sum())
    if not report.used:
        reasons = "; ".join(f"{entry['count']} {reason}" for reason, entry in report.refused.items()) or "no rows"
        raise InputError(f"data.source: no usable row in {report.path} ({reasons})")

    def kept(role):
        return np.array([str(value) for value, keep in zip(columns[role], used) if keep], dtype=str)

    return {"user": kept("user"), "item": kept("item"), "category": kept("category") if "category" in columns else None,
            "time": seconds[used], "exact_time": exact[used], "label": label[used], "value": value[used],
            "line": line[used]}


def _parse(values: list, skip: np.ndarray, convert, dtype) -> tuple[np.ndarray, np.ndarray]:
    """`convert` of every value (None: it does not parse) and whether each parsed; rows in `skip`
    are not parsed (ok stays True)."""
    out = np.zeros(len(values), dtype=dtype)
    ok = np.ones(len(values), dtype=bool)
    for i, value in enumerate(values):
        if skip[i]:
            continue
        number = convert(value)
        if number is None:
            ok[i] = False
        else:
            out[i] = number
    return out, ok


def _as_number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


MAX_SECONDS = 2 ** 62


def _as_seconds(value):
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        number = None if isinstance(value, bool) else _as_number(value)
        if number is not None:
            # Beyond 2^62 s (1.5e11 years) a time is garbage, and int64 differences of it could wrap.
            return number if abs(number) <= MAX_SECONDS else None
        try:
            moment = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    if moment.tzinfo is None:   # a date without a zone is read as UTC, the same on every machine
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


_LABELS = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}


def _as_label(value):
    return _LABELS.get(str(value).strip().lower())
