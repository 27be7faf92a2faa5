"""Training and evaluation of the CTR models: one run per (model kind, seed), and the whole job.

`load_data` builds the data `data.source` names (the synthetic generator, MovieLens-100k or a log
file) and prints its statistics. `train_one` trains with Adam and early stopping on validation
AUC, restores the best weights and evaluates them on test. Under torchrun it trains a DDP model
on each rank's share of the batches (`mos.distributed`); it checkpoints its whole state
(`mos.checkpoint`) so that a stopped run resumes to the same result; `mos.evaluation` computes
the metrics of a split. `run` loads the data
once, trains every model for every seed, appends one JSON line per run to
`<out_dir>/results.jsonl` and prints the side-by-side table; rank 0 alone prints and writes.
"""
from __future__ import annotations

import functools
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mos import checkpoint, distributed
from mos.config import RunConfig
from mos.config_io import config_to_dict
from mos.data import checks, logs, movielens, stats, synthetic
from mos.data.dataset import CTRDataset, split_by_user
from mos.evaluation import evaluate
from mos.model import CTRModel, training_loss
from mos.report import metric_text, summary_table
from mos.variants import variant_config
from mos_kernels.checks import check_choice

# Options that change how a run looks, not what it computes: a resumed run may differ in them.
_RESUMABLE_CHANGES = ("train.resume", "train.quiet", "train.progress", "train.seeds", "train.threads",
                      "train.checkpoint_every", "train.out_dir")


@dataclass
class Data:
    """The examples of one data source: all of them, the (train, valid, test) split, whether the
    events carry real times (a log without a timestamp column does not) and, for a log, how its
    items are numbered (`logs.Vocabulary` as a dict: checkpoints keep it for scoring new logs)."""

    dataset: CTRDataset
    splits: tuple
    has_timestamps: bool = True
    vocabulary: Optional[dict] = None


def run(run_cfg: RunConfig) -> list[dict]:
    """Train every kind in `run_cfg.models` for every seed on one data set; returns the records."""
    if run_cfg.train.threads > 0:
        torch.set_num_threads(run_cfg.train.threads)
    group = distributed.setup(run_cfg.train.device)
    try:
        return _run(run_cfg, group)
    finally:
        distributed.teardown(group)


def _run(run_cfg: RunConfig, group: distributed.Group) -> list[dict]:
    say = _printer(group)
    data = load_data(run_cfg, group)
    run_cfg = sessions_for(run_cfg, data.has_timestamps, say)
    if group.distributed:
        say(f"training on {group.world_size} processes ({group.device.type}), batch_size {run_cfg.train.batch_size} "
            f"per process")

    out_dir = Path(run_cfg.train.out_dir)
    results = out_dir / "results.jsonl"
    if group.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in run_cfg.train.seeds:
        for kind in run_cfg.models:
            path = out_dir / "checkpoints" / f"{kind}-seed{seed}.pt"
            saved = _resume_point(path, run_cfg, kind, seed, group) if run_cfg.train.resume else None
            if saved is not None and saved["record"] is not None:
                say(f"{kind} seed {seed}: finished before; its record is in {results} and {path}")
                records.append(saved["record"])
                continue
            record = train_one(run_cfg, kind, seed, data.splits, progress=run_cfg.train.progress, group=group,
                               checkpoint_path=path, resume_from=saved, vocabulary=data.vocabulary)
            if group.is_main:
                # Written as each run ends, so an interrupted job keeps the runs it finished.
                with results.open("a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
            records.append(record)
    say(summary_table(records))
    say(f"{len(records)} runs in {results}")
    return records


def sessions_for(run_cfg: RunConfig, has_timestamps: bool, say=print) -> RunConfig:
    """`run_cfg` with MoS cutting fixed sessions where it asks for gap sessions on data without
    timestamps (saying so): row positions are no clock, a gap rule on them makes one session per user."""
    if has_timestamps or run_cfg.model.mos.session_mode != "gap":
        return run_cfg
    say("model.mos.session_mode: the data has no timestamps, so MoS cuts fixed sessions of "
        f"session_len={run_cfg.model.mos.session_len} instead of gap sessions")
    return replace(run_cfg, model=replace(run_cfg.model, mos=replace(run_cfg.model.mos, session_mode="fixed")))


def load_data(run_cfg: RunConfig, group: Optional[distributed.Group] = None) -> Data:
    """The data `run_cfg.data.source` names, split, with its statistics printed (by rank 0).

    "synthetic" splits by user (`split_by_user`); MovieLens and log files by time inside each
    user (`mos.data.logs`). Settings this machine cannot honour stop before anything is loaded,
    splits that cannot be trained on before anything is trained (`InputError`)."""
    distributed.check_machine(run_cfg.train.device, run_cfg.model.mos.backend)
    cfg = run_cfg.data
    group = group or distributed.single("cpu")
    say = _printer(group)
    if cfg.source == "synthetic":
        dataset = synthetic.generate(cfg.synthetic, cfg.seed)
        data = Data(dataset, split_by_user(dataset, cfg.valid_fraction, cfg.test_fraction, cfg.seed))
    else:
        with distributed.main_first(group):   # rank 0 fills the MovieLens cache, the others read it
            log = movielens.load(cfg) if cfg.source == "movielens" else logs.load_log(cfg.source, cfg)
        say(log.report.format())
        data = Data(log.dataset, log.splits, log.report.has_timestamps, asdict(log.vocabulary))
    if data.has_timestamps:
        say(stats.format_statistics(stats.session_statistics(data.dataset, gap_seconds=run_cfg.model.mos.gap_seconds)))
    else:
        say("no session statistics: they cut sessions at time gaps, and the log has no timestamps")
    say("examples train / valid / test: " + " / ".join(str(len(split)) for split in data.splits))
    checks.check_splits(data.splits, cfg)
    return data


@dataclass
class _RunState:
    """Everything a run has done so far: what a checkpoint stores besides model and optimizer."""

    epoch_shuffle: torch.Tensor          # the shuffle generator's state when the epoch under way began
    step: int = 0                        # steps this rank has taken in the epoch under way
    seconds: float = 0.0                 # seconds spent in it
    loss_sum: object = 0.0               # its sums of the loss, the BCE and each aux term (tensors
    bce_sum: object = 0.0                # on the device once a step ran: reading them back every
    aux_sums: dict = field(default_factory=dict)   # step would sync the GPU)
    train_loss: list = field(default_factory=list)   # per finished epoch from here on
    train_bce: list = field(default_factory=list)
    train_aux: dict = field(default_factory=dict)
    epoch_seconds: list = field(default_factory=list)
    valid_auc: list = field(default_factory=list)
    best_epoch: int = 0
    best_valid: Optional[dict] = None
    best_state: Optional[dict] = None

    def stopped(self, patience: int) -> bool:
        return len(self.train_loss) - self.best_epoch >= patience


def _repeatable(train):
    """Run `train` with torch's deterministic algorithms on a CPU device. With more than one thread
    some default CPU backward kernels accumulate in a varying order (the gradients of the item
    embeddings, the attention's query and key projections, the router's prototypes differed
    between repeats of one step): two runs of one seed drifted apart from epoch 5 and could pick
    another best epoch. With these algorithms they repeat bitwise. The caller's setting is
    restored after."""
    @functools.wraps(train)
    def repeatable(run_cfg: RunConfig, *args, **kwargs):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(previous or torch.device(run_cfg.train.device).type == "cpu")
        try:
            return train(run_cfg, *args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(previous)
    return repeatable


@_repeatable
def train_one(run_cfg: RunConfig, kind: str, seed: int, splits, *, progress: str, inspect=None,
              group: Optional[distributed.Group] = None, checkpoint_path=None, resume_from=None,
              vocabulary: Optional[dict] = None) -> dict:
    """Train model `kind` with `seed` on `splits` = (train, valid, test); returns the run record.

    `progress` is "bar", "none" or "auto" (a bar only on an interactive terminal outside CI).
    `inspect(model) -> dict`: called on the trained model (best weights); its entries join the
    record (the profiler measures FLOPs this way). `group`: this process's rank (one process
    when None). `checkpoint_path`: where the run's state is saved after every epoch, every
    `train.checkpoint_every` steps and at the end; `resume_from`: a state saved there, to continue;
    `vocabulary`: how a log's items are numbered, kept in the checkpoint for `mos predict`.
    """
    train_set, valid_set, test_set = splits
    cfg = run_cfg.train
    group = group or distributed.single(cfg.device)
    device = group.device
    _seed_everything(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model_cfg = variant_config(run_cfg.model, kind)
    model = CTRModel(model_cfg, train_set.num_items, train_set.num_categories).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _RunState(epoch_shuffle=shuffle.get_state())
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        state = _RunState(**resume_from["run"])
        _set_rng_state(resume_from["rng"][group.rank])
    trained = distributed.wrap(model, group)
    run_config = config_to_dict(replace(run_cfg, model=model_cfg))
    max_history = run_cfg.data.max_history
    eval_args = dict(batch_size=cfg.batch_size, device=device, num_themes=model_cfg.mos.num_themes,
                     max_history=max_history, group=group)
    quiet = cfg.quiet or not group.is_main
    show_bar = group.is_main and _show_bar(progress)

    def save(record=None):
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, group, kind, seed, run_config, model, optimizer, state, record,
                             vocabulary)

    num_batches = train_set.num_batches(cfg.batch_size)
    while len(state.train_loss) < cfg.max_epochs and not state.stopped(cfg.patience):
        epoch = len(state.train_loss) + 1
        shuffle.set_state(state.epoch_shuffle)
        batches = distributed.rank_batches(
            train_set.batches(cfg.batch_size, shuffle=True, generator=shuffle, max_history=max_history),
            num_batches, group, start=state.step)
        with tqdm(total=distributed.steps_per_epoch(num_batches, group), initial=state.step,
                  desc=f"{kind} seed {seed} epoch {epoch}", file=sys.stderr, leave=False, dynamic_ncols=True,
                  disable=not show_bar) as bar:
            start = time.perf_counter()
            for batch in batches:
                loss = _train_step(trained, optimizer, batch.to(device), state)
                bar.update()
                if not bar.disable:
                    bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    now = time.perf_counter()
                    state.seconds, start = state.seconds + now - start, now
                    save()
            state.seconds += time.perf_counter() - start
        loss, bce, aux = _close_epoch(state, group, len(train_set))
        valid = evaluate(model, valid_set, choose=True, **eval_args)
        state.valid_auc.append(valid["auc"])
        # The first epoch always counts as the best so far, so a NaN AUC still leaves weights to restore.
        improved = state.best_state is None or valid["auc"] > state.best_valid["auc"]
        if improved:
            state.best_epoch, state.best_valid = epoch, valid
            state.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        if not quiet:
            print(f"{kind} seed {seed} epoch {epoch}/{cfg.max_epochs}: train loss {loss:.4f} (BCE {bce:.4f})  "
                  f"valid AUC {metric_text(valid, 'auc')}  {state.epoch_seconds[-1]:.1f}s wall"
                  f"{'  *' if improved else ''}",
                  file=sys.stderr, flush=True)
        state.epoch_shuffle = shuffle.get_state()
        save()

    model.load_state_dict(state.best_state)
    test = evaluate(model, test_set, **eval_args)
    if not quiet:
        print(f"{kind} seed {seed}: best epoch {state.best_epoch}, test AUC {metric_text(test, 'auc')}  "
              f"GAUC {metric_text(test, 'gauc')}  LogLoss {test['logloss']:.4f}", file=sys.stderr, flush=True)
    record = {
        **(inspect(model) if inspect is not None else {}),
        "model": kind,
        "seed": seed,
        "epochs": len(state.train_loss),
        "best_epoch": state.best_epoch,
        "seconds_per_epoch": statistics.fmean(state.epoch_seconds),
        "epoch_seconds": state.epoch_seconds,
        "train_loss": state.train_loss,
        "train_bce": state.train_bce,
        "train_aux": state.train_aux,
        "valid_auc_curve": state.valid_auc,
        "valid": state.best_valid,
        "test": test,
        "params": sum(p.numel() for p in model.parameters()),
        "processes": group.world_size,
        # One per rank, all equal: the tested weights, comparable across runs and resumes.
        "parameter_digests": distributed.parameter_digests(group, model),
        "config": run_config,
    }
    save(record)
    return record


def _train_step(model, optimizer, batch, state: _RunState) -> torch.Tensor:
    """One optimizer step on `batch`; its loss joins the sums of the epoch under way."""
    model.train()
    out = model(batch)
    loss = training_loss(out, batch.label)
    bce = F.binary_cross_entropy_with_logits(out.logits.detach(), batch.label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    state.loss_sum = state.loss_sum + loss.detach()
    state.bce_sum = state.bce_sum + bce.detach()
    for name, value in out.aux.items():
        state.aux_sums[name] = state.aux_sums.get(name, 0.0) + value
    state.step += 1
    return loss.detach()    # for the progress bar: reading a tensor that needs grad as a number warns


def _close_epoch(state: _RunState, group: distributed.Group, examples: int) -> tuple[float, float, dict]:
    """Record the finished epoch's mean loss (BCE + weighted aux), mean BCE alone (comparable
    across model kinds) and mean aux terms, over every rank's steps; start the next epoch's sums."""
    if state.step == 0:
        raise ValueError(f"train split: expected at least one batch, got none from {examples} examples")

    def mean(total) -> float:
        return float(distributed.sum_across(group, torch.as_tensor(total))) / (state.step * group.world_size)

    loss, bce = mean(state.loss_sum), mean(state.bce_sum)
    aux = {name: mean(total) for name, total in state.aux_sums.items()}
    state.train_loss.append(loss)
    state.train_bce.append(bce)
    for name, value in aux.items():
        state.train_aux.setdefault(name, []).append(value)
    state.epoch_seconds.append(state.seconds)
    state.step, state.seconds, state.loss_sum, state.bce_sum, state.aux_sums = 0, 0.0, 0.0, 0.0, {}
    return loss, bce, aux


def _save_checkpoint(path, group, kind, seed, run_config, model, optimizer, state, record, vocabulary) -> None:
    """Every rank's RNG state goes to rank 0, which writes the checkpoint (a collective: all ranks call)."""
    rng = distributed.gather(group, _rng_state(group.device))
    if group.is_main:
        checkpoint.save(path, {
            "kind": kind, "seed": seed, "processes": group.world_size, "config": run_config,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "run": vars(state),
            "rng": rng, "record": record, "vocabulary": vocabulary,
        })


def _resume_point(path, run_cfg: RunConfig, kind: str, seed: int, group) -> Optional[dict]:
    """The state saved for run (kind, seed), checked against this job; None when there is none."""
    saved = checkpoint.load(path)
    if saved is None:
        _printer(group)(f"{kind} seed {seed}: no checkpoint at {path}, starting the run")
        return None
    if saved["processes"] != group.world_size:
        raise ValueError(f"train.resume: {path} was written by {saved['processes']} process(es), this job has "
                         f"{group.world_size}; resume with the same number (each rank's data share and RNG "
                         f"state depend on it)")
    now = config_to_dict(replace(run_cfg, model=variant_config(run_cfg.model, kind)))
    changed = [f"{key}: {old!r} -> {new!r}" for key, old, new in _config_changes(saved["config"], now)
               if not key.startswith(_RESUMABLE_CHANGES)]
    if changed:
        raise ValueError(f"train.resume: {path} was written with another configuration ({'; '.join(changed)}); "
                         f"resume with the one it was written with, or start over without --resume")
    return saved


def _config_changes(old: dict, new: dict, prefix: str = ""):
    """(dotted key, old value, new value) of every leaf of the data, model and train sections that differs."""
    for name in sorted(set(old) | set(new)):
        key = f"{prefix}{name}"
        if not prefix and name not in ("data", "model", "train"):
            continue
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _config_changes(a, b, f"{key}.")
        elif a != b:
            yield key, a, b


def _rng_state(device: torch.device) -> dict:
    """The random generators a training step may draw from (dropout, samplers)."""
    keys = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             # As a tensor: checkpoints load with weights_only, which refuses numpy arrays.
             "numpy": (keys[0], torch.from_numpy(keys[1].astype(np.int64)), *keys[2:])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _printer(group: distributed.Group):
    """`print` (flushed, so the lines keep their order with stderr's) on rank 0; other ranks stay quiet."""
    return functools.partial(print, flush=True) if group.is_main else (lambda *args, **kwargs: None)


def _show_bar(progress: str) -> bool:
    check_choice("progress", progress, ("auto", "bar", "none"))
    if progress == "auto":
        # A bar in a CI log or a redirected file is only noise; the epoch log lines say enough.
        return sys.stderr.isatty() and not os.environ.get("CI")
    return progress == "bar"
