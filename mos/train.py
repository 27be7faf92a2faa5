"""Training and evaluation of the CTR models: one run per (model kind, seed), and the whole job.

`train_one` trains with Adam and early stopping on validation AUC, restores the best weights and
evaluates them on test. `evaluate` owns the metrics of one split, router quality included.
`run` builds the data once, trains every model for every seed, appends one JSON line per run
to `<out_dir>/results.jsonl` and prints the side-by-side table.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mos import metrics
from mos.config import RunConfig
from mos.config_io import config_to_dict
from mos.data import stats, synthetic
from mos.data.dataset import split_by_user
from mos.model import CTRModel
from mos.variants import variant_config
from mos.report import summary_table
from mos_kernels._checks import check_choice


def run(run_cfg: RunConfig) -> list[dict]:
    """Train every kind in `run_cfg.models` for every seed on one data set; returns the records."""
    if run_cfg.train.threads > 0:
        torch.set_num_threads(run_cfg.train.threads)
    data = synthetic.generate(run_cfg.data)  # "synthetic" is the only source DataConfig accepts
    splits = split_by_user(data, run_cfg.data.valid_fraction, run_cfg.data.test_fraction, run_cfg.data.seed)
    print(stats.format_statistics(stats.session_statistics(data, gap_seconds=run_cfg.model.mos.gap_seconds)))
    print("examples train / valid / test: " + " / ".join(str(len(split)) for split in splits), flush=True)

    out_dir = Path(run_cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    records = []
    for seed in run_cfg.train.seeds:
        for kind in run_cfg.models:
            record = train_one(run_cfg, kind, seed, splits, progress=run_cfg.train.progress)
            # Written as each run ends, so an interrupted job keeps the runs it finished.
            with results.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
            records.append(record)
    print(summary_table(records))
    print(f"{len(records)} runs appended to {results}", flush=True)
    return records


def train_one(run_cfg: RunConfig, kind: str, seed: int, splits, *, progress: str) -> dict:
    """Train model `kind` with `seed` on `splits` = (train, valid, test); returns the run record.

    `progress` is "bar", "none" or "auto" (a bar only on an interactive terminal outside CI).
    """
    train_set, valid_set, test_set = splits
    cfg = run_cfg.train
    device = torch.device(cfg.device)
    _seed_everything(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model_cfg = variant_config(run_cfg.model, kind)
    model = CTRModel(model_cfg, train_set.num_items, train_set.num_categories).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    eval_args = dict(batch_size=cfg.batch_size, device=device, num_themes=model_cfg.mos.num_themes)
    show_bar = _show_bar(progress)

    train_loss, train_bce, epoch_seconds, valid_auc = [], [], [], []
    train_aux: dict[str, list[float]] = {}
    best_epoch, best_state, best_valid = 0, None, None
    for epoch in range(1, cfg.max_epochs + 1):
        with tqdm(total=train_set.num_batches(cfg.batch_size), desc=f"{kind} seed {seed} epoch {epoch}",
                  file=sys.stderr, leave=False, dynamic_ncols=True, disable=not show_bar) as bar:
            start = time.perf_counter()
            loss, bce, aux = _train_epoch(model, optimizer, train_set, cfg.batch_size, shuffle, device, bar)
            epoch_seconds.append(time.perf_counter() - start)
        train_loss.append(loss)
        train_bce.append(bce)
        for name, value in aux.items():
            train_aux.setdefault(name, []).append(value)
        valid = evaluate(model, valid_set, **eval_args)
        valid_auc.append(valid["auc"])
        # The first epoch always counts as the best so far, so a NaN AUC still leaves weights to restore.
        improved = best_state is None or valid["auc"] > best_valid["auc"]
        if improved:
            best_epoch, best_valid = epoch, valid
            best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        if not cfg.quiet:
            print(f"{kind} seed {seed} epoch {epoch}/{cfg.max_epochs}: train loss {loss:.4f} (BCE {bce:.4f})  "
                  f"valid AUC {valid['auc']:.4f}  {epoch_seconds[-1]:.1f}s{'  *' if improved else ''}",
                  file=sys.stderr, flush=True)
        if epoch - best_epoch >= cfg.patience:
            break

    model.load_state_dict(best_state)
    test = evaluate(model, test_set, **eval_args)
    if not cfg.quiet:
        print(f"{kind} seed {seed}: best epoch {best_epoch}, test AUC {test['auc']:.4f}  "
              f"GAUC {test['gauc']:.4f}  LogLoss {test['logloss']:.4f}", file=sys.stderr, flush=True)
    return {
        "model": kind,
        "seed": seed,
        "epochs": len(train_loss),
        "best_epoch": best_epoch,
        "seconds_per_epoch": statistics.fmean(epoch_seconds),
        "epoch_seconds": epoch_seconds,
        "train_loss": train_loss,
        "train_bce": train_bce,
        "train_aux": train_aux,
        "valid_auc_curve": valid_auc,
        "valid": best_valid,
        "test": test,
        "params": sum(p.numel() for p in model.parameters()),
        "config": config_to_dict(replace(run_cfg, model=model_cfg)),
    }


def _train_epoch(model, optimizer, dataset, batch_size: int, shuffle: torch.Generator, device,
                 bar) -> tuple[float, float, dict[str, float]]:
    """One pass over `dataset`; returns the mean loss (BCE + weighted aux), the mean BCE alone
    (comparable across model kinds) and the mean of each aux term."""
    model.train()
    # Sums stay on the device: reading a loss back every batch would sync the GPU each step.
    loss_sum, bce_sum, aux_sums, steps = 0.0, 0.0, {}, 0
    for batch in dataset.batches(batch_size, shuffle=True, generator=shuffle):
        batch = batch.to(device)
        out = model(batch)
        bce = F.binary_cross_entropy_with_logits(out.logits, batch.label)
        loss = bce + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum = loss_sum + loss.detach()
        bce_sum = bce_sum + bce.detach()
        for name, value in out.aux.items():
            aux_sums[name] = aux_sums.get(name, 0.0) + value
        steps += 1
        bar.update()
        if not bar.disable:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    if steps == 0:
        raise ValueError(f"train split: expected at least one batch, got none from {len(dataset)} examples")
    return float(loss_sum) / steps, float(bce_sum) / steps, {name: float(total) / steps for name, total in aux_sums.items()}


@torch.no_grad()
def evaluate(model, dataset, *, batch_size: int, device, num_themes: int) -> dict:
    """AUC, GAUC, LogLoss of `model` on `dataset`; with a router, also the tokens each theme got
    and (when the data knows each event's true interest) the router's purity and NMI."""
    model.eval()
    logits, labels, users = [], [], []
    theme_tokens = torch.zeros(num_themes, dtype=torch.int64)
    assigned, truth = [], []
    routed = False
    for batch in dataset.batches(batch_size):
        batch = batch.to(device)
        out = model(batch)
        logits.append(out.logits.float().cpu())
        labels.append(batch.label.float().cpu())
        users.append(batch.user.cpu())
        routing = out.routing
        if routing is None:
            continue
        routed = True
        session_theme = routing.session_theme.cpu()
        theme_tokens.index_add_(0, session_theme, routing.session_offsets.diff().cpu())
        if batch.true_interest is not None:
            assigned.append(session_theme)
            truth.append(metrics.session_majority(batch.true_interest, routing.session_offsets).cpu())
    logits, labels, users = torch.cat(logits), torch.cat(labels), torch.cat(users)
    gauc, users_used, users_skipped = metrics.gauc(labels, logits, users)
    result = {
        "examples": int(labels.numel()),
        "auc": float(metrics.auc(labels, logits)),
        "gauc": float(gauc),
        "gauc_users": int(users_used),
        "gauc_users_skipped": int(users_skipped),
        "logloss": float(metrics.logloss(labels, logits)),
        "purity": None,
        "nmi": None,
        "theme_tokens": theme_tokens.tolist() if routed else None,
    }
    if assigned:
        # Sessions made only of noise events (truth -1) are left out by the metrics themselves.
        assigned, truth = torch.cat(assigned), torch.cat(truth)
        result["purity"] = float(metrics.routing_purity(assigned, truth))
        result["nmi"] = float(metrics.routing_nmi(assigned, truth))
    return result


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _show_bar(progress: str) -> bool:
    check_choice("progress", progress, ("auto", "bar", "none"))
    if progress == "auto":
        # A bar in a CI log or a redirected file is only noise; the epoch log lines say enough.
        return sys.stderr.isatty() and not os.environ.get("CI")
    return progress == "bar"
