"""Session-hopping statistics of a `CTRDataset`'s event logs, printed before training.

Sessions are cut at time gaps longer than `gap_seconds` (as the MoS "gap" mode does), so the
numbers need no ground truth and work on real logs. For a label per event (the category, and the
true interest when the data has one) they measure how alike events are
- within a session: the same-label rate over pairs of its events, averaged over sessions of 2+;
- across sessions: the cosine of the label histograms of a session and of the session k before
  it (same user), averaged over such pairs, for k = 1..max_back.
Session hopping shows as high "within", low "back 1" and higher "back 2..".
"""
from __future__ import annotations

import numpy as np

from mos.lab.data.dataset import CTRDataset


def session_statistics(ds: CTRDataset, gap_seconds: float = 1800.0, max_back: int = 4) -> dict:
    """Counts and similarities as a flat dict (JSON-friendly; NaN where nothing was measurable)."""
    if not gap_seconds > 0:
        raise ValueError(f"gap_seconds: expected a positive number, got {gap_seconds!r}")
    if isinstance(max_back, bool) or not isinstance(max_back, int) or max_back < 1:
        raise ValueError(f"max_back: expected an integer >= 1, got {max_back!r}")
    timestamps = ds.timestamps.numpy()
    user_offsets = ds.user_offsets.numpy()
    num_events = len(timestamps)
    starts = np.zeros(num_events, dtype=bool)
    starts[1:] = np.diff(timestamps) > gap_seconds
    starts[user_offsets[:-1][np.diff(user_offsets) > 0]] = True
    session = np.cumsum(starts) - 1
    event_user = np.repeat(np.arange(ds.num_users), np.diff(user_offsets))
    session_user = event_user[starts]
    users = int(np.count_nonzero(np.diff(user_offsets)))
    stats = {
        "gap_seconds": float(gap_seconds),
        "users": users,
        "events": num_events,
        "sessions": int(starts.sum()),
        "sessions_per_user": float(starts.sum() / users) if users else float("nan"),
        "items_per_session": float(num_events / starts.sum()) if num_events else float("nan"),
    }
    everything = np.ones(num_events, dtype=bool)
    stats["category_within"], stats["category_back"] = _similarity(
        ds.category_ids.numpy(), everything, session, session_user, max_back)
    if ds.true_interest is not None:
        interest = ds.true_interest.numpy()
        stats["interest_within"], stats["interest_back"] = _similarity(
            interest, interest >= 0, session, session_user, max_back)
    return stats


def format_statistics(stats: dict) -> str:
    """A small aligned text table of `session_statistics`."""
    lines = [
        f"users {stats['users']}  events {stats['events']}  sessions {stats['sessions']} "
        f"(cut at gaps > {stats['gap_seconds']:g} s)",
        f"sessions/user {stats['sessions_per_user']:.2f}  items/session {stats['items_per_session']:.2f}",
    ]
    backs = len(stats["category_back"])
    header = f"{'similarity':<14}{'within':>8}" + "".join(f"{f'back {k}':>8}" for k in range(1, backs + 1))
    lines.append(header)
    for label, key in (("category", "category"), ("true interest", "interest")):
        if f"{key}_within" in stats:
            values = [stats[f"{key}_within"], *stats[f"{key}_back"]]
            lines.append(f"{label:<14}" + "".join(f"{v:>8.3f}" for v in values))
    lines.append("within: same-label rate of event pairs in a session; back k: cosine of label "
                 "histograms of a session and the one k sessions earlier")
    return "\n".join(lines)


def _similarity(labels: np.ndarray, counted: np.ndarray, session: np.ndarray, session_user: np.ndarray,
                max_back: int) -> tuple[float, list]:
    """(within, [back 1..max_back]) for the events where `counted`, using sparse histograms."""
    num_sessions = len(session_user)
    width = int(labels[counted].max()) + 1 if counted.any() else 1
    # Sparse histograms: one (session, label) key per non-empty bin, sorted.
    key, count = np.unique(session[counted] * width + labels[counted], return_counts=True)
    bin_session = key // width
    size = np.bincount(bin_session, weights=count, minlength=num_sessions)
    square = np.bincount(bin_session, weights=count.astype(np.float64) ** 2, minlength=num_sessions)
    pairs = size >= 2
    within = (square[pairs] - size[pairs]) / (size[pairs] * (size[pairs] - 1))
    norm = np.sqrt(square)
    backs = []
    for k in range(1, max_back + 1):
        # Look up the same label in the session k before.
        other = key - k * width
        at = np.minimum(np.searchsorted(key, other), max(len(key) - 1, 0))
        other_count = np.where(key[at] == other, count[at], 0) if len(key) else count
        dot = np.bincount(bin_session, weights=count * other_count, minlength=num_sessions)
        s = np.arange(k, num_sessions)
        valid = (session_user[s] == session_user[s - k]) & (norm[s] > 0) & (norm[s - k] > 0)
        s = s[valid]
        backs.append(_mean(dot[s] / (norm[s] * norm[s - k])))
    return _mean(within), backs


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")
