"""Your own interaction log (CSV, TSV or Parquet) as a `CTRDataset`, split by time.

The file has one row per event. Columns (names are `LogConfig` fields, `data.logs.*`): a user id and an item
id (required), a timestamp (seconds as a number, or an ISO-8601 date; without the column the
file's row order is the time order), and optionally a 0/1 label, a rating and a category.

The file. `mos.data.log_files` checks it before reading a row (empty, a binary file under a text
suffix or the reverse, the id columns missing) and strips a UTF-8 byte-order mark.

Rows. A row is used when it has a value in every column read, its ids are not empty, and its
timestamp, label and rating parse. Every other row is counted under the first reason it fails,
with a few examples (line number and value), in the `LogReport` that `load_log` returns and
training prints: nothing is dropped silently. A file with no usable row stops with the reasons.
The report also warns about input that loads but is probably wrong (`mos.data.checks`):
timestamps in milliseconds or microseconds, and exact duplicate rows (`data.logs.drop_duplicates`
drops them, counted like refused rows).

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

Scoring (`load_log(..., vocabulary=...)`, what `mos predict` reads): items are numbered as the
trained model numbers them, rows with an item it never saw are refused, and every event with
`min_history` history events before it is one sample, labelled when the log has labels.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mos.data.config import LOG_FORMATS, DataConfig, LogConfig
from mos.data import checks
from mos.data.dataset import CTRDataset
from mos.data.log_files import read_columns
from mos.errors import InputError

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


@dataclass
class Vocabulary:
    """How a model trained on a log numbers its items: id i + 1 is `items[i]` (0 is padding), with
    category id `item_category[i + 1]`. Checkpoints keep it (as a dict) so that new logs are
    numbered the same way when they are scored."""

    items: list
    item_category: list
    num_categories: int


@dataclass
class LogData:
    """A loaded log: all samples, the time split (train, valid, test) and the report; per sample
    its line in the file and its split (0 train, 1 valid, 2 test); the users' and items' names."""

    dataset: CTRDataset
    splits: tuple
    report: LogReport
    sample_line: np.ndarray
    sample_split: np.ndarray
    users: np.ndarray
    vocabulary: Vocabulary


def load_log(path, cfg: DataConfig, vocabulary: Optional[Vocabulary] = None) -> LogData:
    """Read the log at `path` with `cfg`'s column names and label rules (module docstring).

    With the `vocabulary` of a trained model the log is read for scoring: items are numbered as
    the model knows them (rows with an item it never saw are refused and counted), labels come
    from a label or rating column when there is one and are absent (0) otherwise, and no negative
    is sampled."""
    path = Path(path)
    kind = LOG_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"data.source: expected a log file ending in {', '.join(LOG_FORMATS)}, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data.source: no such file {str(path)!r}")
    options = cfg.logs
    wanted = {role: getattr(options, f"{role}_column") for role in _ROLES}
    header, columns, fields, line = read_columns(path, kind, wanted)
    report = LogReport(path=str(path), rows=len(line))
    label_source = _label_source(options, header, scoring=vocabulary is not None)
    report.label_source = {"label": f"column {options.label_column!r}",
                           "rating": f"{options.rating_column!r} >= {options.rating_threshold:g}",
                           "sampled": f"{options.negatives} sampled negative(s) per event",
                           "none": "nowhere (no label or rating column; scores only)"}[label_source]
    report.has_timestamps = "time" in columns
    report.has_labels = label_source != "none"
    known = None if vocabulary is None else set(vocabulary.items)
    events = _parse_rows(columns, fields, len(header), line, options, label_source, report, known)
    if report.has_timestamps:
        checks.warn_time_unit(events["time"], options.time_column, report.warnings)
    events = checks.duplicate_rows(events, [getattr(options, f"{role}_column") for role in columns], options, report)
    return _build(events, cfg, label_source, report, vocabulary)


# Each role's column name is the LogConfig field `<role>_column`.
_ROLES = ("user", "item", "time", "label", "rating", "category")


def _label_source(cfg: LogConfig, header: list, scoring: bool) -> str:
    """Where the labels come from; when scoring, "none" where the log has no labels to read."""
    if cfg.label_source == "auto" or (scoring and cfg.label_source == "sampled"):
        if cfg.label_column in header:
            return "label"
        if cfg.rating_column in header:
            return "rating"
        return "none" if scoring else "sampled"
    if cfg.label_source != "sampled":
        column = getattr(cfg, f"{cfg.label_source}_column")
        if column not in header:
            raise InputError(f"data.logs.{cfg.label_source}_column: label_source is {cfg.label_source!r}, so the log "
                             f"needs a column {column!r}; got columns {header}")
    return cfg.label_source


def _parse_rows(columns: dict, fields: np.ndarray, width: int, line: np.ndarray, cfg: LogConfig,
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
        seconds, ok = _parse(columns["time"], refused, _as_seconds, np.int64)
        refuse(f"column {cfg.time_column!r} is not seconds or an ISO-8601 date", ~ok, columns["time"])
    else:
        seconds = np.arange(num_rows, dtype=np.int64)
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
            "time": seconds[used], "label": label[used], "value": value[used], "line": line[used]}


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


def _as_seconds(value):
    if isinstance(value, datetime.datetime):
        moment = value
    else:
        number = None if isinstance(value, bool) else _as_number(value)
        if number is not None:
            return int(np.floor(number))
        try:
            moment = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    if moment.tzinfo is None:   # a date without a zone is read as UTC, the same on every machine
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(np.floor(moment.timestamp()))


_LABELS = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}


def _as_label(value):
    return _LABELS.get(str(value).strip().lower())


def _number(events: dict, report: LogReport, vocabulary: Optional[Vocabulary]):
    """(user names, user index per event, item id per event, the vocabulary) in file order:
    items and categories numbered from the log itself, or by a trained model's `vocabulary`."""
    users, user = np.unique(events["user"], return_inverse=True)
    if vocabulary is not None:
        index = {name: at + 1 for at, name in enumerate(vocabulary.items)}
        report.categories = vocabulary.num_categories - 1
        return users, user, np.array([index[name] for name in events["item"]], dtype=np.int64), vocabulary
    items, item = np.unique(events["item"], return_inverse=True)
    item = item + 1
    item_category = np.ones(len(items) + 1, dtype=np.int64)
    num_categories = 2
    if events["category"] is not None:
        names, category = np.unique(events["category"], return_inverse=True)
        # Each item's first event in time over all users (ties: file order).
        by_time = np.argsort(events["time"], kind="stable")
        _, first = np.unique(item[by_time], return_index=True)
        first = by_time[first]
        item_category[item[first]] = category[first] + 1
        mixed = np.unique(item[item_category[item] != category + 1])
        if len(mixed):
            report.notes.append(f"{len(mixed)} items appear with more than one category; each keeps the category "
                                f"of its first event")
        num_categories = len(names) + 1
    report.categories = num_categories - 1
    return users, user, item, Vocabulary(items.tolist(), item_category.tolist(), num_categories)


def _build(events: dict, cfg: DataConfig, label_source: str, report: LogReport,
           vocabulary: Optional[Vocabulary]) -> LogData:
    """The dataset of the parsed events, split by time (a single part when scoring)."""
    users, user, item, vocabulary = _number(events, report, vocabulary)
    item_category = np.asarray(vocabulary.item_category, dtype=np.int64)
    report.users, report.items = len(users), len(vocabulary.items)
    # Chronological inside each user; lexsort is stable, so equal times keep the file's order.
    order = np.lexsort((events["time"], user))
    user, item, time, label, line = (user[order], item[order], events["time"][order], events["label"][order],
                                     events["line"][order])
    options = cfg.logs
    if options.history == "positive" and label_source == "none":
        raise InputError(f"data.logs.history: 'positive' keeps only positive events in histories, but {report.path} "
                         f"has no {options.label_column!r} or {options.rating_column!r} column to tell them apart")
    in_history = label == 1 if options.history == "positive" else np.ones(len(item), dtype=bool)
    user_offsets = np.zeros(len(users) + 1, dtype=np.int64)
    user_offsets[1:] = np.cumsum(np.bincount(user[in_history], minlength=len(users)))
    # History events before row r (all users before, then this user's): where r's history ends.
    hist_end = np.cumsum(in_history) - in_history
    is_sample = hist_end - user_offsets[user] >= options.min_history
    if (~is_sample).any():
        report.notes.append(f"{int((~is_sample).sum())} events have fewer than min_history={options.min_history} "
                            f"history events before them: history only, not samples")
    rows = np.flatnonzero(is_sample)
    if not len(rows):
        raise InputError(f"data.logs.min_history: no event of {report.path} has min_history={options.min_history} "
                         f"history events before it, so there is no sample")
    part = _time_split(user[rows], cfg.valid_fraction, cfg.test_fraction)

    target = item[rows][:, None]
    sample_label = label[rows][:, None]
    if label_source == "sampled":
        negatives = _sample_negatives(user, item, rows, len(vocabulary.items), cfg, report)
        target = np.concatenate([target, negatives], axis=1)
        sample_label = np.concatenate([sample_label, np.zeros_like(negatives, dtype=np.float32)], axis=1)
    width = target.shape[1]
    kept = target.reshape(-1) > 0
    sample_rows = np.repeat(rows, width)[kept]
    target = target.reshape(-1)[kept]
    sample_label = sample_label.reshape(-1)[kept]
    report.samples = len(sample_rows)
    report.positive_rate = float(sample_label.mean()) if report.has_labels else float("nan")
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
        num_items=len(vocabulary.items) + 1,
        num_categories=vocabulary.num_categories,
    )
    sample_split = np.repeat(part, width)[kept]
    splits = tuple(dataset.subset(torch.from_numpy(sample_split == at)) for at in range(3))
    return LogData(dataset=dataset, splits=splits, report=report, sample_line=line[sample_rows],
                   sample_split=sample_split, users=users, vocabulary=vocabulary)


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
    owner = np.repeat(rows, cfg.logs.negatives)
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
    return drawn.reshape(len(rows), cfg.logs.negatives)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
