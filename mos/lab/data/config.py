"""Which data to train on: `DataConfig`, with the synthetic generator's knobs (`data.synthetic`)
apart from the log loader's (`data.logs`).

The options every source reads (the source, the seed, the split fractions, the history cap)
stay at the top of `data`. Values are checked in `__post_init__`, each error naming the dotted key.
"""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Optional

from mos_kernels.checks import check_choice, check_positive

from mos.config import check_field_types, config_section
from mos.lab.moved_options import refuse_moved


# The interaction log shipped with the lab (`data.source: sample`; tools/make_sample_log.py writes it).
SAMPLE_LOG = Path(__file__).resolve().parent / "sample_log.csv"
SOURCES = ("synthetic", "movielens", "sample")
LOG_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}   # log file suffix -> reader
LABEL_SOURCES = ("auto", "label", "rating", "sampled")


@dataclass
class SyntheticConfig:
    """The embedded generator (mos/lab/data/synthetic.py documents the process and the label rule)."""

    num_users: int = 3000
    num_items: int = 1000
    num_interests: int = 12
    interests_per_user: tuple = (2, 4)   # inclusive range
    sessions_per_user: tuple = (6, 16)   # inclusive range
    session_length: tuple = (3, 10)      # inclusive range of items per session
    targets_per_user: int = 6
    noise: float = 0.1                   # probability that a history event is a random item
    taste_dim: int = 4                   # width of the latent item taste vectors
    taste_concentration: float = 3.0     # how strongly a user's picks follow their own taste inside an interest
    popularity_exponent: float = 1.0     # Zipf exponent of item popularity inside an interest pool
    event_gap_mean: float = 60.0         # seconds between events of one session (exponential, capped < 1800)
    session_gap_mean: float = 86400.0    # seconds between sessions beyond a fixed 1 h (exponential)
    target_own_interest: float = 0.5     # probability that a target comes from one of the user's interests
    # Label logit = taste*sim + share*share + recent*recent - bias. Set once from the positive
    # rate (0.32 at these defaults), never from model results.
    label_taste: float = 4.0
    label_share: float = 3.0
    label_recent: float = 1.0
    label_bias: float = 2.0
    # Options of the settings that test theme routing; their defaults give the process above,
    # draw for draw (what they need is drawn from a second stream of the seed).
    category_group: int = 1              # interests per observable category (1: the category names the interest)
    taste_drift: float = 0.0             # how far a user's taste on an interest moves at each new session on it, in [0, 1]
    label_taste_from: str = "all"        # sim reads the events of "all" the sessions on the target's interest, or the "latest"
    label_item: float = 0.0              # weight of a per-item effect (standard normal) in the label logit

    def __post_init__(self):
        self.interests_per_user = tuple(self.interests_per_user)
        self.sessions_per_user = tuple(self.sessions_per_user)
        self.session_length = tuple(self.session_length)
        check_field_types(self, "data.synthetic", ("interests_per_user", "sessions_per_user", "session_length"))
        for name in ("num_users", "num_items", "num_interests", "targets_per_user", "taste_dim",
                     "event_gap_mean", "session_gap_mean"):
            check_positive(f"data.synthetic.{name}", getattr(self, name))
        for name in ("interests_per_user", "sessions_per_user", "session_length"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
                raise ValueError(f"data.synthetic.{name}: expected an inclusive range (lo, hi) with "
                                 f"1 <= lo <= hi, got {bounds!r}")
        # Session hopping needs a second interest to hop to.
        lo, hi = self.interests_per_user
        if lo < 2 or hi > self.num_interests:
            raise ValueError(f"data.synthetic.interests_per_user: expected 2 <= lo <= hi <= num_interests="
                             f"{self.num_interests}, got {self.interests_per_user!r}")
        if self.num_items < self.num_interests:
            raise ValueError(f"data.synthetic.num_items: expected at least num_interests={self.num_interests} "
                             f"(one item per interest pool), got {self.num_items}")
        for name in ("noise", "target_own_interest"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"data.synthetic.{name}: expected a number in [0, 1], got {value!r}")
        check_positive("data.synthetic.category_group", self.category_group)
        if not 0 <= self.taste_drift <= 1:
            raise ValueError(f"data.synthetic.taste_drift: expected a number in [0, 1], got {self.taste_drift!r}")
        check_choice("data.synthetic.label_taste_from", self.label_taste_from, ("all", "latest"))
        for name in ("taste_concentration", "popularity_exponent"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"data.synthetic.{name}: expected a number >= 0, got {value!r}")


@dataclass
class LogConfig:
    """How an interaction log is read (mos/lab/data/logs.py documents the rules); MovieLens-100k
    reads its label and history options, its columns being fixed."""

    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = "timestamp"       # seconds or ISO-8601; without it the row order is the time order
    label_column: str = "label"          # 0/1
    rating_column: str = "rating"
    category_column: str = "category"    # optional
    # Labels: the "label" column, "rating" >= rating_threshold, "sampled" negatives, or "auto":
    # the first of those the file's columns allow.
    label_source: str = "auto"
    rating_threshold: float = 4.0
    negatives: int = 1                   # "sampled": negatives drawn per event
    history: str = "all"                 # history events: "all" or only "positive" ones
    min_history: int = 1                 # history events an event needs before it to become a sample
    drop_duplicates: bool = False        # drop rows repeating an earlier row in every column read (else: a warning)

    def __post_init__(self):
        check_field_types(self, "data.logs")
        check_choice("data.logs.label_source", self.label_source, LABEL_SOURCES)
        check_choice("data.logs.history", self.history, ("all", "positive"))
        check_positive("data.logs.negatives", self.negatives)
        if isinstance(self.min_history, bool) or not isinstance(self.min_history, int) or self.min_history < 0:
            raise ValueError(f"data.logs.min_history: expected an int >= 0, got {self.min_history!r}")
        for name in ("user_column", "item_column", "time_column", "label_column", "rating_column", "category_column"):
            if not getattr(self, name):
                raise ValueError(f"data.logs.{name}: expected a column name, got an empty string")


@refuse_moved("data")
@dataclass
class DataConfig:
    """Which data to train on: the embedded synthetic generator, MovieLens-100k or your own log.

    `synthetic` applies to "synthetic" only, `logs` to "movielens" and to a log file."""

    # "synthetic" | "movielens" | "sample" (the log shipped with the lab, read as the file it is) |
    # a path to a .csv, .tsv or .parquet log
    source: str = "synthetic"
    seed: int = 0                        # generator, split and negative-sampling seed (fixed across training seeds)
    valid_fraction: float = 0.1          # of users (synthetic), of each user's newest samples (logs)
    test_fraction: float = 0.1           # of users (synthetic), of each user's newest samples (logs)
    max_history: Optional[int] = None    # newest history events a sample shows the model; null: all
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    logs: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        self.synthetic = config_section("data.synthetic", self.synthetic, SyntheticConfig)
        self.logs = config_section("data.logs", self.logs, LogConfig)
        check_field_types(self, "data")
        if self.source not in SOURCES and not any(self.source.lower().endswith(suffix) for suffix in LOG_FORMATS):
            raise ValueError(f"data.source: expected 'synthetic', 'movielens', 'sample' or a path to a log ending in "
                             f"{', '.join(LOG_FORMATS)}, got {self.source!r}")
        if self.source not in SOURCES and not os.path.isfile(self.source):
            raise ValueError(f"data.source: expected an existing log file, got {self.source!r} (no such file)")
        if self.max_history is not None:
            check_positive("data.max_history", self.max_history)
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"data.{name}: expected a number in [0, 1], got {value!r}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.test_fraction: expected valid_fraction + test_fraction < 1 (training takes the "
                             f"rest), got {self.valid_fraction!r} + {self.test_fraction!r}")
        if not 0 <= self.seed < 2 ** 32:      # numpy's and torch's generators take these
            raise ValueError(f"data.seed: expected an int in [0, 2^32), got {self.seed!r}")

    @property
    def log_path(self) -> str:
        """The log file a log source reads: the shipped sample's path for "sample" (kept by name
        in the config, so a run's record does not depend on where the package is installed)."""
        return str(SAMPLE_LOG) if self.source == "sample" else self.source
