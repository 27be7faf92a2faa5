"""`python -m mos predict`: a model trained on a log scores a log, with the training data checks,
and its scores on the test events reproduce the test AUC of the run."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mos.lab import metrics
from mos.lab.data.config import DataConfig
from mos.lab.data.logs import load_log

HEADER = ["user_id", "item_id", "timestamp", "label"]


def write(path, rows, header=HEADER):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def log_rows(users=24, events=12, seed=0):
    """Even items are clicked, odd ones not (90 % of the time): the target alone predicts the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for e in range(events):
            item = int(rng.integers(0, 16))
            label = int((item % 2 == 0) != (rng.random() < 0.1))
            rows.append([f"u{u}", f"i{item}", str(1_700_000_000 + 600 * e + u), str(label)])
    return rows


def mos(*args):
    done = subprocess.run([sys.executable, "-m", "mos", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CI": "1"})
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A backbone trained for three epochs on a small log through the command line."""
    folder = tmp_path_factory.mktemp("predict")
    log = write(folder / "log.csv", log_rows())
    code, out, err = mos("train", "--data", log, "--quiet", "--set", "models=[backbone]", "train.max_epochs=3",
                         "train.batch_size=32", "model.mos.dim=8", "model.mos.num_heads=1", f"train.out_dir={folder}")
    assert code == 0, err
    record = json.loads((folder / "results.jsonl").read_text().splitlines()[-1])
    return folder, log, record


def read_scores(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def test_scores_of_the_test_events_reproduce_the_test_auc(trained, tmp_path):
    folder, log, record = trained
    code, out, err = mos("predict", "--checkpoint", str(folder / "checkpoints" / "backbone-seed0.pt"), "--data", log,
                         "--out", str(tmp_path / "scores.csv"))
    assert code == 0, err
    assert "log " in err and "scores written to" in err           # the data report, then the count
    scores = read_scores(tmp_path / "scores.csv")
    loaded = load_log(log, DataConfig())
    assert [int(row["line"]) for row in scores] == sorted(loaded.sample_line.tolist())   # every sample, file order
    assert list(scores[0]) == ["line", "user_id", "item_id", "label", "score"]
    test_lines = set(loaded.sample_line[loaded.sample_split == 2].tolist())
    test = [row for row in scores if int(row["line"]) in test_lines]
    auc = metrics.auc([int(row["label"]) for row in test], [float(row["score"]) for row in test])
    assert record["test"]["auc"] > 0.7 and auc == pytest.approx(record["test"]["auc"], abs=1e-9)


def test_unlabelled_logs_and_unknown_items_are_scored_and_counted(trained, tmp_path):
    folder, _, _ = trained
    rows = [row[:3] for row in log_rows(users=3, events=5, seed=1)] + [["u0", "never-seen", "1700009999"]]
    log = write(tmp_path / "new.csv", rows, HEADER[:3])
    code, out, err = mos("predict", "--checkpoint", str(folder / "checkpoints" / "backbone-seed0.pt"), "--data", log,
                         "--out", "-")
    assert code == 0, err
    assert "refused 1: column 'item_id' names an item the model never saw in training" in err
    assert "labels from nowhere (no label or rating column; scores only)" in err
    scores = list(csv.DictReader(out.splitlines()))
    assert list(scores[0]) == ["line", "user_id", "item_id", "score"]
    assert len(scores) == 3 * 4 and all(0 < float(row["score"]) < 1 for row in scores)


@pytest.mark.parametrize("case, expected", [
    ("missing_checkpoint", "--checkpoint: expected a checkpoint written by `mos train`"),
    ("empty_log", "is empty (0 bytes)"),
    ("bad_override", "data.nonsense"),
    ("out_is_a_folder", "--out: expected a file path that can be written"),
    ("checkpoint_is_a_folder", "expected a checkpoint file, got one that cannot be read (Is a directory)"),
    ("override_changes_the_model", "--set: expected options that build the model the checkpoint holds, got a "
                                   "model whose weights do not fit it ("),
])
def test_predict_errors_are_one_line_and_exit_code_2(trained, tmp_path, case, expected):
    folder, log, _ = trained
    checkpoint = str(folder / "checkpoints" / "backbone-seed0.pt")
    args = ["--checkpoint", checkpoint, "--data", log, "--out", str(tmp_path / "s.csv")]
    if case == "missing_checkpoint":
        args[1] = str(tmp_path / "none.pt")
    elif case == "empty_log":
        (tmp_path / "empty.csv").write_bytes(b"")
        args[3] = str(tmp_path / "empty.csv")
    elif case == "out_is_a_folder":
        args[5] = str(tmp_path)
    elif case == "checkpoint_is_a_folder":
        args[1] = str(tmp_path)
    elif case == "override_changes_the_model":
        args += ["--set", "model.item_id_dim=5"]
    else:
        args += ["--set", "data.nonsense=1"]
    code, out, err = mos("predict", *args)
    assert code == 2 and err.startswith("mos predict: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_predict_creates_the_folder_of_out(trained, tmp_path):
    folder, log, _ = trained
    out = tmp_path / "new" / "deeper" / "scores.csv"
    code, _, err = mos("predict", "--checkpoint", str(folder / "checkpoints" / "backbone-seed0.pt"), "--data", log,
                       "--out", str(out))
    assert code == 0, err
    scores = list(csv.DictReader(out.open()))
    assert scores and all(0 < float(row["score"]) < 1 for row in scores)


@pytest.mark.parametrize("trained_on, scored_on", [("csv", "parquet"), ("parquet", "csv")])
def test_a_model_scores_the_same_events_from_either_file_format(tmp_path, trained_on, scored_on):
    """Numeric ids read as text from a CSV and as integers from Parquet are one canonical id, so
    a model trained on one format scores the same events stored in the other, number for number."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [[str(int(user[1:]) + 100), str(int(item[1:])), time, label] for user, item, time, label in log_rows()]
    paths = {"csv": write(tmp_path / "log.csv", rows)}
    table = pa.table({"user_id": [int(r[0]) for r in rows], "item_id": [int(r[1]) for r in rows],
                      "timestamp": [int(r[2]) for r in rows], "label": [int(r[3]) for r in rows]})
    pq.write_table(table, tmp_path / "log.parquet")
    paths["parquet"] = str(tmp_path / "log.parquet")
    out_dir = tmp_path / "run"
    code, _, err = mos("train", "--data", paths[trained_on], "--quiet", "--set", "models=[backbone]",
                       "train.max_epochs=1", "train.batch_size=32", "model.mos.dim=8", "model.mos.num_heads=1",
                       f"train.out_dir={out_dir}")
    assert code == 0, err
    checkpoint = str(out_dir / "checkpoints" / "backbone-seed0.pt")
    scores = {}
    for kind in ("csv", "parquet"):
        code, _, err = mos("predict", "--checkpoint", checkpoint, "--data", paths[kind], "--out",
                           str(tmp_path / f"{kind}.csv"))
        assert code == 0, err
        assert "never saw" not in err
        scores[kind] = read_scores(tmp_path / f"{kind}.csv")
    assert len(scores["csv"]) == len(scores[scored_on]) > 0
    # "line" is the file's line for a CSV (after its header) and the row number for Parquet.
    assert [int(row.pop("line")) for row in scores["csv"]] == [int(row.pop("line")) + 1 for row in scores["parquet"]]
    assert scores["csv"] == scores["parquet"]
