"""The profile's tables (markdown) and its verdict, as pure functions of the rows it computed."""
from __future__ import annotations

from typing import Optional, Sequence

from mos.lab.report import FLOP_UNIT, WALL_TIME_NOTE, format_mean_std

from .paired import MIN_SEEDS, Comparison

MOE_NAMES = ("gshard", "dselect_k", "expert_choice")     # the sample-level MoE baselines
# Every neural model should come within this AUC of the share-of-category regression or above it.
REGRESSION_MARGIN = 0.01

TARGET_RULES = f"""How to read the tables. Options were chosen on the validation split (the tuning table);
the test split is only reported. Runs of one seed are paired: the same data, the same test
examples, and for a boosted stacked model the same backbone part as the backbone run (bit for
bit). A comparison's difference is test AUC of the first model minus the second's, per seed with
its DeLong standard error (user-clustered: a user's examples share a history); "mean [95 %]" is
the mean over seeds with an interval that adds the seed-to-seed spread (sd / sqrt(seeds)) and the
test set's noise (DeLong's variance of the mean difference: every seed is scored on the same
examples, so it does not shrink with more seeds). The rule, fixed before the runs: with at least
{MIN_SEEDS} seeds, "better" when the interval lies above zero, "worse" when below, otherwise "no
difference detected". "expected" is the same difference in expected AUC, the mean over 1,000
redraws of every test label from its true probability (synthetic data): it removes the labels'
noise, not the choice of examples. Never worse = not "worse"."""


def _pm(row: dict, metric: str, digits: int = 4) -> str:
    return format_mean_std(row.get(f"{metric}_mean"), row.get(f"{metric}_std"), row["seeds"], digits)


def _purity(row: dict) -> str:
    """Router purity over the seeds, with the cap its number of themes allows where known."""
    cap = row.get("purity_cap")
    return _pm(row, "purity", 3) + ("" if cap is None else f" (cap {cap:.3f})")


def _options(options: dict) -> str:
    return ", ".join(f"{key.split('.', 1)[1]}={value}" for key, value in sorted(options.items())) or "-"


def model_table(rows: Sequence[dict]) -> str:
    """One row per model: options, size, FLOPs, validation and test metrics over the seeds."""
    lines = [f"| model | options | params | {FLOP_UNIT}/ex (fwd) | {FLOP_UNIT}/ex (train) | valid AUC | test AUC "
             "| expected test AUC | test GAUC | test LogLoss | router purity | best / ran epochs "
             "| correction served | wall s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        served = "-" if r["serves_correction"] is None else f"{r['serves_correction']} of {r['seeds']}"
        lines.append(f"| {r['model']} | {_options(r['options'])} | {r['params']:,} | {r['mflops']:.3f} "
                     f"| {r['train_mflops']:.3f} | {_pm(r, 'valid_auc')} | {_pm(r, 'auc')} "
                     f"| {_pm(r, 'expected_auc')} | {_pm(r, 'gauc')} | {_pm(r, 'logloss')} | {_purity(r)} "
                     f"| {r['best_epoch']:.1f} / {r['epochs']:.1f} | {served} | {r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines + ["", WALL_TIME_NOTE])


def reference_table(rows: Sequence[dict]) -> str:
    lines = ["| reference | fitted parameters | valid AUC | test AUC | expected test AUC | test LogLoss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['parameters']} | {_number(r['valid_auc'])} | {_number(r['auc'])} "
                     f"| {_number(r['expected_auc'])} | {_number(r['logloss'])} |")
    return "\n".join(lines)


def paired_table(comparisons: Sequence[Comparison]) -> str:
    lines = ["| comparison | seeds | per seed: difference (SE) | mean [95 %] | seeds won | expected | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        per_seed = ", ".join(f"{d:+.4f} ({se:.4f})" for d, se in zip(c.differences, c.ses))
        expected = "-" if c.expected is None else f"{c.expected:+.4f}" + (
            f" ± {c.expected_se:.4f}" if len(c.seeds) > 1 else "")
        lines.append(f"| {c.model} vs {c.baseline} | {len(c.seeds)} | {per_seed} | {c.mean:+.4f} "
                     f"[{c.low:+.4f}, {c.high:+.4f}] | {c.won} of {len(c.seeds)} | {expected} | {c.verdict} |")
    return "\n".join(lines)


def tuning_table(rows: Sequence[dict]) -> str:
    """One row per (model, option set) tried: mean validation AUC over the tuning seeds."""
    if not rows:
        return "No validation grid: each model ran with its options above (profile.per_model)."
    lines = ["| model | options tried | tuning seeds | valid AUC | chosen |", "|---|---|---|---|---|"]
    for r in rows:
        auc = format_mean_std(r["valid_auc_mean"], r["valid_auc_std"], r["seeds"])
        lines.append(f"| {r['model']} | {_options(r['options'])} | {r['seeds']} | {auc} "
                     f"| {'**yes**' if r['chosen'] else ''} |")
    return "\n".join(lines)


def verdict(rows: Sequence[dict], references: Sequence[dict], comparisons: Sequence[Comparison],
            headline: Sequence[str] = ("mos",)) -> str:
    """The targets, each with its numbers: each headline MoS model (`profile.headline`; "mos" is
    written MoS) against its backbone and each other model, and its forward FLOPs against each
    MoE baseline's; the LogLoss of a constant prediction, the share-of-category regression."""
    lines = []
    by_pair = {(c.model, c.baseline): c for c in comparisons}
    flops = {r["model"]: r["mflops"] for r in rows if r.get("mflops") is not None}
    for name in headline:
        title = "MoS" if name == "mos" else name
        vs_backbone = by_pair.get((name, "backbone"))
        if vs_backbone is not None:
            rule = vs_backbone.verdict
            holds = ("NOT EVALUATED" if rule.startswith("not evaluated") else "DOES NOT HOLD" if rule == "worse"
                     else "HOLDS")
            lines.append(f"- {title} never worse than its backbone: {holds} ({_interval(vs_backbone)}: {rule})")
        for (model, baseline), c in by_pair.items():
            if model == name and baseline != "backbone" and not baseline.endswith("LR"):
                lines.append(f"- {title} against {baseline}: {c.verdict} ({_interval(c)})")
        moe = [m for m in MOE_NAMES if m in flops]
        if name in flops and moe:
            not_lighter = [f"{m} {flops[m]:.3g}" for m in moe if flops[m] <= flops[name]]
            holds = "HOLDS" if not not_lighter else "DOES NOT HOLD against " + ", ".join(not_lighter)
            lines.append(f"- {title} at fewer forward FLOPs than each MoE baseline ({flops[name]:.3g} {FLOP_UNIT}"
                         f" per example): {holds}")
        if name not in flops and rows and "mflops" in rows[0]:
            lines.append(f"- {title}: not run")
    by_reference = {r["name"]: r for r in references}
    constant = by_reference.get("constant")
    if constant is not None:
        above = [f"{r['model']} ({r['logloss_mean']:.4f})" for r in rows if r["logloss_mean"] >= constant["logloss"]]
        lines.append(f"- Test LogLoss below the constant prediction's ({constant['logloss']:.4f}): "
                     + ("every model" if not above else "NOT " + ", ".join(above)))
    regression = by_reference.get("share LR")
    if regression is not None:
        short = [f"{r['model']} ({r['auc_mean'] - regression['auc']:+.4f})" for r in rows
                 if r["auc_mean"] < regression["auc"] - REGRESSION_MARGIN]
        lines.append(f"- Within {REGRESSION_MARGIN} test AUC of the share-of-category regression "
                     f"({regression['auc']:.4f}) or above: " + ("every model" if not short else "NOT " + ", ".join(short)))
    return "\n".join(lines) if lines else "No verdict: neither MoS and its backbone nor a reference was run."


def _interval(c: Comparison) -> str:
    return f"{c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}] over {len(c.seeds)} seeds"


def _number(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
