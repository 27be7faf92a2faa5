"""The side-by-side results table: one markdown row per model, mean ± std over seeds.

Pure functions of the run records `mos.train.train_one` returns (and `results.jsonl` holds).
"""
from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds; the std of a single seed is 0."""
    values = [float(v) for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def summary_table(records: list[dict]) -> str:
    """Markdown table of test AUC, GAUC, LogLoss (mean ± std), router purity, epochs, s/epoch,
    params; models in the order they first appear in `records`."""
    by_model: dict[str, list[dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    header = ("model", "seeds", "test AUC", "test GAUC", "test LogLoss", "router purity",
              "epochs", "s/epoch", "params")
    rows = [header, ("---",) * len(header)]
    for model, runs in by_model.items():
        purity = [r["test"]["purity"] for r in runs if r["test"].get("purity") is not None]
        rows.append((
            model,
            str(len(runs)),
            _pm([r["test"]["auc"] for r in runs]),
            _pm([r["test"]["gauc"] for r in runs]),
            _pm([r["test"]["logloss"] for r in runs]),
            _pm(purity) if purity else "-",
            f"{statistics.fmean(r['epochs'] for r in runs):.1f}",
            f"{statistics.fmean(r['seconds_per_epoch'] for r in runs):.2f}",
            f"{runs[0]['params']:,}",
        ))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _pm(values: list[float]) -> str:
    mean, spread = mean_std(values)
    return f"{mean:.4f} ± {spread:.4f}"
