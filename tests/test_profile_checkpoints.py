"""A profile run stopped part-way (a killed job, a deadline, the end of a session) keeps its last
epoch in `<out_dir>/checkpoints/` and continues from it when the profile is rerun, to the record of
a run never stopped; what it must not resume, it says and starts over."""
import csv

import numpy as np
import pytest

from mos.lab.cli import main
from test_profile import MODELS, _quick, _records


def _one_model(folder, model="mos", *extra):
    out = _quick(folder, "train.max_epochs=3", "train.patience=3", *extra)
    out[out.index(MODELS)] = f"models=[{model}]"
    return out + ["--no-tuning"]


def _counting_steps(patch):
    """Count the training steps taken from here on."""
    from mos.lab import train
    real_step, taken = train._train_step, []
    patch.setattr(train, "_train_step", lambda *a: taken.append(1) or real_step(*a))
    return taken


@pytest.mark.slow
def test_a_run_stopped_mid_way_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """A profile stopped inside a run keeps that run's last finished epoch: rerun, it continues
    from there to the record, predictions and weights of a run never stopped, and deletes the
    checkpoint (a results folder holds finished runs only)."""
    from test_checkpoint import Stop, comparable, stop_at_step

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    with monkeypatch.context() as patch:           # the run never stopped, counting its steps
        taken = _counting_steps(patch)
        assert main(_one_model(straight)) == 0
    (run_id, expected), = _records(straight).items()
    assert expected["epochs"] == 3 and len(taken) % 3 == 0
    with monkeypatch.context() as patch:
        stop_at_step(patch, 2 * len(taken) // 3 + 2)       # epoch 3, its second step
        with pytest.raises(Stop):
            main(_one_model(stopped))
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"{run_id}.pt"]
    assert not (stopped / "runs").exists() or not list((stopped / "runs").glob("*.json"))
    capsys.readouterr()
    assert main(_one_model(stopped)) == 0
    assert "resuming after epoch 2 from" in capsys.readouterr().err
    assert comparable(_records(stopped)[run_id]) == comparable(expected)
    with np.load(straight / "runs" / f"{run_id}.npz") as x, np.load(stopped / "runs" / f"{run_id}.npz") as y:
        assert x.files == y.files and all(np.array_equal(x[name], y[name]) for name in x.files)
    epochs = [list(csv.DictReader(open(folder / "runs" / f"{run_id}.epochs.csv"))) for folder in (straight, stopped)]
    assert [[{k: v for k, v in row.items() if k != "seconds"} for row in rows] for rows in epochs] == \
        [[{k: v for k, v in row.items() if k != "seconds"} for row in epochs[0]]] * 2 and len(epochs[0]) == 3
    assert not list((stopped / "checkpoints").iterdir()) and not list((straight / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_checkpoint_is_not_resumed_across_an_option_change_nor_kept_after_its_record(tmp_path, monkeypatch,
                                                                                        capsys):
    """A backbone run's fingerprint leaves out MoS's options, its checkpoint's configuration does
    not: after such a change the rerun says it starts over (not an error). Stopped after the
    run's last save but before its record: the saved record is written, nothing retrained. A
    checkpoint left beside a finished record is deleted."""
    from mos.lab.profiling import runs
    from test_checkpoint import Stop, comparable, stop_at_step

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    with monkeypatch.context() as patch:
        taken = _counting_steps(patch)
        assert main(_one_model(straight, "backbone")) == 0
    (run_id, expected), = _records(straight).items()
    with monkeypatch.context() as patch:
        stop_at_step(patch, len(taken) // expected["epochs"] + 2)        # epoch 2, its second step
        with pytest.raises(Stop):
            main(_one_model(stopped, "backbone"))
    capsys.readouterr()
    assert main(_one_model(stopped, "backbone", "model.mos.num_themes=6")) == 0
    assert "not resuming (train.resume:" in capsys.readouterr().err
    assert comparable(_records(stopped)[run_id]) == comparable(expected)

    (stopped / "runs" / f"{run_id}.json").unlink()          # as if stopped before writing it ...
    checkpoint = stopped / "checkpoints" / f"{run_id}.pt"
    with monkeypatch.context() as patch:
        patch.setattr(runs, "write_atomic", lambda *a: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            main(_one_model(stopped, "backbone"))
    assert checkpoint.exists()
    with monkeypatch.context() as patch:
        taken = _counting_steps(patch)
        assert main(_one_model(stopped, "backbone")) == 0
    assert not taken and not checkpoint.exists()
    assert comparable(_records(stopped)[run_id]) == comparable(expected)

    checkpoint.write_bytes(b"left by a job stopped before deleting it")
    assert main(_one_model(stopped, "backbone")) == 0 and not checkpoint.exists()


def test_a_writer_s_debris_is_cleared_before_its_run_is_trained_again(tmp_path):
    """A job killed while writing a run's files leaves hidden temporary files (mos.lab.files);
    the rerun of that run deletes them, and leaves another run's alone."""
    from mos.lab.config_io import load_run_config
    from mos.lab.profiling.runs import Job, RunStore, job_config

    cfg = load_run_config("configs/default.yaml", [])
    store = RunStore(tmp_path)
    store.folder.mkdir()
    retrained, other = Job("mos", 0), Job("backbone", 0)
    debris = []
    for job in (retrained, other):
        record, predictions, _ = store.paths(job_config(cfg, job), job)
        debris += [store.folder / f".{predictions.name}.x1y2z3.tmp", store.folder / f".{record.name}.a4b5c6.tmp"]
    for path in debris:
        path.write_text("part of a file")
    store.clear_debris(job_config(cfg, retrained), retrained)
    assert [path.exists() for path in debris] == [False, False, True, True]


@pytest.mark.parametrize("content", [b"[]", b'{"fingerprint": "x"}', b'{"record": ', b"\xff\xfe{}"],
                         ids=["a_list", "no_record", "truncated", "not_utf8"])
def test_a_damaged_run_record_counts_as_not_finished_and_is_named(tmp_path, capsys, content):
    """Records are written whole; one damaged by a copy or a disk is named and trained again,
    not a traceback from inside the report."""
    from mos.lab.config_io import load_run_config
    from mos.lab.profiling.runs import Job, RunStore, job_config

    cfg = load_run_config("configs/default.yaml", [])
    store = RunStore(tmp_path)
    store.folder.mkdir()
    job = Job("mos", 0)
    record, predictions, _ = store.paths(job_config(cfg, job), job)
    record.write_bytes(content)
    predictions.write_bytes(b"")
    assert store.read(job_config(cfg, job), job) is None
    assert f"{record}: unreadable (" in capsys.readouterr().err


@pytest.mark.parametrize("damage, named", [
    (lambda r: r.pop("best_epoch"), "no 'best_epoch' field"),
    (lambda r: r["test"].pop("auc"), "no 'test.auc' field"),
    (lambda r: r.update(seed="0"), "'seed': expected an integer, got str"),
    (lambda r: r.update(valid=[0.7]), "'valid': expected an object, got list"),
    (lambda r: r["config"]["train"].update(max_epochs=True), "'config.train.max_epochs': expected an integer, got bool"),
], ids=["missing", "missing_nested", "wrong_type", "not_an_object", "bool_for_int"])
def test_a_record_lacking_a_field_the_report_reads_is_named(tmp_path, capsys, damage, named):
    """A record of this run (its fingerprint matches) cut or edited by hand is named with the field
    and trained again, not a KeyError from inside the report; the undamaged one reads back."""
    import json

    from mos.lab.config_io import load_run_config
    from mos.lab.profiling.runs import Job, RunStore, job_config

    cfg = load_run_config("configs/default.yaml", [])
    store = RunStore(tmp_path)
    store.folder.mkdir()
    job = Job("mos", 0)
    record_path, predictions, digest = store.paths(job_config(cfg, job), job)
    predictions.write_bytes(b"")
    record = {"model": "mos", "seed": 0, "run_id": "mos-x", "epochs": 3, "best_epoch": 2, "seconds_per_epoch": 1.5,
              "params": 10, "flops_by_length": [], "parameter_digests": [], "valid": {"auc": 0.7},
              "test": {"auc": 0.7}, "flops": {"forward_per_example": 1, "training_per_example": 3.0,
                                               "forward_by_module": {}}, "config": {"train": {"max_epochs": 3}}}
    record_path.write_text(json.dumps({"fingerprint": digest, "record": record}))
    assert store.read(job_config(cfg, job), job) == record
    damage(record)
    record_path.write_text(json.dumps({"fingerprint": digest, "record": record}))
    assert store.read(job_config(cfg, job), job) is None
    assert f"{record_path}: unreadable ({named}); the run counts as not finished" in capsys.readouterr().err


def test_damaged_saved_predictions_are_named(tmp_path):
    """A truncated .npz, or one holding NaN logits, stops the report naming the file."""
    import numpy as np

    from mos.lab.errors import InputError
    from mos.lab.profiling.runs import RunStore
    from mos.lab.profiling.study import _split_predictions

    store = RunStore(tmp_path)
    store.folder.mkdir()
    arrays = {"test_labels": np.ones(3), "test_users": np.arange(3), "test_logits": np.array([0.1, np.nan, 0.2])}
    np.savez(store.folder / "nan.npz", **arrays)
    with pytest.raises(InputError, match=r"nan.npz: expected finite test logits, got NaN or inf"):
        _split_predictions([{"run_id": "nan"}], store, "test")
    whole = (store.folder / "nan.npz").read_bytes()
    (store.folder / "cut.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(InputError, match=r"cut.npz: expected the run's saved predictions, got an unreadable file"):
        _split_predictions([{"run_id": "cut"}], store, "test")
