"""Your own interaction log (CSV, TSV or Parquet) as a `CTRDataset`, split by time.

The file has one row per event. Columns (names are `LogConfig` fields, `data.logs.*`): a user id and an item
id (required), a timestamp (seconds as a number, or an ISO-8601 date; without the column the
file's row order is the time order), and optionally a 0/1 label, a rating and a category.

The file. `mos.lab.data.log_files` checks it before reading a row (empty, a binary file under a text
suffix or the reverse, the id columns missing) and strips a UTF-8 byte-order mark;
`mos.lab.data.log_rows` parses the rows' values and counts the refused ones.

Rows. A row is used when it has a value in every column read, its ids are not empty, and its
timestamp, label and rating parse. Every other row is counted under the first reason it fails,
with a few examples (line number and value), in the `LogReport` that `load_log` returns and
training prints: nothing is dropped silently. A file with no usable row stops with the reasons.
The report also warns about input that loads but is probably wrong (`mos.lab.data.checks`):
timestamps in milliseconds or microseconds, and exact duplicate rows (`data.logs.drop_duplicates`
drops them, counted like refused rows).

Refused whole, naming the file, line or option: a quoted field running over lines (an unclosed
quote), a wanted column twice in the header, an optional column the config names that the file
lacks, a Parquet column of lists or structs, a file that does not parse.

Order and vocabularies. Events are sorted by user, then exact timestamp (fractions of a second
included; the dataset keeps whole seconds); ties keep the file's order.
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

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mos.lab.data.config import LOG_FORMATS, DataConfig, LogConfig
from mos.lab.data import checks
from mos.lab.data.dataset import CTRDataset
from mos.lab.data.log_files import read_columns
from mos.lab.data.log_rows import LogReport, parse_rows
from mos.lab.errors import InputError

_NEGATIVE_DRAWS = 100         # rounds of redrawing a sampled negative the user had already seen


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
    _check_named_columns(options, header, path, scoring=vocabulary is not None)
    report = LogReport(path=str(path), rows=len(line))
    label_source = _label_source(options, header, scoring=vocabulary is not None)
    report.label_source = {"label": f"column {options.label_column!r}",
                           "rating": f"{options.rating_column!r} >= {options.rating_threshold:g}",
                           "sampled": f"{options.negatives} sampled negative(s) per event",
                           "none": "nowhere (no label or rating column; scores only)"}[label_source]
    report.has_timestamps = "time" in columns
    report.has_labels = label_source != "none"
    known = None if vocabulary is None else set(vocabulary.items)
    events = parse_rows(columns, fields, len(header), line, options, label_source, report, known)
    if report.has_timestamps:
        checks.warn_time_unit(events["time"], options.time_column, report.warnings)
    events = checks.duplicate_rows(events, [getattr(options, f"{role}_column") for role in columns], options, report)
    return _build(events, cfg, label_source, report, vocabulary)


def _check_named_columns(options: LogConfig, header: list, path: Path, scoring: bool) -> None:
    """An optional column (time, label, rating, category) the config names away from its default
    must be in the file: a missing default one means the log has none, a missing named one is a
    typo that would silently drop the column (row order as time, one category for all). Scoring
    reads no labels and takes the categories from the model's vocabulary: a log to score needs
    only the time column it names."""
    for role in ("time",) if scoring else _ROLES[2:]:
        name, default = getattr(options, f"{role}_column"), getattr(LogConfig, f"{role}_column")
        if name != default and name not in header:
            raise InputError(f"data.logs.{role}_column: expected a column {name!r} in {path} (named in the "
                             f"config; the default {default!r} would be optional), got columns {header}")


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
        by_time = np.argsort(events["exact_time"], kind="stable")
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
    order = np.lexsort((events["exact_time"], user))
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
