"""The profile's training runs: what identifies one, where it is kept, and running many of them,
one after another or in parallel processes (`--jobs N`, one thread each).

A run is a model name, a seed and that model's options ({dotted key: value}: the model's own
`profile.per_model` options and, in the tuning stage, one option set of `profile.grid`). Its
fingerprint hashes everything that decides its result; its files are
`<out_dir>/runs/<name>-<fingerprint[:12]>.json` (the record), `.npz` (every validation and
test prediction) and `.epochs.csv` (the run's epochs, `mos.lab.run_log`). A finished run whose fingerprint matches is read back, never recomputed.
Files are written whole (`mos.lab.files.write_atomic`), each by the one process that ran it, so runs
that end together, or a job killed half-way, never lose or double a record: rerunning the
command trains only what is missing. A run under way is checkpointed after every epoch (and every
`train.checkpoint_every` steps) to `<out_dir>/checkpoints/<name>-<fingerprint[:12]>.pt`; rerun, it
continues from there (`mos.lab.run_state`: on the same machine and thread count, to the record it
would have written unstopped), and the checkpoint is deleted once the record is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mos.lab import checkpoint as checkpoint_file, distributed, run_state
from mos.lab.config import RunConfig
from mos.lab.config_io import config_to_dict, with_options
from mos.lab.data.config import SOURCES
from mos.lab.errors import InputError
from mos.lab.moved_options import drop_later_options
from mos.lab.files import remove_leftovers, write_atomic
from mos.lab.flops import count_flops
from mos.lab.report import metric_text
from mos.lab.train import load_data, train_one
from mos.lab.variants import variant_config

from .measures import flops_by_length

MOE_BASELINES = ("gshard", "dselect_k", "expert_choice")


@dataclass(frozen=True)
class Job:
    """One training run of the profile."""

    name: str                 # the model variant (`models`)
    seed: int
    options: tuple = ()       # sorted (dotted key, value) pairs applied to the config
    stage: str = "final"      # "tuning" (a grid point on the tuning seeds) or "final"

    @property
    def option_dict(self) -> dict:
        return dict(self.options)

    def describe(self) -> str:
        options = ", ".join(f"{key}={value}" for key, value in self.options)
        return f"{self.name} seed {self.seed}" + (f" ({options})" if options else "")


def make_job(name: str, seed: int, options: dict, stage: str = "final") -> Job:
    return Job(name, seed, tuple(sorted((key, _hashable(value)) for key, value in options.items())), stage)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def job_config(run_cfg: RunConfig, job: Job) -> RunConfig:
    """The run's configuration: `run_cfg` with the job's options, its seed alone."""
    cfg = with_options(run_cfg, job.option_dict, f"options of {job.name}") if job.options else run_cfg
    return replace(cfg, train=replace(cfg.train, seeds=(job.seed,)))


def fingerprint(cfg: RunConfig, name: str, seed: int) -> str:
    """What decides a run's record: the data (a log file's size and time too), the variant's model
    options that its kind reads, training (the device too: a GPU rounds differently), the seed and
    the FLOP measurements; not where the record is written nor how loudly. The code is not in it:
    clear `<out_dir>/runs/` and `<out_dir>/checkpoints/` after changing the code (each record names
    the commit it trained at, `run_log.code_version`)."""
    train = replace(cfg.train, seeds=(seed,), out_dir="", progress="none", quiet=True, threads=0,
                    checkpoint_every=0, resume=False)
    source = cfg.data.source
    # The built-in sources (the shipped sample log included) change only with the code.
    log_file = None if source in SOURCES else [os.path.getsize(source), os.path.getmtime(source)]
    key = {"data": config_to_dict(cfg.data), "log_file": log_file,
           "model": model_key(variant_config(cfg.model, name)), "train": config_to_dict(train),
           "flop_batch_size": cfg.profile.flop_batch_size, "lengths": list(cfg.profile.lengths),
           "length_examples": cfg.profile.length_examples, "variant": name, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# The encoder options every model kind reads (the session options cut the sessions the recency
# embedding counts); the other MoSConfig fields shape MoS alone.
SHARED_ENCODER_FIELDS = ("dim", "num_heads", "encoder", "num_layers", "dropout", "backend", "attention_mass",
                         "session_mode", "session_len", "gap_seconds", "max_session_len", "validate_inputs")


def model_key(model_cfg) -> dict:
    """The model options a run of this kind reads: a MoS option does not invalidate a finished
    backbone run, nor a MoE option a MoS run."""
    key = drop_later_options({"model": config_to_dict(model_cfg)}, only_at_default=True)["model"]
    if model_cfg.kind != "mos":
        key["mos"] = {name: key["mos"][name] for name in SHARED_ENCODER_FIELDS}
        del key["ablation"]
    if not model_cfg.stacked:
        del key["training"]
    if model_cfg.kind not in MOE_BASELINES:
        del key["moe"]
    return key


class RunStore:
    """The finished runs of one profile, in `<out_dir>/runs/`."""

    def __init__(self, out_dir: Path):
        self.folder = Path(out_dir) / "runs"

    def paths(self, cfg: RunConfig, job: Job) -> tuple[Path, Path, str]:
        """(record path, predictions path, fingerprint) of `job` run with `cfg` (its job_config)."""
        digest = fingerprint(cfg, job.name, job.seed)
        stem = self.folder / f"{job.name}-{digest[:12]}"
        return stem.with_suffix(".json"), stem.with_suffix(".npz"), digest

    def checkpoint(self, job: Job, digest: str) -> Path:
        """Where `job`'s run under way is checkpointed: beside runs/, so that a results folder
        holds finished runs only."""
        return self.folder.parent / "checkpoints" / f"{job.name}-{digest[:12]}.pt"

    def clear_debris(self, cfg: RunConfig, job: Job) -> None:
        """Delete what a writer killed while writing `job`'s files left (mos.lab.files: hidden
        temporary files no reader opens), before the run is trained again. Two processes never
        train one run at once, so none of them is being written."""
        for path in self.paths(cfg, job)[:2]:
            remove_leftovers(path)

    def read(self, cfg: RunConfig, job: Job) -> Optional[dict]:
        """The finished run's record, or None (no file, another fingerprint, or no predictions). A
        record file that is not one (written whole by mos.lab.files, so damaged by a copy or a
        disk), or whose record lacks a field the report reads, is named on stderr and counts as
        not finished: training writes it again."""
        record_path, predictions_path, digest = self.paths(cfg, job)
        if not record_path.exists() or not predictions_path.exists():
            return None
        try:
            stored = json.loads(record_path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or not isinstance(stored.get("record"), dict):
                raise ValueError("no run record in it")
            if stored.get("fingerprint") != digest:
                return None
            _check_record_fields(stored["record"])
        except (ValueError, UnicodeDecodeError) as err:      # JSONDecodeError is a ValueError
            _say(f"{record_path}: unreadable ({err}); the run counts as not finished")
            return None
        return stored["record"]


# The fields of a record the report reads, with their JSON types: a record edited by hand or cut
# by a tool is named here, not a KeyError from inside the report.
_RECORD_FIELDS = {"model": str, "seed": int, "run_id": str, "epochs": int, "best_epoch": int,
                  "seconds_per_epoch": (int, float), "params": int, "flops_by_length": list,
                  "parameter_digests": list, "valid": {"auc": (int, float)}, "test": {"auc": (int, float)},
                  "flops": {"forward_per_example": (int, float), "training_per_example": (int, float),
                            "forward_by_module": dict},
                  "config": {"train": {"max_epochs": int}}}


def _check_record_fields(record: dict, fields: dict = _RECORD_FIELDS, where: str = "") -> None:
    """Raises ValueError naming the first field of `fields` that `record` lacks or holds in another type."""
    for key, kind in fields.items():
        name = f"{where}{key}"
        if key not in record:
            raise ValueError(f"no {name!r} field")
        if isinstance(kind, dict):
            if not isinstance(record[key], dict):
                raise ValueError(f"{name!r}: expected an object, got {type(record[key]).__name__}")
            _check_record_fields(record[key], kind, f"{name}.")
        elif isinstance(record[key], bool) or not isinstance(record[key], kind):
            raise ValueError(f"{name!r}: expected {_json_type(kind)}, got {type(record[key]).__name__}")


def _json_type(kind) -> str:
    return {str: "a string", int: "an integer", list: "a list", dict: "an object"}.get(kind, "a number")


def run_jobs(jobs: Sequence[Job], run_cfg: RunConfig, store: RunStore, context: "Context", *, workers: int = 1,
             report_only: bool = False) -> tuple[Dict[Job, dict], List[Job]]:
    """Every job's record: read back when finished, else trained (unless `report_only`): here
    with `context`'s data, or with `workers` > 1 in that many processes of one thread each (each
    loads the data itself). Returns (records by job, the jobs missing under `report_only`).
    Progress goes to stderr, one line per run."""
    configs = {job: job_config(run_cfg, job) for job in jobs}
    records, missing, todo = {}, [], []
    for job in jobs:
        cached = store.read(configs[job], job)
        if cached is not None:
            records[job] = cached
            # Left when a job was stopped between writing the record and deleting it.
            store.checkpoint(job, fingerprint(configs[job], job.name, job.seed)).unlink(missing_ok=True)
        elif report_only:
            missing.append(job)
        else:
            store.clear_debris(configs[job], job)
            todo.append(job)
    _say(f"{len(jobs)} runs: {len(records)} finished before, {len(todo)} to train"
         + (f", {len(missing)} missing" if missing else "") + (f", {workers} at a time" if todo and workers > 1 else ""))
    if not todo:
        return records, missing
    start = time.perf_counter()
    if workers <= 1:
        for done, job in enumerate(todo, start=1):
            records[job] = _train(context, configs[job], job, store)
            _progress(done, len(todo), job, records[job], start)
        return records, missing
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(run_cfg,)) as pool:
        futures = {pool.submit(_train_in_worker, configs[job], job, store.folder): job for job in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            job = futures[future]
            records[job] = future.result()
            _progress(done, len(todo), job, records[job], start)
    return records, missing


@dataclass
class Context:
    """What every run of one profile shares: the data, and the test batch FLOPs are counted on."""

    splits: tuple
    flop_batch: object

    @classmethod
    def of(cls, run_cfg: RunConfig, splits) -> "Context":
        flop_batch = next(splits[2].batches(run_cfg.profile.flop_batch_size, max_history=run_cfg.data.max_history))
        return cls(splits, flop_batch)


def _train(context: Context, cfg: RunConfig, job: Job, store: RunStore) -> dict:
    record_path, predictions_path, digest = store.paths(cfg, job)

    def inspect(model):
        return {"flops": asdict(count_flops(model, context.flop_batch.to(next(model.parameters()).device))),
                "flops_by_length": flops_by_length(model, cfg.profile, context.splits[0])}

    checkpoint = store.checkpoint(job, digest)
    saved = _resume_point(checkpoint, cfg, job)
    if saved is not None and saved["record"] is not None and predictions_path.exists():
        # Stopped after the run's last save, before its record was written: the saved record is
        # the run's (evaluating again would draw a random router's themes anew).
        record = saved["record"]
    else:
        record = train_one(cfg, job.name, job.seed, context.splits, progress=cfg.train.progress, inspect=inspect,
                           checkpoint_path=checkpoint, resume_from=saved, predictions_path=predictions_path,
                           epochs_path=record_path.with_suffix(".epochs.csv"))
    record.update(run_id=record_path.stem, options=job.option_dict, stage=job.stage)
    # The predictions first: a record on disk always has its predictions beside it.
    write_atomic(record_path, json.dumps({"fingerprint": digest, "record": record}))
    checkpoint.unlink(missing_ok=True)
    return record


def _resume_point(checkpoint: Path, cfg: RunConfig, job: Job) -> Optional[dict]:
    """The state saved for the run under way, or None. The file is named by the run's fingerprint,
    which leaves out options its kind does not read; `run_state.resume_point` compares them all,
    so a checkpoint written before such an option changed is refused there: the run starts over."""
    try:
        saved = run_state.resume_point(checkpoint, cfg, job.name, job.seed, distributed.single(cfg.train.device),
                                       say=lambda _: None)
    except (InputError, checkpoint_file.CheckpointError) as err:      # changed options; a damaged file
        _say(f"{job.describe()}: not resuming ({err}); starting over")
        checkpoint.unlink(missing_ok=True)
        return None
    if saved is not None:
        step = saved["run"]["step"]
        _say(f"{job.describe()}: resuming after epoch {len(saved['run']['train_loss'])}"
             + (f" and {step} steps of the next" if step else "") + f" from {checkpoint}")
    return saved


_WORKER: Optional[Context] = None


def _start_worker(run_cfg: RunConfig) -> None:
    """A worker process: one thread (the runs in parallel share the cores), the data loaded once,
    its statistics not printed again."""
    global _WORKER
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        _WORKER = Context.of(run_cfg, load_data(run_cfg).splits)


def _train_in_worker(cfg: RunConfig, job: Job, folder: Path) -> dict:
    store = RunStore(folder.parent)
    return _train(_WORKER, replace(cfg, train=replace(cfg.train, quiet=True, progress="none")), job, store)


def _progress(done: int, total: int, job: Job, record: dict, start: float) -> None:
    elapsed = time.perf_counter() - start
    left = elapsed / done * (total - done)
    _say(f"[{done}/{total}] {job.describe()}: valid AUC {metric_text(record['valid'], 'auc')}, best epoch {record['best_epoch']} of "
         f"{record['epochs']}  ({elapsed / 60:.1f} min so far, ~{left / 60:.1f} min left)")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
