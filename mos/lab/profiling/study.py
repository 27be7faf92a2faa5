"""`python -m mos profile`: FLOPs versus accuracy of MoS, its baselines and ablations, compared
in pairs with the statistics of `mos.lab.profiling.paired`.

1. Tuning (when `profile.grid` names a model): every option set of the grid on
   `profile.tuning_seeds`; each model keeps the set with the best mean validation AUC.
2. Final runs: every model in `models` with its options on every seed of `train.seeds`.
3. The report: each model's metrics and FLOPs, reference predictions (the Bayes-optimal one on
   synthetic data, two small regressions, a constant), the paired comparisons with their
   verdicts, the tuning table, the figures and where the numbers came from (commit, command).

Written to `train.out_dir`: config.yaml (the merged configuration, echoed at the start),
profile.md, profile.csv, paired.csv, profile.json, the figures and `runs/` (per run a record, an
.npz of every validation and test prediction and a CSV of its epochs).
"""
from __future__ import annotations

import csv
import datetime
import json
import statistics
import sys
import zipfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mos.lab import plots, run_log
from mos.lab.config import RunConfig
from mos.lab.data import synthetic
from mos.lab.data.dataset import split_indices
from mos.lab.errors import InputError
from mos.lab.files import write_atomic
from mos.lab.metrics import auc, logloss
from mos.lab.report import FLOP_SCALE
from mos.lab.train import load_data
from mos.lab.variants import boosted_twin, random_routing_control

from . import tables
from .measures import session_heatmaps
from .paired import Comparison, compare, expected_auc
from .references import references
from .runs import Context, Job, RunStore, make_job, run_jobs

# What a record written before runs named their machine or code says instead.
UNRECORDED = "not recorded"

MOE_BASELINES = ("gshard", "dselect_k", "expert_choice")
# MoS is compared with each of these besides its backbone.
MOS_RIVALS = ("stacked_backbone", *MOE_BASELINES)


def quick_overrides() -> List[str]:
    """`--quick`: a tiny run of every part, for tests and a first look (seconds, not minutes)."""
    return ["data.synthetic.num_users=160", "data.synthetic.num_items=120", "train.seeds=[0]", "train.max_epochs=1",
            "train.batch_size=64", "profile.flop_batch_size=32", "profile.lengths=[40,80]",
            "profile.length_examples=2", "profile.heatmap_users=2", "profile.tuning_seeds=[0]"]


def profile(run_cfg: RunConfig, *, report_only: bool = False, jobs: int = 1, tune: bool = True,
            command: Optional[str] = None) -> List[dict]:
    """Tune, train (or read back) every run and write the report; returns the model rows.
    `report_only`: train nothing, report the finished runs and name the missing ones. `jobs`:
    runs trained at once, each in its own process with one thread. `tune` False skips
    `profile.grid`: every model runs with its `profile.per_model` options. `command`: the
    command line the results folder names (default: this process's)."""
    command = command or " ".join(getattr(sys, "orig_argv", sys.argv))
    if jobs < 1:
        raise InputError(f"--jobs: expected a positive number of parallel runs, got {jobs}")
    out_dir = Path(run_cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_cfg.train.threads > 0:
        torch.set_num_threads(run_cfg.train.threads)
    data = load_data(run_cfg)          # prints the data's session statistics
    if not report_only:     # a report of finished runs keeps the configuration they were run with
        run_log.echo_config(run_cfg, out_dir)
    store = RunStore(out_dir)
    context = Context.of(run_cfg, data.splits)
    if not tune and run_cfg.profile.grid:
        print("no tuning (--no-tuning): every model runs with its profile.per_model options", file=sys.stderr)
        run_cfg = replace(run_cfg, profile=replace(run_cfg.profile, grid={}))
    run = dict(run_cfg=run_cfg, store=store, context=context, workers=jobs, report_only=report_only)

    chosen, tuning_rows, missing = _tune(run_cfg, run)
    final = [make_job(name, seed, chosen[name]) for seed in run_cfg.train.seeds for name in run_cfg.models]
    records, missing_final = run_jobs(final, **run)
    missing += missing_final
    if not records:
        raise InputError(f"train.out_dir: expected finished runs in {store.folder} to report, got none")

    ordered = [records[job] for job in final if job in records]
    valid, test = (_split_predictions(ordered, store, split) for split in ("valid", "test"))
    truth = _truth(run_cfg) if run_cfg.data.source == "synthetic" else None
    true_p = None if truth is None else truth["test_probabilities"]
    refs = references(data.splits, run_cfg.model.mos.gap_seconds, run_cfg.data.max_history,
                      None if truth is None else truth["logits"])
    rows = summarize(ordered, test, true_p)
    reference_rows = _reference_rows(refs, data.splits, true_p)
    headline = run_cfg.profile.headline
    comparisons = _comparisons(ordered, test, {name: ref.test for name, ref in refs.items()}, true_p, headline)
    valid_comparisons = _comparisons(ordered, valid, {name: ref.valid for name, ref in refs.items()}, None, headline)

    origin = provenance(run_cfg, jobs, command, ordered)
    parts = [f"## {run_cfg.profile.setting}", _provenance_text(origin), "### Models", tables.model_table(rows),
             "### References", tables.reference_table(reference_rows), "### Paired comparisons (test AUC)",
             tables.paired_table(comparisons), "### Verdict", tables.verdict(rows, reference_rows, comparisons, headline),
             "### Paired comparisons on the validation split (where options and candidates were chosen)",
             tables.paired_table(valid_comparisons),
             "### Options chosen on validation", tables.tuning_table(tuning_rows), tables.TARGET_RULES]
    if missing:
        parts.insert(2, "Not run (reported without them): " + ", ".join(job.describe() for job in missing) + ".")
    report = "\n\n".join(parts)
    print(report)
    write_atomic(out_dir / "profile.md", report + "\n")
    _write_csv(out_dir / "profile.csv", [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows])
    _write_csv(out_dir / "paired.csv", [{"split": split, **_comparison_row(c)}
                                         for split, group in (("test", comparisons), ("valid", valid_comparisons))
                                         for c in group])
    write_atomic(out_dir / "profile.json", json.dumps(
        {"provenance": origin, "rows": rows, "references": reference_rows,
         "comparisons": [_comparison_row(c) for c in comparisons],
         "valid_comparisons": [_comparison_row(c) for c in valid_comparisons], "tuning": tuning_rows,
         "records": ordered},
        indent=1))
    _figures(run_cfg, data, rows, ordered, out_dir)
    print(f"profile written to {out_dir}", flush=True)
    return rows


def _tune(run_cfg: RunConfig, run: dict):
    """({model: its options}, the tuning table's rows, the grid runs missing under report-only)."""
    per_model, grid = run_cfg.profile.per_model, run_cfg.profile.grid
    chosen = {name: dict(per_model.get(name, {})) for name in run_cfg.models}
    tuned = [name for name in run_cfg.models if name in grid]
    if not tuned:
        return chosen, [], []
    jobs: Dict[tuple, List[Job]] = {}
    for name in tuned:
        for index, option_set in enumerate(grid[name]):
            options = {**chosen[name], **option_set}
            jobs[name, index] = [make_job(name, seed, options, "tuning") for seed in run_cfg.profile.tuning_seeds]
    records, missing = run_jobs([job for group in jobs.values() for job in group], **run)
    rows = []
    for name in tuned:
        scored = []
        for index, option_set in enumerate(grid[name]):
            aucs = [records[job]["valid"]["auc"] for job in jobs[name, index] if job in records]
            aucs = [value for value in aucs if value is not None]
            mean = statistics.fmean(aucs) if aucs else None
            sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
            scored.append((mean, index))
            rows.append({"model": name, "options": {**chosen[name], **option_set}, "seeds": len(aucs),
                         "valid_auc_mean": mean, "valid_auc_std": sd, "chosen": False})
        complete = [(mean, index) for mean, index in scored if mean is not None]
        if complete:
            # The best mean validation AUC; the earlier option set on a tie.
            best = max(complete, key=lambda item: (item[0], -item[1]))[1]
            rows[len(rows) - len(scored) + best]["chosen"] = True
            chosen[name] = {**chosen[name], **grid[name][best]}
    return chosen, rows, missing


def _split_predictions(records: List[dict], store: RunStore, split: str) -> dict:
    """{"labels", "users", run id: logits} of one split ("valid" or "test") from the runs' saved
    predictions; every run must have scored the same examples."""
    out = {}
    for record in records:
        path = store.folder / f"{record['run_id']}.npz"
        try:
            with np.load(path) as saved:
                labels, users = saved[f"{split}_labels"], saved[f"{split}_users"]
                logits = saved[f"{split}_logits"].astype(np.float64)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            # Written whole (mos.lab.files), so only a copy or a disk gone wrong damages one.
            raise InputError(f"{path}: expected the run's saved predictions, got an unreadable file ({err!r}); "
                             f"delete it and its .json to train the run again") from None
        if not np.isfinite(logits).all():
            raise InputError(f"{path}: expected finite {split} logits, got NaN or inf (a damaged file: delete it "
                             f"and its .json to train the run again)")
        if "labels" not in out:
            out["labels"], out["users"] = labels, users
        elif not (np.array_equal(out["labels"], labels) and np.array_equal(out["users"], users)):
            raise InputError(f"{record['run_id']}.npz: expected the {split} examples of the other runs, got "
                             f"others (clear {store.folder} after changing the data)")
        out[record["run_id"]] = logits
    return out


def _truth(run_cfg: RunConfig) -> dict:
    """The generator's true logits of the validation and test examples, and the test ones as
    probabilities (the split order is the order their predictions were saved in)."""
    cfg = run_cfg.data
    dataset, truth = synthetic.generate(cfg.synthetic, cfg.seed, return_truth=True)
    _, valid, test = split_indices(dataset, cfg.valid_fraction, cfg.test_fraction, cfg.seed)
    score = truth.score.numpy()
    logits = {"valid": score[valid.numpy()], "test": score[test.numpy()]}
    return {"logits": logits, "test_probabilities": 1.0 / (1.0 + np.exp(-logits["test"]))}


def summarize(records: List[dict], test: dict, probabilities=None) -> List[dict]:
    """One row per model: its options, and means (and spreads) over seeds."""
    by_model: Dict[str, List[dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    rows = []
    for model, runs in by_model.items():
        row = {"model": model, "options": runs[0].get("options", {}), "seeds": len(runs), "params": runs[0]["params"]}
        row["mflops"] = statistics.fmean(r["flops"]["forward_per_example"] for r in runs) / FLOP_SCALE
        row["train_mflops"] = statistics.fmean(r["flops"]["training_per_example"] for r in runs) / FLOP_SCALE
        row["valid_auc_mean"], row["valid_auc_std"] = _mean_std([r["valid"]["auc"] for r in runs])
        for metric in ("auc", "gauc", "logloss", "purity", "nmi"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r["test"][metric] for r in runs])
        expected = ([float(v) for v in expected_auc(probabilities, np.stack([test[r["run_id"]] for r in runs]))]
                    if probabilities is not None else [None])
        row["expected_auc_mean"], row["expected_auc_std"] = _mean_std(expected)
        row["best_epoch"] = statistics.fmean(r["best_epoch"] for r in runs)
        row["epochs"] = statistics.fmean(r["epochs"] for r in runs)
        row["best_at_cap"] = sum(r["best_epoch"] == r["config"]["train"]["max_epochs"] for r in runs)
        served = [r["test"].get("serves_correction") for r in runs]
        row["serves_correction"] = None if None in served else sum(served)
        row["seconds_per_epoch"] = statistics.fmean(r["seconds_per_epoch"] for r in runs)
        row["theme_tokens"] = runs[0]["test"].get("theme_tokens")
        caps = [r["test"].get("purity_cap") for r in runs]
        row["purity_cap"] = None if None in caps else statistics.fmean(caps)
        row["mflops_by_module"] = {name: flops / FLOP_SCALE for name, flops in
                                   runs[0]["flops"]["forward_by_module"].items()}
        rows.append(row)
    return rows


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _reference_rows(refs, splits, probabilities) -> List[dict]:
    valid_labels, test_labels = splits[1].label.numpy(), splits[2].label.numpy()
    rows = []
    for ref in refs.values():
        ranked = ref.name != "constant"     # a constant ranks nothing: AUC 0.5 by ties
        rows.append({"name": ref.name, "parameters": ref.parameters,
                     "valid_auc": auc(valid_labels, ref.valid) if ranked else None,
                     "auc": auc(test_labels, ref.test) if ranked else None,
                     "expected_auc": (float(expected_auc(probabilities, ref.test)[0])
                                      if ranked and probabilities is not None else None),
                     "logloss": logloss(test_labels, ref.test)})
    return rows


def _comparisons(records: List[dict], split: dict, refs: Dict[str, np.ndarray], probabilities,
                 headline=("mos",)) -> List[Comparison]:
    """On one split's predictions (`_split_predictions`; `refs`: each reference's logits on it):
    every model against the backbone; MoS and each headline MoS model (`profile.headline`) against
    each rival and its random-routing control (`random_routing_control`); every other MoS variant
    against MoS; every jointly trained variant against its boosted twin (`boosted_twin`); every
    model against the share-of-category regression."""
    scores: Dict[str, Dict[int, np.ndarray]] = {}
    for record in records:
        scores.setdefault(record["model"], {})[record["seed"]] = split[record["run_id"]]
    seeds = sorted({record["seed"] for record in records})
    if "share LR" in refs:
        scores["share LR"] = {seed: refs["share LR"] for seed in seeds}
    pairs = []
    if "backbone" in scores:
        pairs += [(name, "backbone") for name in scores if name not in ("backbone", "share LR")]
    for name in dict.fromkeys(("mos", *headline)):
        if name in scores:
            rivals = (*MOS_RIVALS, random_routing_control(name))
            pairs += [(name, rival) for rival in rivals if rival in scores and rival != name]
    if "mos" in scores:
        pairs += [(name, "mos") for name in scores if name.startswith("mos_") and ("mos", name) not in pairs]
    twins = {name: boosted_twin(name) for name in scores}
    pairs += [(name, twin) for name, twin in twins.items() if twin in scores and (name, twin) not in pairs]
    if "share LR" in scores:
        pairs += [(name, "share LR") for name in scores if name != "share LR"]
    labels, users = split["labels"], split["users"]
    return [compare(model, baseline, labels, users, scores[model], scores[baseline], probabilities)
            for model, baseline in pairs]


def _comparison_row(c: Comparison) -> dict:
    return {"model": c.model, "baseline": c.baseline, "seeds": list(c.seeds), "differences": list(c.differences),
            "ses": list(c.ses), "mean": c.mean, "seed_sd": c.seed_sd, "test_se": c.test_se, "se": c.se, "low": c.low,
            "high": c.high, "won": c.won, "expected": c.expected, "expected_se": c.expected_se, "verdict": c.verdict}


def provenance(run_cfg: RunConfig, jobs: int, command: str, records: Sequence[dict] = ()) -> dict:
    """Where the numbers came from: the code's commit (and whether the tree had changes), the
    command, the date, the machine, and the machines and commits the reported (final) runs
    trained on and at (`records`; runs read back may come from another machine, which rounds
    differently, or from older code with the same options)."""
    commit, dirty = run_log.checkout()
    return {"commit": commit, "uncommitted_changes": dirty,
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": run_log.machine(run_cfg.train.device),
            "torch": torch.__version__, "jobs": jobs, "device": run_cfg.train.device,
            "run_machines": dict(Counter(record.get("machine", UNRECORDED) for record in records)),
            "run_code": dict(Counter(record.get("code", UNRECORDED) for record in records))}


def _provenance_text(p: dict) -> str:
    commit = run_log.describe_checkout(p["commit"], p["uncommitted_changes"])
    text = (f"Commit {commit}; command `{p['command']}`; {p['date']}; {p['machine']}; "
            f"{p['jobs']} run(s) at a time on {p['device']}.")
    for key, verb in (("run_machines", "trained on"), ("run_code", "trained at")):
        if p.get(key):
            counts = "; ".join(f"{name}: {count} run(s)" for name, count in p[key].items())
            text += f" Final runs {verb}: {counts}."
    return text


def _write_csv(path: Path, rows: List[dict]) -> None:
    if not rows:
        return

    def write(stream):
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(path, write)


def _figures(run_cfg: RunConfig, data, rows: List[dict], records: List[dict], out_dir: Path) -> None:
    plots.auc_versus_flops(rows, out_dir / "auc_vs_flops.png")
    by_length = {row["model"]: (np.mean([r["flops_by_length"] for r in records if r["model"] == row["model"]],
                                        axis=0) * 1e9 / FLOP_SCALE).tolist() for row in rows}
    plots.flops_versus_length(run_cfg.profile.lengths, by_length, out_dir / "flops_vs_length.png")
    # The routing picture: each routing model's first seed, where the data knows true interests.
    tables = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        table = record["test"].get("routing_table")
        if table and record["model"] not in tables:
            tables[record["model"]] = table
    if tables:
        plots.routing(tables, out_dir / "routing.png")
    if not data.has_timestamps:
        print("no session_similarity.png: sessions are cut at time gaps, and the log has no timestamps")
        return
    matrices, labels, users = session_heatmaps(data.dataset, run_cfg.profile.heatmap_users,
                                               run_cfg.model.mos.gap_seconds)
    if matrices:
        plots.session_similarity(matrices, labels, users, out_dir / "session_similarity.png")
    else:
        print("no session_similarity.png: no user has 6 or more sessions")
