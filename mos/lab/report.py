"""The side-by-side results table: one markdown row per model, mean ± std over seeds, and the
formatting every results table shares (a metric that may be undefined, the FLOP unit, the
wall-time caveat).

Pure functions of the run records `mos.lab.train.train_one` returns (and `results.jsonl` holds).
"""
from __future__ import annotations

import statistics
from typing import Optional

# Epoch times are wall-clock on whatever machine ran them, often shared (CI, a laptop, a 2-core box).
WALL_TIME_NOTE = ("wall s/epoch: wall-clock seconds per training epoch on this machine, which other jobs may "
                  "share: a rough guide, not a benchmark")
# One unit for every FLOP count the profile shows (its table, CSV columns and figures), so numbers
# can be compared across them: these models cost 0.1 to a few hundred MFLOPs per example.
FLOP_UNIT = "MFLOPs"
FLOP_SCALE = 1e6


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds; the std of a single seed is 0."""
    values = [float(v) for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def format_mean_std(mean: Optional[float], std: Optional[float], count: int, digits: int = 4) -> str:
    """"mean ± std" over `count` seeds; one seed has no spread, so only its value; "-" for no value."""
    if mean is None:
        return "-"
    if count < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric_text(split: dict, name: str) -> str:
    """One run's metric `name` of an evaluated split (`mos.lab.train.evaluate`), or why it is undefined."""
    value = split[name]
    if value is not None:
        return f"{value:.4f}"
    if name == "gauc":
        return f"undefined ({split['gauc_users_skipped']} users skipped: each has one class)"
    return "undefined (one class)"


def summary_table(records: list[dict]) -> str:
    """Markdown table of test AUC, GAUC, LogLoss (mean ± std), router purity, epochs, the served
    candidate (boosted models: in how many seeds the correction was served, "-" for a model that
    has none), wall s/epoch, params; models in the order they first appear in `records`; the
    wall-time caveat below it."""
    by_model: dict[str, list[dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    header = ("model", "seeds", "test AUC", "test GAUC", "test LogLoss", "router purity",
              "epochs", "correction served", "wall s/epoch", "params")
    rows = [header, ("---",) * len(header)]
    for model, runs in by_model.items():
        purity = [r["test"]["purity"] for r in runs if r["test"].get("purity") is not None]
        rows.append((
            model,
            str(len(runs)),
            _cell(runs, "auc"),
            _cell(runs, "gauc"),
            _cell(runs, "logloss"),
            _pm(purity) if purity else "-",
            f"{statistics.fmean(r['epochs'] for r in runs):.1f}",
            _served(runs),
            f"{statistics.fmean(r['seconds_per_epoch'] for r in runs):.2f}",
            f"{runs[0]['params']:,}",
        ))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n\n" + WALL_TIME_NOTE


def _served(runs: list[dict]) -> str:
    """In how many seeds a boosted model served its corrected candidate: a row that repeats the
    backbone's digit for digit then says why."""
    choices = [r.get("selection") for r in runs]
    if any(choice is None for choice in choices):
        return "-"
    return f"{sum(bool(choice['serve_correction']) for choice in choices)} of {len(runs)}"


def _cell(runs: list[dict], name: str) -> str:
    """The test metric over seeds; seeds where it is undefined are counted, not averaged in."""
    values = [r["test"][name] for r in runs]
    defined = [v for v in values if v is not None]
    if not defined:
        return metric_text(runs[0]["test"], name)
    text = _pm(defined)
    missing = len(values) - len(defined)
    return text + (f" ({missing} of {len(values)} seeds undefined)" if missing else "")


def _pm(values: list[float]) -> str:
    return format_mean_std(*mean_std(values), len(values))
