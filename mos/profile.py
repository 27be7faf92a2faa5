"""`python -m mos profile`: FLOPs versus accuracy of MoS, its ablations and the MoE baselines.

For every model variant (`models` in the config, names from `mos.variants`) and every seed it
trains a run (resumable: a finished (variant, seed) with the same configuration is read back,
not recomputed), counts the trained model's forward and training FLOPs per example on test
batches, and writes to `train.out_dir`: profile.md (the table), profile.csv, profile.json,
auc_vs_flops.png, flops_vs_length.png and session_similarity.png.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from mos import metrics, plots
from mos.config import RunConfig
from mos.config_io import config_to_dict
from mos.data.batch import Batch
from mos.errors import InputError
from mos.flops import count_flops
from mos.report import WALL_TIME_NOTE, flops_unit, format_mean_std
from mos.train import load_data, train_one
from mos.variants import variant_config

BASELINES = ("backbone", "gshard", "dselect_k", "expert_choice")
MOE_BASELINES = ("gshard", "dselect_k", "expert_choice")


def quick_overrides() -> List[str]:
    """`--quick`: a tiny run of every part, for tests and a first look (seconds, not minutes)."""
    return ["data.synthetic.num_users=160", "data.synthetic.num_items=120", "train.seeds=[0]", "train.max_epochs=1",
            "train.batch_size=64", "profile.flop_batch_size=32", "profile.lengths=[40,80]",
            "profile.length_examples=2", "profile.heatmap_users=2"]


def profile(run_cfg: RunConfig, *, report_only: bool = False) -> List[dict]:
    """Train (or read back) every (variant, seed) and write the report. `report_only`: train
    nothing; report the finished runs whose configuration matches and name the missing ones."""
    out_dir = Path(run_cfg.train.out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    data = load_data(run_cfg)          # prints the data's session statistics
    splits = data.splits
    flop_batch = next(splits[2].batches(run_cfg.profile.flop_batch_size, max_history=run_cfg.data.max_history))

    def inspect(model):
        return {"flops": asdict(count_flops(model, flop_batch.to(next(model.parameters()).device))),
                "flops_by_length": flops_by_length(model, run_cfg.profile, splits[0])}

    jobs = [(name, seed) for seed in run_cfg.train.seeds for name in run_cfg.models]
    records, missing = [], []
    for done, (name, seed) in enumerate(jobs, start=1):
        path = out_dir / "runs" / f"{name}_seed{seed}.json"
        fingerprint = _fingerprint(run_cfg, name, seed)
        cached = _read_cached(path, fingerprint)
        status = "cached" if cached else "missing" if report_only else "training"
        print(f"[{done}/{len(jobs)}] {name} seed {seed}: {status}", file=sys.stderr, flush=True)
        if not cached and report_only:
            missing.append(f"{name} seed {seed}")
            continue
        record = cached or train_one(run_cfg, name, seed, splits, progress=run_cfg.train.progress, inspect=inspect)
        if not cached:
            _write_atomic(path, json.dumps({"fingerprint": fingerprint, "record": record}))
        records.append(record)
    if not records:
        raise InputError(f"train.out_dir: expected finished runs in {out_dir / 'runs'} to report, got none")

    rows = summarize(records)
    parts = [f"## {run_cfg.profile.setting}", markdown_table(rows), target_verdict(rows), TARGET_RULES]
    if missing:
        parts.insert(2, f"Not run (reported without them): {', '.join(missing)}.")
    report = "\n\n".join(parts)
    print(report)
    (out_dir / "profile.md").write_text(report + "\n")
    _write_csv(out_dir / "profile.csv", rows)
    (out_dir / "profile.json").write_text(json.dumps({"rows": rows, "records": records}, indent=1))
    plots.auc_versus_flops(rows, out_dir / "auc_vs_flops.png")
    by_length = {row["model"]: np.mean([r["flops_by_length"] for r in records if r["model"] == row["model"]],
                                       axis=0).tolist() for row in rows}
    plots.flops_versus_length(run_cfg.profile.lengths, by_length, out_dir / "flops_vs_length.png")
    if data.has_timestamps:
        matrices, labels, users = session_heatmaps(data.dataset, run_cfg.profile.heatmap_users,
                                                   run_cfg.model.mos.gap_seconds)
        if matrices:
            plots.session_similarity(matrices, labels, users, out_dir / "session_similarity.png")
        else:
            print("no session_similarity.png: no user has 6 or more sessions")
    else:
        print("no session_similarity.png: sessions are cut at time gaps, and the log has no timestamps")
    print(f"profile written to {out_dir}", flush=True)
    return rows


def _fingerprint(run_cfg: RunConfig, name: str, seed: int) -> str:
    """What decides a run's record: the data (a log file's size and time too), the variant's model,
    training, the seed and the FLOP batches (not where or how loudly). The code is not in it: clear
    `<out_dir>/runs/` after changing the code."""
    train = replace(run_cfg.train, seeds=(seed,), out_dir="", progress="none", quiet=True, threads=0,
                    checkpoint_every=0, resume=False)
    source = run_cfg.data.source
    log_file = None if source in ("synthetic", "movielens") else [os.path.getsize(source), os.path.getmtime(source)]
    key = {"data": config_to_dict(run_cfg.data), "log_file": log_file,
           "model": _model_key(variant_config(run_cfg.model, name)), "train": config_to_dict(train),
           "flop_batch_size": run_cfg.profile.flop_batch_size, "lengths": list(run_cfg.profile.lengths),
           "length_examples": run_cfg.profile.length_examples, "variant": name, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# The encoder options every model kind reads (the session options cut the sessions the recency
# embedding counts); the other MoSConfig fields shape MoS alone.
_SHARED_ENCODER_FIELDS = ("dim", "num_heads", "encoder", "num_layers", "readout", "dropout", "backend",
                          "session_mode", "session_len", "gap_seconds", "max_session_len",
                          "validate_inputs")


def _model_key(model_cfg) -> dict:
    """The model options a run of this kind reads: a MoS option does not invalidate a finished
    backbone run, nor a MoE option a MoS run."""
    key = config_to_dict(model_cfg)
    if model_cfg.kind != "mos":
        key["mos"] = {name: key["mos"][name] for name in _SHARED_ENCODER_FIELDS}
    if not model_cfg.stacked:
        del key["training"]
    if model_cfg.kind not in MOE_BASELINES:
        del key["moe"]
    return key


def _read_cached(path: Path, fingerprint: str):
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:       # a run cut short while writing: recompute it
        return None
    return stored["record"] if stored.get("fingerprint") == fingerprint else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: List[dict]) -> List[dict]:
    """One row per model: means (and spreads) over seeds."""
    by_model: Dict[str, List[dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(record)
    rows = []
    for model, runs in by_model.items():
        row = {"model": model, "seeds": len(runs), "params": runs[0]["params"]}
        row["gflops"] = statistics.fmean(r["flops"]["forward_per_example"] for r in runs) / 1e9
        row["train_gflops"] = statistics.fmean(r["flops"]["training_per_example"] for r in runs) / 1e9
        row["valid_auc_mean"], row["valid_auc_std"] = _mean_std([r["valid"]["auc"] for r in runs])
        for metric in ("auc", "gauc", "logloss", "purity", "nmi"):
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r["test"][metric] for r in runs])
        row["best_epoch"] = statistics.fmean(r["best_epoch"] for r in runs)
        row["epochs"] = statistics.fmean(r["epochs"] for r in runs)
        # A best epoch at the epoch cap means the budget, not early stopping, ended the run.
        row["best_at_cap"] = sum(r["best_epoch"] == r["config"]["train"]["max_epochs"] for r in runs)
        # Boosted MoS: in how many seeds validation chose to serve the other experts' correction.
        served = [r["test"].get("serves_correction") for r in runs]
        row["serves_correction"] = None if None in served else sum(served)
        row["seconds_per_epoch"] = statistics.fmean(r["seconds_per_epoch"] for r in runs)
        row["theme_tokens"] = runs[0]["test"].get("theme_tokens")
        row["flops_by_module"] = runs[0]["flops"]["forward_by_module"]
        rows.append(row)
    return rows


def _served(row: dict) -> str:
    return "-" if row["serves_correction"] is None else f"{row['serves_correction']} of {row['seeds']} seeds"


def markdown_table(rows: List[dict]) -> str:
    """One row per model; FLOPs in the unit where the largest reads at least 1, one seed without a spread."""
    scale, unit = flops_unit(r["train_gflops"] * 1e9 for r in rows)
    lines = [f"| model | params | {unit}/ex (fwd) | {unit}/ex (train) | valid AUC | test AUC | test GAUC "
             "| test LogLoss | router purity | router NMI | best / ran epochs | correction served | wall s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def pm(metric, digits=4):
            return format_mean_std(r[f"{metric}_mean"], r[f"{metric}_std"], r["seeds"], digits)

        lines.append(f"| {r['model']} | {r['params']:,} | {r['gflops'] * 1e9 / scale:.3f} "
                     f"| {r['train_gflops'] * 1e9 / scale:.3f} | {pm('valid_auc')} | {pm('auc')} | {pm('gauc')} "
                     f"| {pm('logloss')} | {pm('purity', 3)} | {pm('nmi', 3)} "
                     f"| {r['best_epoch']:.1f} / {r['epochs']:.1f} | {_served(r)} | {r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines + ["", WALL_TIME_NOTE])


NEVER_WORSE_MARGIN = 0.002

TARGET_RULES = f"""How to read the verdict. Every number is the mean over the seeds of the test AUC of the
weights that were best on validation; "spread" is the larger of the two models' sample standard
deviations of that AUC over the seeds (seed-to-seed noise of the whole training run, data fixed).
- never worse: MoS's mean AUC >= the backbone's mean AUC - {NEVER_WORSE_MARGIN} (MoS contains its backbone).
- better: MoS's mean AUC exceeds the backbone's and each MoE baseline's by more than the spread,
  at fewer forward FLOPs per example than each MoE baseline (gshard, dselect_k, expert_choice).
Options were chosen on the validation split; the test split is only reported."""


def target_verdict(rows: List[dict]) -> str:
    """The two rules of `TARGET_RULES` for this data setting, each with its numbers."""
    by_name = {r["model"]: r for r in rows}
    missing = [name for name in ("mos",) + BASELINES if name not in by_name]
    if missing:
        return f"target: not evaluated (missing from models: {', '.join(missing)})"
    mos = by_name["mos"]
    if mos["seeds"] < 2:
        return "target: not evaluated (one seed: no spread to compare a gap with)"
    backbone_gap = mos["auc_mean"] - by_name["backbone"]["auc_mean"]
    never_worse = backbone_gap >= -NEVER_WORSE_MARGIN
    lines, verdicts = [], []
    for name in BASELINES:
        other = by_name[name]
        gap = mos["auc_mean"] - other["auc_mean"]
        spread = max(mos["auc_std"], other["auc_std"])
        auc_ok = gap > spread
        line = f"mos vs {name}: AUC {gap:+.4f} (spread {spread:.4f}) {'higher' if auc_ok else 'NOT higher'}"
        flops_ok = True
        if name in MOE_BASELINES:
            flops_ok = mos["gflops"] < other["gflops"]
            line += f"; FLOPs {mos['gflops'] / other['gflops']:.2f}x theirs, {'fewer' if flops_ok else 'NOT fewer'}"
        lines.append(line)
        verdicts.append(auc_ok and flops_ok)
    better = verdicts and all(verdicts)
    return "\n".join([f"never worse than the backbone: {'HOLDS' if never_worse else 'DOES NOT HOLD'} "
                      f"(AUC {backbone_gap:+.4f}, margin {NEVER_WORSE_MARGIN})",
                      f"better than the backbone and every MoE baseline: {'HOLDS' if better else 'DOES NOT HOLD'}"]
                     + ["- " + line for line in lines])


def _write_csv(path: Path, rows: List[dict]) -> None:
    columns = [k for k in rows[0] if k not in ("theme_tokens", "flops_by_module")]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def synthetic_batch(num_items: int, num_categories: int, examples: int, length: int, seed: int = 0) -> Batch:
    """`examples` histories of exactly `length` events, sessions of 8 (1-h gaps): for FLOPs only."""
    gen = torch.Generator().manual_seed(seed)
    total = examples * length
    position = torch.arange(total) % length
    gaps = torch.where(position % 8 == 0, 3600, 60)
    timestamps = torch.cumsum(gaps, 0)
    return Batch(item_ids=torch.randint(1, num_items, (total,), generator=gen),
                 category_ids=torch.randint(1, num_categories, (total,), generator=gen),
                 timestamps=timestamps, offsets=torch.arange(examples + 1) * length, max_len=length,
                 target_item=torch.randint(1, num_items, (examples,), generator=gen),
                 target_category=torch.randint(1, num_categories, (examples,), generator=gen),
                 label=torch.zeros(examples), user=torch.arange(examples))


def flops_by_length(model, profile_cfg, train_set) -> List[float]:
    """Forward GFLOPs per example of a trained `model` at each of `profile_cfg.lengths` (the
    router's choices decide the theme experts' segment lengths, so the trained model counts)."""
    device = next(model.parameters()).device
    return [count_flops(model, synthetic_batch(train_set.num_items, train_set.num_categories,
                                               profile_cfg.length_examples, length).to(device)
                        ).forward_per_example / 1e9 for length in profile_cfg.lengths]


def session_heatmaps(data, users: int, gap_seconds: float, max_sessions: int = 12):
    """Category-histogram cosine between the sessions of the first users with >= 6 sessions:
    (matrices, each session's true interest or number, the users)."""
    matrices, labels, shown = [], [], []
    offsets = data.user_offsets.tolist()
    for user in range(len(offsets) - 1):
        start, end = offsets[user], offsets[user + 1]
        times = data.timestamps[start:end]
        cuts = torch.nonzero(times[1:] - times[:-1] > gap_seconds).squeeze(1) + 1
        bounds = [0] + cuts.tolist() + [end - start]
        if len(bounds) - 1 < 6:
            continue
        bounds = bounds[:max_sessions + 1]
        hist = np.zeros((len(bounds) - 1, data.num_categories))
        for i in range(len(bounds) - 1):
            np.add.at(hist[i], data.category_ids[start + bounds[i]:start + bounds[i + 1]].numpy(), 1)
        unit = hist / np.linalg.norm(hist, axis=1, keepdims=True)
        matrices.append(unit @ unit.T)
        shown.append(user)
        if data.true_interest is not None:
            truth = data.true_interest[start:start + bounds[-1]]
            labels.append(metrics.session_majority(truth, torch.tensor(bounds)).tolist())
        else:
            labels.append(list(range(len(bounds) - 1)))
        if len(matrices) == users:
            break
    return matrices, labels, shown
