"""What a training run has done so far, and saving and resuming it.

`RunState` holds everything a run keeps besides its model and optimizer: the epoch under way
(its shuffle state, steps, sums of the loss terms) and every finished epoch's curves and the
best weights. `save` writes it, with the model, the optimizer and every rank's RNG state, to a
checkpoint (`mos.lab.checkpoint`); `resume_point` reads one back for `train.resume`, refusing one
written by another number of processes or with another configuration.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from mos.lab import checkpoint, distributed
from mos.lab.config import RunConfig
from mos.lab.config_io import config_to_dict
from mos.lab.errors import InputError
from mos.lab.moved_options import migrate, migrate_state_dict
from mos.lab.variants import variant_config

# Options that change how a run looks, not what it computes: a resumed run may differ in them.
RESUMABLE_CHANGES = ("train.resume", "train.quiet", "train.progress", "train.seeds", "train.threads",
                     "train.checkpoint_every", "train.out_dir")


@dataclass
class RunState:
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
    best_auc: Optional[float] = None     # the watched validation AUC of the best epoch
    best_state: Optional[dict] = None

    def stopped(self, patience: int) -> bool:
        return len(self.train_loss) - self.best_epoch >= patience

    def validated(self, epoch: int, valid: dict, model, watched: str = "auc") -> bool:
        """Record epoch `epoch`'s validation metrics; keep the model's weights when the AUC early
        stopping watches (`watched`: "auc" of the served prediction, or "backbone" for a boosted
        model's backbone candidate) is the best so far. Returns whether it is."""
        auc = valid["auc"] if watched == "auc" else (valid["candidate_auc"] or {}).get(watched)
        self.valid_auc.append(auc)
        # The first epoch always counts as the best so far, so a NaN AUC still leaves weights to restore.
        improved = self.best_state is None or (auc is not None and (self.best_auc is None or auc > self.best_auc))
        if improved:
            self.best_epoch, self.best_valid, self.best_auc = epoch, valid, auc
            self.best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        return improved

    def close_epoch(self, group: distributed.Group, examples: int) -> tuple[float, float, dict]:
        """Record the finished epoch's mean loss (BCE + weighted aux), mean BCE alone (comparable
        across model kinds) and mean aux terms, over every rank's steps; start the next epoch's sums."""
        if self.step == 0:
            raise ValueError(f"train split: expected at least one batch, got none from {examples} examples")

        def mean(total) -> float:
            return float(distributed.sum_across(group, torch.as_tensor(total))) / (self.step * group.world_size)

        loss, bce = mean(self.loss_sum), mean(self.bce_sum)
        aux = {name: mean(total) for name, total in self.aux_sums.items()}
        self.train_loss.append(loss)
        self.train_bce.append(bce)
        for name, value in aux.items():
            self.train_aux.setdefault(name, []).append(value)
        self.epoch_seconds.append(self.seconds)
        self.step, self.seconds, self.loss_sum, self.bce_sum, self.aux_sums = 0, 0.0, 0.0, 0.0, {}
        return loss, bce, aux


def save(path, group, kind, seed, run_config, model, optimizer, state: RunState, record, vocabulary) -> None:
    """Every rank's RNG state goes to rank 0, which writes the checkpoint (a collective: all ranks call)."""
    rng = distributed.gather(group, _rng_state(group.device))
    if group.is_main:
        checkpoint.save(path, {
            "kind": kind, "seed": seed, "processes": group.world_size, "config": run_config,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "run": vars(state),
            "rng": rng, "record": record, "vocabulary": vocabulary,
        })


def restore(saved: dict, model, optimizer, rank: int) -> RunState:
    """Load a checkpoint's model, optimizer and this rank's RNG state; returns its run state."""
    model.load_state_dict(migrate_state_dict(saved["model"]))
    optimizer.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng"][rank])
    run = dict(saved["run"])
    if run.get("best_state") is not None:
        run["best_state"] = migrate_state_dict(run["best_state"])
    if "best_auc" not in run and run.get("best_valid"):      # written before early stopping named its AUC
        run["best_auc"] = run["best_valid"]["auc"]
    return RunState(**run)


def resume_point(path, run_cfg: RunConfig, kind: str, seed: int, group, say) -> Optional[dict]:
    """The state saved for run (kind, seed), checked against this job; None when there is none."""
    saved = checkpoint.load(path)
    if saved is None:
        say(f"{kind} seed {seed}: no checkpoint at {path}, starting the run")
        return None
    if saved["processes"] != group.world_size:
        raise InputError(f"train.resume: {path} was written by {saved['processes']} process(es), this job has "
                         f"{group.world_size}; resume with the same number (each rank's data share and RNG "
                         f"state depend on it)")
    now = config_to_dict(replace(run_cfg, model=variant_config(run_cfg.model, kind)))
    # A checkpoint written before an option moved names it by its old key: compare at the new place.
    written = migrate(copy.deepcopy(saved["config"]))
    changed = [f"{key}: {old!r} -> {new!r}" for key, old, new in config_changes(written, now)
               if not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise InputError(f"train.resume: {path} was written with another configuration ({'; '.join(changed)}); "
                         f"resume with the one it was written with, or start over without --resume")
    return saved


def config_changes(old: dict, new: dict, prefix: str = ""):
    """(dotted key, old value, new value) of every leaf of the data, model and train sections that differs."""
    for name in sorted(set(old) | set(new)):
        key = f"{prefix}{name}"
        if not prefix and name not in ("data", "model", "train"):
            continue
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from config_changes(a, b, f"{key}.")
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
