"""Your own interaction log (CSV, TSV or Parquet) as a `CTRDataset`, split by time.

The file has one row per event. Columns (names are `DataConfig` fields): a user id and an item
id (required), a timestamp (seconds as a number, or an ISO-8601 date; without the column the
file's row order is the time order), and optionally a 0/1 label, a rating and a category.

Rows. A row is used when it has a value in every column read, its ids are not empty, and its
timestamp, label and rating parse. Every other row is counted under the first reason it fails,
with a few examples (line number and value), in the `LogReport` that `load_log` returns and
training prints: nothing is dropped silently. A file with no usable row stops with the reasons.

Order and vocabularies. Events are sorted by user, then timestamp; ties keep the file's order.
Ids are strings; items and categories are numbered 1.. in sorted order (0 is padding), users
0.. in sorted order. An item's category is the one on its chronologically first event (items
seen with several are counted in the report). Without a category column every item shares one.

Labels (`label_source`): "label" takes the 0/1 column; "rating" is rating >= `rating_threshold`;
"sampled" makes every event a positive and draws `negatives` items per event, uniformly, with a
generator seeded by `data.seed`, never an item the user had interacted with up to that event
(redrawn until it is not; the rare ones still unlucky after 100 draws are dropped and counted);
"auto" takes the first of those the file's columns allow.

Samples. History events are every event (`history="all"`: what the user watched or rated,
whatever the label) or only the positive ones (`"positive"`: for impression logs whose
negatives were never consumed). Each labelled event with at least `min_history` history events
before it is a sample: its target is its own item and its history the history events before it,
sliced from the user's stored events by `hist_end`; sampled negatives share their event's history.

Split, by time inside each user: the newest `test_fraction` of a user's sample events are test,
the `valid_fraction` before them valid, the rest train. Histories reach back over all earlier
events, whatever their split: only the past is seen, never the future.
"""
from __future__ import annotations

import csv
import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mos.config import LOG_FORMATS, DataConfig
from mos.data.dataset import CTRDataset

_EXAMPLES = 3                 # examples kept per reason a row was refused
_NEGATIVE_DRAWS = 100         # rounds of redrawing a sampled negative the user had already seen


@dataclass
class LogReport:
    """What loading a log found: rows read and used, refused rows by reason, the choices made."""

    path: str
    rows: int = 0
    used: int = 0
    refused: dict = field(default_factory=dict)     # reason -> {"count": n, "examples": [...]}
    notes: list = field(default_factory=list)       # counted decisions that kept the row
    has_timestamps: bool = True
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
        time = "timestamps" if self.has_timestamps else "no timestamp column: the file's row order is the time order"
        lines.append(f"  {self.users} users, {self.items} items, {self.categories} categories, {time}; "
                     f"labels from {self.label_source}: {self.samples} samples, {self.positive_rate:.3f} positive")
        return "\n".join(lines)


@dataclass
class LogData:
    """A loaded log: all samples, the time split (train, valid, test) and the report."""

    dataset: CTRDataset
    splits: tuple
    report: LogReport


def load_log(path, cfg: DataConfig) -> LogData:
    """Read the log at `path` with `cfg`'s column names and label rules (module docstring)."""
    path = Path(path)
    kind = LOG_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"data.source: expected a log file ending in {', '.join(LOG_FORMATS)}, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data.source: no such file {str(path)!r}")
    wanted = {role: getattr(cfg, f"{role}_column") for role in _ROLES}
    header, columns, fields, line = (_read_parquet if kind == "parquet" else _read_text)(path, kind, wanted)
    report = LogReport(path=str(path), rows=len(line))
    label_source = _label_source(cfg, header)
    report.label_source = {"label": f"column {cfg.label_column!r}",
                           "rating": f"{cfg.rating_column!r} >= {cfg.rating_threshold:g}",
                           "sampled": f"{cfg.negatives} sampled negative(s) per event"}[label_source]
    report.has_timestamps = "time" in columns
    events = _parse_rows(columns, fields, len(header), line, cfg, label_source, report)
    dataset, sample_part = _build(events, cfg, label_source, report)
    splits = tuple(dataset.subset(torch.from_numpy(sample_part == part)) for part in range(3))
    return LogData(dataset=dataset, splits=splits, report=report)


# Each role's column name is the DataConfig field `<role>_column`.
_ROLES = ("user", "item", "time", "label", "rating", "category")


def _label_source(cfg: DataConfig, header: list) -> str:
    if cfg.label_source == "auto":
        if cfg.label_column in header:
            return "label"
        return "rating" if cfg.rating_column in header else "sampled"
    if cfg.label_source != "sampled":
        column = getattr(cfg, f"{cfg.label_source}_column")
        if column not in header:
            raise ValueError(f"data.{cfg.label_source}_column: label_source is {cfg.label_source!r}, so the log "
                             f"needs a column {column!r}; got columns {header}")
    return cfg.label_source


def _present(header: list, wanted: dict, path: Path) -> dict:
    """Role -> column index of the wanted columns the header has; the ids are required."""
    for role in ("user", "item"):
        if wanted[role] not in header:
            raise ValueError(f"data.{role}_column: expected a column {wanted[role]!r} in {path}, got columns {header}")
    return {role: header.index(name) for role, name in wanted.items() if name in header}


def _read_text(path: Path, kind: str, wanted: dict):
    """(header, role -> list of str or None, fields per row, line numbers) of a CSV or TSV file."""
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream, delimiter="," if kind == "csv" else "\t")
        header = [name.strip() for name in next(reader, [])]
        index = _present(header, wanted, path)
        columns = {role: [] for role in index}
        fields, lines = [], []
        for row in reader:
            if not row:          # blank lines are layout, not rows
                continue
            lines.append(reader.line_num)
            fields.append(len(row))
            for role, at in index.items():
                value = row[at].strip() if at < len(row) else ""
                columns[role].append(value or None)
    return header, columns, np.asarray(fields, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def _read_parquet(path: Path, kind: str, wanted: dict):
    """(header, role -> list of values or None, fields per row, row numbers) of a Parquet file."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ImportError(f"data.source: reading the Parquet file {path} needs the package pyarrow, which "
                          f"is not installed (pip install pyarrow)") from None
    header = list(parquet.read_schema(path).names)
    index = _present(header, wanted, path)
    table = parquet.read_table(path, columns=[header[at] for at in index.values()])
    columns = {}
    for role, at in index.items():
        values = table.column(header[at]).to_pylist()
        columns[role] = [value.strip() or None if isinstance(value, str) else value for value in values]
    return (header, columns, np.full(table.num_rows, len(header), dtype=np.int64),
            np.arange(1, table.num_rows + 1, dtype=np.int64))


def _parse_rows(columns: dict, fields: np.ndarray, width: int, line: np.ndarray, cfg: DataConfig,
                label_source: str, report: LogReport) -> dict:
    """The usable rows as arrays (file order); refused rows go into `report`."""
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
    if label_source != "sampled":
        read.append(label_source)
    for role in read:
        values = columns[role]
        refuse(f"no value in column {getattr(cfg, f'{role}_column')!r}",
               np.array([value is None for value in values], dtype=bool), values)
    if "time" in columns:
        seconds, ok = _parse_times(columns["time"], refused)
        refuse(f"column {cfg.time_column!r} is not seconds or an ISO-8601 date", ~ok, columns["time"])
    else:
        seconds = np.arange(num_rows, dtype=np.int64)
    label = np.ones(num_rows, dtype=np.float32)
    if label_source == "label":
        label, ok = _parse_labels(columns["label"], refused)
        refuse(f"column {cfg.label_column!r} is not 0 or 1", ~ok, columns["label"])
    elif label_source == "rating":
        rating, ok = _parse_numbers(columns["rating"], refused)
        refuse(f"column {cfg.rating_column!r} is not a number", ~ok, columns["rating"])
        label = (rating >= cfg.rating_threshold).astype(np.float32)
    used = ~refused
    report.used = int(used.sum())
    if not report.used:
        reasons = "; ".join(f"{entry['count']} {reason}" for reason, entry in report.refused.items()) or "no rows"
        raise ValueError(f"data.source: no usable row in {report.path} ({reasons})")

    def kept(role):
        return np.array([str(value) for value, keep in zip(columns[role], used) if keep], dtype=str)

    return {"user": kept("user"), "item": kept("item"), "category": kept("category") if "category" in columns else None,
            "time": seconds[used], "label": label[used]}


def _parse_times(values: list, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Int64 seconds and whether each parsed; rows in `skip` are not parsed (ok stays True)."""
    seconds = np.zeros(len(values), dtype=np.int64)
    ok = np.ones(len(values), dtype=bool)
    for i, value in enumerate(values):
        if skip[i]:
            continue
        number = _as_seconds(value)
        if number is None:
            ok[i] = False
        else:
            seconds[i] = number
    return seconds, ok


def _as_seconds(value):
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(np.floor(value)) if np.isfinite(value) else None
    else:
        try:
            number = float(value)
            return int(np.floor(number)) if np.isfinite(number) else None
        except (TypeError, ValueError):
            pass
        try:
            moment = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    if moment.tzinfo is None:   # a date without a zone is read as UTC, the same on every machine
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(np.floor(moment.timestamp()))


def _parse_numbers(values: list, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    numbers = np.zeros(len(values), dtype=np.float64)
    ok = np.ones(len(values), dtype=bool)
    for i, value in enumerate(values):
        if skip[i]:
            continue
        try:
            numbers[i] = float(value)
        except (TypeError, ValueError):
            ok[i] = False
    ok &= np.isfinite(numbers)
    return numbers, ok


_LABELS = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}


def _parse_labels(values: list, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(len(values), dtype=np.float32)
    ok = np.ones(len(values), dtype=bool)
    for i, value in enumerate(values):
        if skip[i]:
            continue
        label = _LABELS.get(str(value).strip().lower())
        if label is None:
            ok[i] = False
        else:
            labels[i] = label
    return labels, ok


def _build(events: dict, cfg: DataConfig, label_source: str, report: LogReport) -> tuple[CTRDataset, np.ndarray]:
    """The dataset of the parsed events and the split (0 train, 1 valid, 2 test) of each sample."""
    users, user = np.unique(events["user"], return_inverse=True)
    items, item = np.unique(events["item"], return_inverse=True)
    item = item + 1
    # Chronological inside each user; lexsort is stable, so equal times keep the file's order.
    order = np.lexsort((events["time"], user))
    user, item, time, label = user[order], item[order], events["time"][order], events["label"][order]
    item_category = np.ones(len(items) + 1, dtype=np.int64)
    num_categories = 2
    if events["category"] is not None:
        names, category = np.unique(events["category"][order], return_inverse=True)
        # Each item's first event in time over all users (ties: file order).
        by_time = np.argsort(time, kind="stable")
        _, first = np.unique(item[by_time], return_index=True)
        first = by_time[first]
        item_category[item[first]] = category[first] + 1
        mixed = np.unique(item[item_category[item] != category + 1])
        if len(mixed):
            report.notes.append(f"{len(mixed)} items appear with more than one category; each keeps the category "
                                f"of its first event")
        num_categories = len(names) + 1
    report.users, report.items, report.categories = len(users), len(items), num_categories - 1

    in_history = label == 1 if cfg.history == "positive" else np.ones(len(item), dtype=bool)
    user_offsets = np.zeros(len(users) + 1, dtype=np.int64)
    user_offsets[1:] = np.cumsum(np.bincount(user[in_history], minlength=len(users)))
    # History events before row r (all users before, then this user's): where r's history ends.
    hist_end = np.cumsum(in_history) - in_history
    is_sample = hist_end - user_offsets[user] >= cfg.min_history
    if (~is_sample).any():
        report.notes.append(f"{int((~is_sample).sum())} events have fewer than min_history={cfg.min_history} "
                            f"history events before them: history only, not samples")
    rows = np.flatnonzero(is_sample)
    part = _time_split(user[rows], cfg.valid_fraction, cfg.test_fraction)

    target = item[rows][:, None]
    sample_label = label[rows][:, None]
    if label_source == "sampled":
        negatives = _sample_negatives(user, item, rows, len(items), cfg, report)
        target = np.concatenate([target, negatives], axis=1)
        sample_label = np.concatenate([sample_label, np.zeros_like(negatives, dtype=np.float32)], axis=1)
    width = target.shape[1]
    kept = target.reshape(-1) > 0
    sample_rows = np.repeat(rows, width)[kept]
    target = target.reshape(-1)[kept]
    sample_label = sample_label.reshape(-1)[kept]
    if not len(sample_rows):
        raise ValueError(f"data.min_history: no event of {report.path} has min_history={cfg.min_history} "
                         f"history events before it, so there is no sample")
    report.samples, report.positive_rate = len(sample_rows), float(sample_label.mean())
    event_index = np.flatnonzero(in_history)
    dataset = CTRDataset(
        item_ids=_tensor(item[event_index]),
        category_ids=_tensor(item_category[item[event_index]]),
        timestamps=_tensor(time[event_index]),
        user_offsets=_tensor(user_offsets),
        sample_user=_tensor(user[sample_rows]),
        hist_end=_tensor(hist_end[sample_rows]),
        target_item=_tensor(target),
        target_category=_tensor(item_category[target]),
        label=torch.from_numpy(sample_label.astype(np.float32)),
        num_items=len(items) + 1,
        num_categories=num_categories,
    )
    return dataset, np.repeat(part, width)[kept]


def _time_split(sample_user: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 valid, 2 test for each sample event (chronological inside each user)."""
    counts = np.bincount(sample_user)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(sample_user)) - starts[sample_user]          # 0 = the user's oldest
    from_newest = counts[sample_user] - 1 - rank                        # 0 = the user's newest
    num_test = np.floor(counts * test_fraction + 0.5).astype(np.int64)[sample_user]
    num_valid = np.floor(counts * valid_fraction + 0.5).astype(np.int64)[sample_user]
    return np.where(from_newest < num_test, 2, np.where(from_newest < num_test + num_valid, 1, 0))


def _sample_negatives(user: np.ndarray, item: np.ndarray, rows: np.ndarray, num_items: int, cfg: DataConfig,
                      report: LogReport) -> np.ndarray:
    """[len(rows), negatives] item ids the user had not interacted with up to each row; 0 where
    none was found (those are dropped and counted)."""
    rng = np.random.default_rng(cfg.seed)
    # The first row of every (user, item) pair, sorted by pair: a candidate j for row r is seen
    # when the pair (user[r], j) has a first row <= r.
    pair, first = np.unique(user * (num_items + 1) + item, return_index=True)
    owner = np.repeat(rows, cfg.negatives)
    drawn = np.zeros(len(owner), dtype=np.int64)
    todo = np.arange(len(owner))
    for _ in range(_NEGATIVE_DRAWS):
        if not len(todo):
            break
        candidate = rng.integers(1, num_items + 1, size=len(todo))
        key = user[owner[todo]] * (num_items + 1) + candidate
        at = np.minimum(np.searchsorted(pair, key), len(pair) - 1)
        seen = (pair[at] == key) & (first[at] <= owner[todo])
        drawn[todo[~seen]] = candidate[~seen]
        todo = todo[seen]
    if len(todo):
        report.notes.append(f"{len(todo)} sampled negatives dropped: their users had interacted with almost "
                            f"every item ({_NEGATIVE_DRAWS} draws found none they had not)")
    return drawn.reshape(len(rows), cfg.negatives)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
