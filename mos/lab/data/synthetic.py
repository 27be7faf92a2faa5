"""The embedded synthetic CTR data: a session-hopping generator and its ground truth.

Generative process (all draws from one `numpy.random.Generator(seed)`, `data.seed`; the fields
named are those of `mos.lab.data.config.SyntheticConfig`, `data.synthetic` in a config file):

Items. Ids 1..num_items (0 is padding). Every item belongs to one of `num_interests` latent
interests; the pools differ in size by at most one item. An item's observable category is its
interest id + 1 (the "genre"; 0 is padding), so a category names the interest of the item, but
not whether the user picked it on purpose (see noise below). Inside its pool an item has a random
popularity rank r = 1, 2, ... and popularity 1 / r**popularity_exponent (Zipf). Every item also
has a taste vector, a random unit vector in R^taste_dim.

Users. User u holds between interests_per_user[0] and [1] distinct interests (uniform), with
preference weights w_u ~ Dirichlet(1, ..., 1) and, for each interest k held, a taste direction
p_{u,k} (a random unit vector).

History. n_u sessions, n_u uniform in sessions_per_user. Each session is on ONE interest, drawn
from w_u renormalised over the held interests other than the previous session's: never the same
interest twice in a row (session hopping), so an interest comes back after other ones. Session
length is uniform in session_length. Each event is, with probability `noise`, a uniform random
item of any interest (true interest -1); otherwise an item of the session's pool k drawn with
probability proportional to popularity * exp(taste_concentration * <taste_item, p_{u,k}>).
Events keep their true interest (`CTRDataset.true_interest`).

Time. Int64 seconds. A user starts at a uniform time in the 30 days after 2024-01-01. Inside a
session, consecutive events are floor(Exponential(event_gap_mean)) apart, capped at 1799 s;
between sessions the gap is 3600 s + floor(Exponential(session_gap_mean)). A 1800-s gap rule
therefore recovers the sessions exactly.

Targets. targets_per_user impressions per user, all shown after the whole history (hist_end is
the end of the user's events). With probability target_own_interest the target's interest is one
of the user's, drawn by w_u; otherwise it is uniform over all interests (it may still be one of
the user's). The target item is drawn from that interest's pool by popularity alone.

Label. y ~ Bernoulli(sigmoid(score)) with, for a target item t of interest k,

    score = label_taste * sim + label_share * share + label_recent * recent - label_bias
    sim    = mean, over the user's history events whose true interest is k, of cos(taste_t, taste_e)
             (0 when there is none: then the user does not hold k or never visited it)
    share  = (number of the user's sessions on k) / n_u
    recent = 1 if the user's most recent session is on k, else 0

Noise events never enter `sim`. The label thus rewards finding the sessions on the target's
interest (`sim` needs their items, not the rest of the history), how often the user comes back to
it, and whether it is the current one. Defaults (4, 3, 1, 2) were set once from the positive rate
alone (0.32 at the default SyntheticConfig), before any model was trained.

Options of the settings that test theme routing (defaults: the process above, draw for draw;
what they draw comes from a second stream, numpy.random.default_rng([seed, 1])):
- `category_group` g: an item's category is interest // g + 1, so with g > 1 one category covers
  g interests and the interest of an event must be inferred from which items share its sessions.
- `taste_drift` d in [0, 1]: the user's taste direction on an interest moves at every new session
  on it, p_v = unit(sqrt(1 - d^2) p_{v-1} + d z_v) with z_v a random unit vector (p_0 = p_{u,k});
  each session's items are drawn with its own p_v.
- `label_taste_from`: "latest" makes `sim` the mean over the events of the user's LATEST session
  on k only (0 when it holds only noise): which of the sessions on k is the newest matters, and
  with session hopping it is rarely the newest session of the history.
- `label_item`: adds label_item * e_t to the score, e_t a standard normal effect per item.

`generate(cfg, seed)` returns a `CTRDataset`; `generate(cfg, seed, return_truth=True)` also returns the
`SyntheticTruth` (sessions, user interests, tastes, the label score) that the tests and the
routing metrics read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mos.lab.data.config import SyntheticConfig
from mos.lab.data.dataset import CTRDataset

_EPOCH = 1_704_067_200               # 2024-01-01 00:00:00 UTC
_START_SPREAD = 30 * 86_400          # users start within 30 days
_EVENT_GAP_MAX = 1_799               # in-session gaps stay below the 1800-s session cut
_SESSION_GAP_MIN = 3_600             # sessions are at least 1 h apart


@dataclass
class SyntheticTruth:
    """The latent state behind a generated dataset (indices as in the dataset)."""

    item_interest: torch.Tensor      # [num_items + 1] int64, -1 for the padding id 0
    item_taste: torch.Tensor         # [num_items + 1, taste_dim] float64, zeros for id 0
    user_interests: torch.Tensor     # [U, M] int64 interests held, -1 padded (M = interests_per_user[1])
    user_weights: torch.Tensor       # [U, M] float64 preference weights, 0 on padding
    user_taste: torch.Tensor         # [U, M, taste_dim] float64 taste direction per held interest
    session_offsets: torch.Tensor    # [S+1] int64 over the dataset's events
    session_user: torch.Tensor       # [S] int64
    session_interest: torch.Tensor   # [S] int64
    score: torch.Tensor              # [N] float64 label logit of every sample


def generate(cfg: SyntheticConfig, seed: int = 0, *, return_truth: bool = False):
    """The synthetic dataset of `cfg` drawn from `seed` (and its `SyntheticTruth` when `return_truth`)."""
    rng = np.random.default_rng(seed)
    # The options added for the routing settings draw from a second stream, so that at their
    # defaults every draw of the main stream, and so the data, is what it was before them.
    side = np.random.default_rng([seed, 1])
    item_effect = side.standard_normal(cfg.num_items + 1) * (np.arange(cfg.num_items + 1) > 0)
    item_interest, item_taste, pool_items, popularity = _make_items(cfg, rng)
    interests, weights, user_taste = _make_users(cfg, rng)
    session_user, session_slot, session_len = _make_sessions(cfg, rng, weights)
    num_users = len(weights)
    session_taste = _drifted_tastes(cfg, side, user_taste, session_user, session_slot)
    event_user, event_slot, item, noise = _make_events(cfg, rng, item_taste, pool_items, popularity, interests,
                                                       user_taste, session_user, session_slot, session_len,
                                                       session_taste)
    true_interest = np.where(noise, -1, interests[event_user, event_slot])

    session_offsets = np.concatenate([[0], np.cumsum(session_len)])
    events_per_user = np.bincount(event_user, minlength=num_users)
    user_offsets = np.concatenate([[0], np.cumsum(events_per_user)])
    timestamps = _make_times(cfg, rng, session_offsets, user_offsets)
    sample_user, target_interest, target_item = _make_targets(cfg, rng, interests, weights, pool_items, popularity)

    score = _label_score(cfg, item_taste, interests, session_user, session_slot, event_user, event_slot,
                         item, noise, sample_user, target_item, target_interest, session_offsets)
    score = score + cfg.label_item * item_effect[target_item]
    label = rng.random(len(score)) < 1.0 / (1.0 + np.exp(-score))

    ds = CTRDataset(
        item_ids=_tensor(item),
        category_ids=_tensor(item_interest[item] // cfg.category_group + 1),
        timestamps=_tensor(timestamps),
        user_offsets=_tensor(user_offsets),
        sample_user=_tensor(sample_user),
        hist_end=_tensor(user_offsets[sample_user + 1]),
        target_item=_tensor(target_item),
        target_category=_tensor(target_interest // cfg.category_group + 1),
        label=_tensor(label.astype(np.float32)),
        num_items=cfg.num_items + 1,
        num_categories=(cfg.num_interests - 1) // cfg.category_group + 2,
        true_interest=_tensor(true_interest),
    )
    if not return_truth:
        return ds
    truth = SyntheticTruth(
        item_interest=_tensor(item_interest),
        item_taste=_tensor(item_taste),
        user_interests=_tensor(interests),
        user_weights=_tensor(weights),
        user_taste=_tensor(user_taste),
        session_offsets=_tensor(session_offsets),
        session_user=_tensor(session_user),
        session_interest=_tensor(interests[session_user, session_slot]),
        score=_tensor(score),
    )
    return ds, truth


def _make_items(cfg: SyntheticConfig, rng: np.random.Generator):
    """Interest, taste and the per-interest pools [K, P] (item ids by popularity rank, 0 padded)."""
    n, k = cfg.num_items, cfg.num_interests
    item_interest = np.full(n + 1, -1, dtype=np.int64)
    item_interest[1:] = rng.permutation(np.arange(n) % k)
    item_taste = _unit(rng.standard_normal((n + 1, cfg.taste_dim)))
    item_taste[0] = 0.0
    # A random order of the ids, grouped by interest: the position inside a group is the rank.
    order = rng.permutation(n) + 1
    order = order[np.argsort(item_interest[order], kind="stable")]
    pool_size = np.bincount(item_interest[1:], minlength=k)
    rank = np.arange(n) - np.repeat(np.cumsum(pool_size) - pool_size, pool_size)
    pool_items = np.zeros((k, pool_size.max()), dtype=np.int64)
    pool_items[item_interest[order], rank] = order
    popularity = np.zeros(pool_items.shape)
    popularity[item_interest[order], rank] = (rank + 1.0) ** -cfg.popularity_exponent
    return item_interest, item_taste, pool_items, popularity


def _make_users(cfg: SyntheticConfig, rng: np.random.Generator):
    """Held interests [U, M] (-1 padded), Dirichlet weights [U, M] and taste directions [U, M, D]."""
    lo, hi = cfg.interests_per_user
    count = rng.integers(lo, hi + 1, size=cfg.num_users)
    chosen = np.argsort(rng.random((cfg.num_users, cfg.num_interests)), axis=1)[:, :hi]
    held = np.arange(hi) < count[:, None]
    interests = np.where(held, chosen, -1)
    weights = rng.gamma(1.0, size=(cfg.num_users, hi)) * held
    weights /= weights.sum(axis=1, keepdims=True)
    user_taste = _unit(rng.standard_normal((cfg.num_users, hi, cfg.taste_dim)))
    return interests, weights, user_taste


def _make_sessions(cfg: SyntheticConfig, rng: np.random.Generator, weights: np.ndarray):
    """Per session, in user then time order: its user, its held-interest slot and its length."""
    num_users = len(weights)
    fewest, most = cfg.sessions_per_user
    num_sessions = rng.integers(fewest, most + 1, size=num_users)
    slots = np.empty((num_users, most), dtype=np.int64)
    users = np.arange(num_users)
    previous = None
    # Sessions depend on their predecessor, so the loop runs over session positions (<= most),
    # each step drawing for every user at once.
    for j in range(most):
        allowed = weights.copy()
        if previous is not None:
            allowed[users, previous] = 0.0
        previous = _draw(allowed, users, rng)
        slots[:, j] = previous
    kept = np.arange(most) < num_sessions[:, None]
    session_user = np.repeat(users, num_sessions)
    shortest, longest = cfg.session_length
    session_len = rng.integers(shortest, longest + 1, size=len(session_user))
    return session_user, slots[kept], session_len


def _drifted_tastes(cfg: SyntheticConfig, side: np.random.Generator, user_taste, session_user, session_slot):
    """[S, D] the user's taste direction on each session's interest, or None without drift.

    The v-th session of user u on its interest (v = 0, 1, ...) has taste p_v with p_0 = p_{u,k}
    and p_v = unit(sqrt(1 - drift^2) p_{v-1} + drift z_v), z_v a random unit vector: the taste
    moves a step at every return to the interest, so the latest session's items differ from the
    interest's older ones."""
    if cfg.taste_drift == 0:
        return None
    max_held = user_taste.shape[1]
    key = session_user * max_held + session_slot
    # Visit number of every session on its (user, interest): sessions are in user-time order.
    order = np.argsort(key, kind="stable")
    first = np.r_[True, key[order][1:] != key[order][:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))
    visit = np.empty(len(key), dtype=np.int64)
    visit[order] = np.arange(len(key)) - start
    steps = _unit(side.standard_normal((len(key), user_taste.shape[2])))
    keep = np.sqrt(1.0 - cfg.taste_drift ** 2)
    current = user_taste.reshape(-1, user_taste.shape[2]).copy()
    taste = np.empty((len(key), user_taste.shape[2]))
    for v in range(int(visit.max()) + 1 if len(key) else 0):
        at = visit == v
        if v:
            current[key[at]] = _unit(keep * current[key[at]] + cfg.taste_drift * steps[at])
        taste[at] = current[key[at]]
    return taste


def _make_events(cfg: SyntheticConfig, rng: np.random.Generator, item_taste, pool_items, popularity, interests,
                 user_taste, session_user, session_slot, session_len, session_taste=None):
    """Per event, in user then time order: its user, held-interest slot, item and whether it is noise."""
    max_held = interests.shape[1]
    event_session = np.repeat(np.arange(len(session_user)), session_len)
    event_user = session_user[event_session]
    event_slot = session_slot[event_session]
    noise = rng.random(len(event_session)) < cfg.noise
    item = np.empty(len(event_session), dtype=np.int64)
    if session_taste is None:
        # Item choice weights of every (user, held interest) row, by popularity and the user's taste.
        held = interests >= 0
        row_interest = np.where(held, interests, 0)          # padding rows get weight 0 below
        row_pool = pool_items[row_interest]                                           # [U, M, P]
        affinity = np.einsum("umpd,umd->ump", item_taste[row_pool], user_taste)
        pick_weights = popularity[row_interest] * np.exp(cfg.taste_concentration * affinity) * held[:, :, None]
        row_pool, pick_weights = row_pool.reshape(-1, row_pool.shape[-1]), pick_weights.reshape(-1, row_pool.shape[-1])
        rows = event_user[~noise] * max_held + event_slot[~noise]
    else:
        # Drifting taste: the weights of every session, by popularity and that session's taste.
        session_interest = interests[session_user, session_slot]
        row_pool = pool_items[session_interest]                                       # [S, P]
        affinity = np.einsum("spd,sd->sp", item_taste[row_pool], session_taste)
        pick_weights = popularity[session_interest] * np.exp(cfg.taste_concentration * affinity)
        rows = event_session[~noise]
    item[~noise] = row_pool[rows, _draw(pick_weights, rows, rng)]
    item[noise] = rng.integers(1, cfg.num_items + 1, size=int(noise.sum()))
    return event_user, event_slot, item, noise


def _make_targets(cfg: SyntheticConfig, rng: np.random.Generator, interests, weights, pool_items, popularity):
    """Per sample, users in order: its user, the target's interest and the target item."""
    sample_user = np.repeat(np.arange(len(weights)), cfg.targets_per_user)
    own = rng.random(len(sample_user)) < cfg.target_own_interest
    own_interest = interests[sample_user, _draw(weights, sample_user, rng)]
    any_interest = rng.integers(0, cfg.num_interests, size=len(sample_user))
    target_interest = np.where(own, own_interest, any_interest)
    target_item = pool_items[target_interest, _draw(popularity, target_interest, rng)]
    return sample_user, target_interest, target_item


def _make_times(cfg: SyntheticConfig, rng: np.random.Generator, session_offsets: np.ndarray,
                user_offsets: np.ndarray) -> np.ndarray:
    """Int64 timestamps: each event's gap to its predecessor, summed inside each user."""
    num_events = int(session_offsets[-1])
    gap = np.minimum(np.floor(rng.exponential(cfg.event_gap_mean, num_events)), _EVENT_GAP_MAX).astype(np.int64)
    session_first = session_offsets[:-1]
    gap[session_first] = _SESSION_GAP_MIN + np.floor(
        rng.exponential(cfg.session_gap_mean, len(session_first))).astype(np.int64)
    user_first = user_offsets[:-1]
    gap[user_first] = _EPOCH + rng.integers(0, _START_SPREAD, size=len(user_first))
    total = np.cumsum(gap)
    before_user = total[user_first] - gap[user_first]
    return total - np.repeat(before_user, np.diff(user_offsets))


def _label_score(cfg, item_taste, interests, session_user, session_slot, event_user, event_slot,
                 item, noise, sample_user, target_item, target_interest, session_offsets) -> np.ndarray:
    """The label logit of the module docstring, for every sample."""
    num_users, max_held = interests.shape
    rows = num_users * max_held
    taste = item_taste[item[~noise]]
    if cfg.label_taste_from == "all":
        # Mean taste of the non-noise events of every (user, held interest).
        key = (event_user * max_held + event_slot)[~noise]
    else:
        # Mean taste of the non-noise events of the latest session on every (user, held interest).
        session_key = session_user * max_held + session_slot
        latest = np.full(rows, -1, dtype=np.int64)
        np.maximum.at(latest, session_key, np.arange(len(session_key)))
        event_session = np.repeat(np.arange(len(session_key)), np.diff(session_offsets))[~noise]
        in_latest = latest[session_key[event_session]] == event_session
        key, taste = session_key[event_session][in_latest], taste[in_latest]
    count = np.bincount(key, minlength=rows)
    mean_taste = np.stack([np.bincount(key, weights=taste[:, d], minlength=rows)
                           for d in range(taste.shape[1])], axis=1) / np.maximum(count, 1)[:, None]
    sessions_on = np.bincount(session_user * max_held + session_slot, minlength=rows)
    num_sessions = np.bincount(session_user, minlength=num_users)
    last_slot = session_slot[np.cumsum(num_sessions) - 1]

    match = interests[sample_user] == target_interest[:, None]          # [N, M]
    holds = match.any(axis=1)
    slot = match.argmax(axis=1)
    row = sample_user * max_held + slot
    sim = np.where(holds, np.sum(item_taste[target_item] * mean_taste[row], axis=1), 0.0)
    share = np.where(holds, sessions_on[row] / num_sessions[sample_user], 0.0)
    recent = holds & (slot == last_slot[sample_user])
    return cfg.label_taste * sim + cfg.label_share * share + cfg.label_recent * recent - cfg.label_bias


def _draw(weights: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For every entry of `rows`, a column of weights[row] drawn with probability proportional to it."""
    cdf = np.cumsum(weights, axis=1)
    cdf /= np.where(cdf[:, -1:] > 0, cdf[:, -1:], 1.0)
    # Row r's CDF shifted into [r, r + 1] turns all rows into one sorted array: one searchsorted.
    flat = (cdf + np.arange(len(weights))[:, None]).ravel()
    column = np.searchsorted(flat, rows + rng.random(len(rows)), side="right") - rows * weights.shape[1]
    # Rounding at the top of a row must not step onto trailing zero weights.
    last_positive = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
    return np.minimum(column, last_positive[rows])


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
