"""Training and evaluation of the CTR models: one run per (model kind, seed), and the whole job.

`load_data` builds the data `data.source` names (the synthetic generator, MovieLens-100k or a log
file) and prints its statistics. `train_one` trains with Adam and early stopping on validation
AUC, restores the best weights and evaluates them on test. Under torchrun it trains a DDP model
on each rank's share of the batches (`mos.lab.distributed`); it checkpoints its whole state
(`mos.lab.run_state`) so that a stopped run resumes to the same result; `mos.lab.evaluation` computes
the metrics of a split. `run` loads the data once, trains every model for every seed, appends one
JSON line per run to `<out_dir>/results.jsonl`, keeps every validation and test prediction in
`<out_dir>/predictions/<model>-seed<seed>.npz`, echoes the configuration into `<out_dir>/config.yaml`
and each run's epochs into `<out_dir>/epochs/<model>-seed<seed>.csv`, and prints the side-by-side
table; rank 0 alone prints and writes.
"""
from __future__ import annotations

import functools
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mos import boosting
from mos.lab import distributed, run_log, run_state
from mos.lab.config import RunConfig
from mos.lab.config_io import config_to_dict
from mos.lab.data import checks, logs, movielens, stats, synthetic
from mos.lab.data.dataset import CTRDataset, split_by_user
from mos.lab.errors import InputError
from mos.lab.files import append_line
from mos.lab.evaluation import SplitPredictions, predict_split, save_predictions, split_metrics
from mos.lab.model import CTRModel, training_loss
from mos.lab.report import metric_text, summary_table
from mos.lab.run_state import RunState
from mos.lab.variants import variant_config
from mos_kernels.checks import NonFiniteError, check_choice

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
    out_dir = Path(run_cfg.train.out_dir)
    results = out_dir / "results.jsonl"
    if group.is_main:      # the configuration the runs use, session mode as the data allows
        out_dir.mkdir(parents=True, exist_ok=True)
        run_log.echo_config(run_cfg, out_dir)
    if group.distributed:
        say(f"training on {group.world_size} processes ({group.device.type}), batch_size {run_cfg.train.batch_size} "
            f"per process")

    records = []
    for seed in run_cfg.train.seeds:
        for kind in run_cfg.models:
            path = out_dir / "checkpoints" / f"{kind}-seed{seed}.pt"
            saved = run_state.resume_point(path, run_cfg, kind, seed, group, say) if run_cfg.train.resume else None
            if saved is not None and saved["record"] is not None:
                say(f"{kind} seed {seed}: finished before; its record is in {results} and {path}")
                record = saved["record"]
                # A job killed between the checkpoint and the append: the record goes in now, once.
                if group.is_main and not _has_record(results, record):
                    append_line(results, json.dumps(record))
                records.append(record)
                continue
            record = train_one(run_cfg, kind, seed, data.splits, progress=run_cfg.train.progress, group=group,
                               checkpoint_path=path, resume_from=saved, vocabulary=data.vocabulary,
                               predictions_path=out_dir / "predictions" / f"{kind}-seed{seed}.npz",
                               epochs_path=out_dir / "epochs" / f"{kind}-seed{seed}.csv")
            if group.is_main:
                # Written as each run ends, so an interrupted job keeps the runs it finished.
                append_line(results, json.dumps(record))
            records.append(record)
    say(summary_table(records))
    say(f"{len(records)} runs in {results}")
    return records


def _has_record(results: Path, record: dict) -> bool:
    """Whether `results` (JSON lines) holds `record`'s run: its model, seed and trained weights."""
    if not results.exists():
        return False
    key = (record["model"], record["seed"], record["parameter_digests"])
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            other = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (other.get("model"), other.get("seed"), other.get("parameter_digests")) == key:
            return True
    return False


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
    user (`mos.lab.data.logs`). Settings this machine cannot honour stop before anything is loaded,
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
            log = movielens.load(cfg) if cfg.source == "movielens" else logs.load_log(cfg.log_path, cfg)
        say(log.report.format())
        data = Data(log.dataset, log.splits, log.report.has_timestamps, asdict(log.vocabulary))
    if data.has_timestamps:
        say(stats.format_statistics(stats.session_statistics(data.dataset, gap_seconds=run_cfg.model.mos.gap_seconds)))
    else:
        say("no session statistics: they cut sessions at time gaps, and the log has no timestamps")
    say("examples train / valid / test: " + " / ".join(str(len(split)) for split in data.splits))
    checks.check_splits(data.splits, cfg)
    return data


def _repeatable(train):
    """Run `train` with torch's deterministic algorithms on a CPU device. With more than one thread
    some default CPU backward kernels accumulate in a varying order (the gradients of the item
    embeddings, the attention's query and key projections, the router's prototypes differed
    between repeats of one step): two runs of one seed drifted apart from epoch 5 and could pick
    another best epoch. With these algorithms they repeat bitwise. They also fill every new
    tensor with NaN before its op writes it (an extra pass over each output: 3 % of a
    transformer or Mamba4Rec step on the long setting); that fill is off, as torch's docs allow
    where no uninitialized memory is read (the bitwise resume and parallel-run tests would see
    such a read). The caller's settings are restored after."""
    @functools.wraps(train)
    def repeatable(run_cfg: RunConfig, *args, **kwargs):
        previous = torch.are_deterministic_algorithms_enabled()
        previous_fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(previous or torch.device(run_cfg.train.device).type == "cpu")
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            return train(run_cfg, *args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(previous)
            torch.utils.deterministic.fill_uninitialized_memory = previous_fill
    return repeatable


@_repeatable
def train_one(run_cfg: RunConfig, kind: str, seed: int, splits, *, progress: str, inspect=None,
              group: Optional[distributed.Group] = None, checkpoint_path=None, resume_from=None,
              vocabulary: Optional[dict] = None, predictions_path=None, epochs_path=None) -> dict:
    """Train model `kind` with `seed` on `splits` = (train, valid, test); returns the run record.

    `progress` is "bar", "none" or "auto" (a bar only on an interactive terminal outside CI).
    `inspect(model) -> dict`: called on the trained model (best weights); its entries join the
    record (the profiler measures FLOPs this way). `group`: this process's rank (one process
    when None). `checkpoint_path`: where the run's state is saved after every epoch, every
    `train.checkpoint_every` steps and at the end; `resume_from`: a state saved there, to continue;
    `vocabulary`: how a log's items are numbered, kept in the checkpoint for `mos predict`;
    `predictions_path`: an .npz for every validation and test example's prediction (each
    candidate's too), so that paired tests can be run on them later; `epochs_path`: a CSV of every
    finished epoch's objective, BCE, aux terms, validation AUC and seconds (`mos.lab.run_log`).

    A boosted stacked kind stops early on its backbone candidate's validation AUC (so its
    backbone part trains exactly as the backbone model), then, with the best epoch's weights,
    chooses once which candidate to serve (`mos.boosting.choose_correction`, on validation).
    """
    train_set, valid_set, test_set = splits
    cfg = run_cfg.train
    run_log.code_version()      # read now: the record names the code imported, not a later commit
    group = group or distributed.single(cfg.device)
    device = group.device
    _seed_everything(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model_cfg = variant_config(run_cfg.model, kind)
    model = CTRModel(model_cfg, train_set.num_items, train_set.num_categories).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = RunState(epoch_shuffle=shuffle.get_state())
    if resume_from is not None:
        state = run_state.restore(resume_from, model, optimizer, group.rank)
    trained = distributed.wrap(model, group)
    run_config = config_to_dict(replace(run_cfg, model=model_cfg))
    predict_args = dict(batch_size=cfg.batch_size, device=device, max_history=run_cfg.data.max_history, group=group)
    num_themes = model_cfg.mos.num_themes
    watched = "backbone" if model_cfg.boosted else "auc"
    quiet = cfg.quiet or not group.is_main
    show_bar = group.is_main and _show_bar(progress)

    def save(record=None):
        if checkpoint_path is not None:
            run_state.save(checkpoint_path, group, kind, seed, run_config, model, optimizer, state, record, vocabulary)

    while len(state.train_loss) < cfg.max_epochs and not state.stopped(cfg.patience):
        epoch = len(state.train_loss) + 1
        try:
            _train_epoch(trained, optimizer, train_set, shuffle, state, run_cfg, group, save,
                         desc=f"{kind} seed {seed} epoch {epoch}", show_bar=show_bar)
        except TrainingDiverged as err:
            kept = f"its last checkpoint ({checkpoint_path}) is kept" if checkpoint_path else "nothing was saved"
            raise TrainingDiverged(f"train: {kind} seed {seed} diverged in epoch {epoch}: {err}; {kept}. Try a "
                                   f"smaller train.lr (now {cfg.lr:g})") from None
        loss, bce, aux = state.close_epoch(group, len(train_set))
        valid = split_metrics(predict_split(model, valid_set, **predict_args), num_themes, model)
        improved = state.validated(epoch, valid, model, watched)
        if not quiet:
            print(run_log.epoch_line(kind, seed, epoch, cfg.max_epochs, loss, bce, aux, _valid_text(valid),
                                     state.epoch_seconds[-1], improved), file=sys.stderr, flush=True)
        if epochs_path is not None and group.is_main:
            run_log.write_epochs(epochs_path, state)
        state.epoch_shuffle = shuffle.get_state()
        save()

    model.load_state_dict(state.best_state)
    valid_pred = predict_split(model, valid_set, **predict_args)
    selection = None
    if model_cfg.boosted:
        selection = _select(model, valid_pred)
        valid_pred = valid_pred.served(selection["serve_correction"])
    valid = split_metrics(valid_pred, num_themes, model)
    test_pred = predict_split(model, test_set, **predict_args)
    test = split_metrics(test_pred, num_themes, model)
    if not quiet:
        chosen = ("" if selection is None else
                  f"serves the {'corrected' if selection['serve_correction'] else 'backbone'} candidate "
                  f"(validation gain {selection['gain']:+.4f}, SE {selection['se']:.4f}); ")
        print(f"{kind} seed {seed}: best epoch {state.best_epoch}, {chosen}test AUC {metric_text(test, 'auc')}  "
              f"GAUC {metric_text(test, 'gauc')}  LogLoss {test['logloss']:.4f}", file=sys.stderr, flush=True)
    if predictions_path is not None and group.is_main:
        save_predictions(predictions_path, valid=valid_pred, test=test_pred)
    record = {**(inspect(model) if inspect is not None else {}),
              **_record(kind, seed, state, valid, test, selection, model, group), "config": run_config}
    save(record)
    return record


def _select(model, valid: SplitPredictions) -> dict:
    """Serve the corrected candidate of a boosted model iff its validation gain exceeds its
    user-clustered standard error (`mos.boosting.choose_correction`); the decision's numbers."""
    try:
        choice = boosting.choose_correction(valid.labels, valid.candidates["backbone"], valid.candidates["corrected"],
                                            groups=valid.users)
    except ValueError as err:     # AUC undefined on this validation split: nothing to prefer the correction on
        model.serve(False)
        return {"serve_correction": False, "backbone_auc": None, "corrected_auc": None, "gain": 0.0, "se": 0.0,
                "reason": str(err)}
    model.serve(choice.serve_correction)
    return asdict(choice)


def _valid_text(valid: dict) -> str:
    """The served AUC, or both candidates' for a boosted model (whose backbone AUC stops early)."""
    if valid.get("candidate_auc"):
        return " ".join(f"{name} {auc:.4f}" for name, auc in valid["candidate_auc"].items())
    return metric_text(valid, "auc")


def _train_epoch(trained, optimizer, train_set, shuffle, state: RunState, run_cfg: RunConfig, group, save, *,
                 desc: str, show_bar: bool) -> None:
    """This rank's steps of the epoch under way (from `state.step` on, after a resume), timed and
    checkpointed every `train.checkpoint_every` steps."""
    cfg = run_cfg.train
    shuffle.set_state(state.epoch_shuffle)
    num_batches = train_set.num_batches(cfg.batch_size)
    batches = distributed.rank_batches(
        train_set.batches(cfg.batch_size, shuffle=True, generator=shuffle, max_history=run_cfg.data.max_history),
        num_batches, group, start=state.step)
    with tqdm(total=distributed.steps_per_epoch(num_batches, group), initial=state.step, desc=desc,
              file=sys.stderr, leave=False, dynamic_ncols=True, disable=not show_bar) as bar:
        start = time.perf_counter()
        for batch in batches:
            loss = _train_step(trained, optimizer, batch.to(group.device), state, group)
            bar.update()
            if not bar.disable:
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                state.seconds += time.perf_counter() - start
                save()
                start = time.perf_counter()      # writing the checkpoint is not training time
        state.seconds += time.perf_counter() - start


def _record(kind: str, seed: int, state: RunState, valid: dict, test: dict, selection, model, group) -> dict:
    """The finished run's record: its curves, the served candidate's validation and test metrics
    at the best epoch, the candidate choice (boosted kinds) and the weights' digests."""
    return {
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
        "valid": valid,
        "test": test,
        "selection": selection,
        "params": sum(p.numel() for p in model.parameters()),
        "processes": group.world_size,
        "machine": run_log.machine(group.device),
        "code": run_log.code_version(),
        # One per rank, all equal: the tested weights, comparable across runs and resumes.
        "parameter_digests": distributed.parameter_digests(group, model),
    }


class TrainingDiverged(InputError):
    """The loss, a gradient or a weight became NaN or inf: training stops before the step is
    taken or saved, so the last checkpoint written is the last good state."""


def _train_step(model, optimizer, batch, state: RunState, group: Optional[distributed.Group] = None) -> torch.Tensor:
    """One optimizer step on `batch`; its loss joins the sums of the epoch under way. Raises
    TrainingDiverged, before anything is saved, when the model's tokens, the loss or a gradient
    is not finite (the step is not taken) or a weight is not after it (every rank agrees)."""
    group = group or distributed.single("cpu")
    step = state.step + 1
    model.train()
    try:
        out = model(batch)
    except NonFiniteError as err:     # finite weights so large that the embeddings overflow
        raise TrainingDiverged(f"the model's own values became non-finite at step {step} of the epoch ({err})") from None
    loss = training_loss(out, batch.label)
    bce = F.binary_cross_entropy_with_logits(out.logits.detach(), batch.label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for p in model.parameters()]
    if not _all_finite(group, [loss.detach()] + [p.grad for p in parameters if p.grad is not None]):
        raise TrainingDiverged(f"the loss or a gradient became non-finite at step {step} of the epoch "
                               f"(loss {float(loss.detach()):.4g}); the step was not taken")
    optimizer.step()
    if not _all_finite(group, [p.detach() for p in parameters]):
        raise TrainingDiverged(f"a weight became non-finite after step {step} of the epoch")
    state.loss_sum = state.loss_sum + loss.detach()
    state.bce_sum = state.bce_sum + bce.detach()
    for name, value in out.aux.items():
        state.aux_sums[name] = state.aux_sums.get(name, 0.0) + value
    state.step += 1
    return loss.detach()    # for the progress bar: reading a tensor that needs grad as a number warns


def _all_finite(group: distributed.Group, tensors) -> bool:
    """Whether every tensor is finite on every rank (one flag summed over the ranks, so that all
    of them stop together)."""
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors]).any().float()
    return float(distributed.sum_across(group, bad)) == 0.0


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
