"""`python -m mos predict`: score a log with a trained model, one CSV row per scored event.

The checkpoint (`<out_dir>/checkpoints/<model>-seed<seed>.pt`, written by `mos train`) holds the
run's configuration, its best weights (those its test metrics were measured with) and, for a
model trained on a log, how that log's items were numbered. The log to score is read with the
same column names, label rules and history options (`--set data.logs.*` changes them) and the same
checks as a training log (`mos.lab.data.logs`, scoring mode): its report goes to stderr, rows naming
an item the model never saw are refused and counted. Every event with at least
`data.logs.min_history` earlier events of its user in the log is scored: the predicted probability
that the user clicks the event's item, given those earlier events (the newest
`data.max_history`). The CSV, in the log's row order: the line in the log, the user and item
ids, the label where the log has labels, and the score.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import torch

from mos.lab import checkpoint
from mos.lab.config_io import load_run_config
from mos.lab.data import logs, movielens
from mos.lab.errors import InputError
from mos.lab.evaluation import predictions
from mos.lab.moved_options import migrate_state_dict
from mos.lab.model import CTRModel
from mos.lab.distributed import check_machine
from mos.lab.train import sessions_for


def predict(checkpoint_path, source: str, out, overrides: list[str] = ()) -> int:
    """Score the log `source` with the model saved at `checkpoint_path`; write the CSV to `out`
    (a path, or "-" for stdout). Returns the number of scored rows."""
    saved = checkpoint.load(checkpoint_path)
    if saved is None:
        raise InputError(f"--checkpoint: expected a checkpoint written by `mos train`, got {str(checkpoint_path)!r} "
                         f"(no such file)")
    if out != "-":   # before the scoring, so that a bad path costs no work
        _check_writable(Path(out))
    if saved.get("vocabulary") is None:
        raise InputError(f"--checkpoint: {checkpoint_path} holds a model trained on the synthetic data, whose items "
                         f"have no names to number a log's by; train on a log (--data path/to/log.csv) to score logs")
    try:
        run_cfg = load_run_config(None, [f"data.source={json.dumps(source)}", *overrides], base=saved["config"])
    except (ValueError, TypeError) as err:       # a bad --set, or --data naming no file
        raise InputError(str(err)) from None
    if run_cfg.data.source == "synthetic":
        raise InputError("--data: expected a log to score (a .csv, .tsv or .parquet file, or movielens), got 'synthetic'")
    check_machine(run_cfg.train.device, run_cfg.model.mos.backend)
    vocabulary = logs.Vocabulary(**saved["vocabulary"])
    _trained_model(run_cfg, vocabulary, saved)      # a --set the weights do not fit, before the log is read
    cfg = run_cfg.data
    log = movielens.load(cfg, vocabulary) if cfg.source == "movielens" else logs.load_log(cfg.log_path, cfg, vocabulary)
    print(log.report.format(), file=sys.stderr, flush=True)
    run_cfg = sessions_for(run_cfg, log.report.has_timestamps, lambda text: print(text, file=sys.stderr))

    device = torch.device(run_cfg.train.device)
    model = _trained_model(run_cfg, vocabulary, saved).to(device)
    outputs = predictions(model, log.dataset, batch_size=run_cfg.train.batch_size, device=device,
                          max_history=cfg.max_history)
    scores = torch.sigmoid(torch.cat([out["logits"] for out in outputs])).tolist()
    return _write(out, log, scores, (cfg.logs.user_column, cfg.logs.item_column, cfg.logs.label_column))


def _trained_model(run_cfg, vocabulary: logs.Vocabulary, saved: dict) -> CTRModel:
    """The model run_cfg builds for the vocabulary's items, holding the checkpoint's best weights."""
    model = CTRModel(run_cfg.model, len(vocabulary.items) + 1, vocabulary.num_categories)
    try:
        model.load_state_dict(migrate_state_dict(saved["run"]["best_state"] or saved["model"]))
    except RuntimeError as err:      # a --set that changes the model's shape (model.mos.dim, say)
        first = str(err).strip().splitlines()
        raise InputError(f"--set: expected options that build the model the checkpoint holds, got a model whose "
                         f"weights do not fit it ({first[1].strip() if len(first) > 1 else first[0]})") from None
    return model


def _write(out, log: logs.LogData, scores: list, columns: tuple) -> int:
    """The scores as CSV in the log's row order."""
    user_column, item_column, label_column = columns
    labelled = log.report.has_labels
    ds = log.dataset
    rows = sorted(zip(log.sample_line.tolist(), log.users[ds.sample_user.numpy()].tolist(),
                      ds.target_item.tolist(), ds.label.tolist(), scores))
    stream = sys.stdout if out == "-" else _open_for_writing(Path(out))
    try:
        writer = csv.writer(stream)
        writer.writerow(["line", user_column, item_column, *([label_column] if labelled else []), "score"])
        for line, user, item, label, score in rows:
            writer.writerow([line, user, log.vocabulary.items[item - 1], *([int(label)] if labelled else []),
                             f"{score:.6f}"])
    finally:
        if stream is not sys.stdout:
            stream.close()
    return len(rows)


def _check_writable(path: Path) -> None:
    """Creates the file's folder (as `train.out_dir` is created); refuses a folder or an unwritable place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out: expected a file path whose folder can be created, got {str(path)!r} "
                         f"({err.strerror or err})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--out: expected a file path that can be written, got {str(path)!r}")


def _open_for_writing(path: Path):
    _check_writable(path)
    return open(path, "w", newline="", encoding="utf-8")
