"""MovieLens-100k, fetched on first use and cached: 943 users, 1682 movies, 100,000 ratings.

The data's licence (GroupLens) forbids redistribution, so neither this repository nor the `mos`
package carries it. The `recbole==1.2.1` wheel on PyPI does (`dataset_example/ml-100k`), so
`fetch` downloads that wheel with pip (no dependencies, nothing installed), checks its sha256
against the one recorded here, and writes the ratings joined with each movie's genres into
`$MOS_DATA_DIR/ml-100k/ml-100k.tsv` (default `~/.cache/mos`), atomically: a temporary file
renamed into place, so an interrupted fetch never leaves a half-written cache.

The cached log has the columns `user_id`, `item_id`, `rating`, `timestamp` (seconds) and
`category`: the movie's genres joined by "|" ("Animation|Children's|Comedy"), so the category
keeps all of them rather than one picked out of several. `load` reads it with `mos.lab.data.logs`:
label rating >= `data.logs.rating_threshold` (4 by default), split by time, gap sessions possible.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

from mos.lab.data.config import DataConfig
from mos.lab.data.logs import LogData, Vocabulary, load_log

WHEEL = "recbole==1.2.1"
WHEEL_FILE = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_RATINGS = "recbole/dataset_example/ml-100k/ml-100k.inter"
_MOVIES = "recbole/dataset_example/ml-100k/ml-100k.item"
_DOWNLOAD_SECONDS = 300


class MovieLensUnavailable(RuntimeError):
    """The data could not be fetched (no network, no pip, a wheel that is not the expected one)."""


def cache_dir() -> Path:
    """`$MOS_DATA_DIR`, or `~/.cache/mos` when it is not set."""
    return Path(os.environ.get("MOS_DATA_DIR") or Path.home() / ".cache" / "mos")


def log_path() -> Path:
    return cache_dir() / "ml-100k" / "ml-100k.tsv"


def fetch() -> Path:
    """The cached MovieLens-100k log, downloaded and converted first if it is not there yet."""
    target = log_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recbole-wheel-") as download:
        wheel = _download_wheel(Path(download))
        rows = _ratings_with_genres(wheel)
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    with open(temporary, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow(["user_id", "item_id", "rating", "timestamp", "category"])
        writer.writerows(rows)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, target)
    return target


def load(cfg: DataConfig, vocabulary: Optional[Vocabulary] = None) -> LogData:
    """MovieLens-100k as a log: `cfg`'s label and split options, the cached file's columns
    (`vocabulary`: read for scoring, as `load_log` does)."""
    columns = dict(user_column="user_id", item_column="item_id", time_column="timestamp",
                   rating_column="rating", category_column="category")
    return load_log(fetch(), replace(cfg, source=str(log_path()), logs=replace(cfg.logs, **columns)), vocabulary)


def _download_wheel(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(directory)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_DOWNLOAD_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MovieLensUnavailable(f"`pip download {WHEEL}` did not finish: {err}") from None
    wheel = directory / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        last = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise MovieLensUnavailable(f"`pip download {WHEEL}` failed (exit {done.returncode}): {last}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise MovieLensUnavailable(f"{WHEEL_FILE}: expected sha256 {WHEEL_SHA256}, got {digest}; "
                                   f"the file is not the wheel this loader was written for")
    return wheel


def _ratings_with_genres(wheel: Path) -> list[list[str]]:
    """[user, item, rating, timestamp, genres] rows of the wheel's ml-100k files, in their order."""
    with zipfile.ZipFile(wheel) as archive:
        ratings = _atomic_table(archive, _RATINGS)
        movies = _atomic_table(archive, _MOVIES)
    genres = {row["item_id"]: "|".join(row["class"].split()) for row in movies}
    # RecBole stores the timestamp as a float column; its values are whole seconds.
    return [[row["user_id"], row["item_id"], row["rating"], str(int(float(row["timestamp"]))),
             genres.get(row["item_id"], "")] for row in ratings]


def _atomic_table(archive: zipfile.ZipFile, name: str) -> list[dict]:
    """A RecBole atomic file (tab-separated, header `field:type`) as dicts keyed by field."""
    text = io.TextIOWrapper(archive.open(name), encoding="utf-8")
    reader = csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE)
    fields = [column.split(":")[0] for column in next(reader)]
    return [dict(zip(fields, row)) for row in reader]
