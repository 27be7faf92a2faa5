"""Checkpoints: atomic writes, damaged files refused, and resuming a stopped job gives the same
records and parameters (bitwise, on the CPU) as a job that never stopped."""
import json
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from mos.lab import checkpoint, files, train
from mos.lab.data.config import DataConfig
from mos.config import MoSConfig
from mos.lab.config import ModelConfig, RunConfig, TrainConfig
from mos.lab.data.config import SyntheticConfig

# Fields of a run record that measure the clock, not the computation.
TIMING = ("epoch_seconds", "seconds_per_epoch")


def tiny_config(out_dir, **train_fields) -> RunConfig:
    data = DataConfig(synthetic=SyntheticConfig(num_users=60, num_items=60, num_interests=4, interests_per_user=(2, 3),
                                                sessions_per_user=(3, 5), session_length=(2, 4), targets_per_user=4))
    model = ModelConfig(mos=MoSConfig(dim=16, num_heads=2, num_themes=4, session_mode="gap"), mlp_hidden=(16,))
    fields = dict(batch_size=32, max_epochs=3, patience=3, seeds=(0,), progress="none", quiet=True,
                  out_dir=str(out_dir))
    fields.update(train_fields)
    return RunConfig(models=("backbone", "mos"), data=data, model=model, train=TrainConfig(**fields))


def comparable(record: dict) -> dict:
    return {name: value for name, value in record.items() if name not in TIMING + ("config",)}


def results(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


class Stop(Exception):
    """A crash in the middle of training."""


def stop_at_step(monkeypatch, step: int) -> None:
    """Make the `step`-th training step of the job (counting every run) crash before it runs."""
    real_step, taken = train._train_step, []

    def step_or_crash(*args):
        taken.append(1)
        if len(taken) == step:
            raise Stop
        return real_step(*args)

    monkeypatch.setattr(train, "_train_step", step_or_crash)


def test_save_and_load_round_trip(tmp_path):
    state = {"model": {"w": torch.randn(3, 2)}, "step": 7, "curve": [0.5, float("nan")], "best": None,
             "rng": torch.get_rng_state(), "python": (3, tuple(range(5)), None)}
    path = tmp_path / "run.pt"
    checkpoint.save(path, state)
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 7
    assert loaded["python"] == state["python"] and loaded["best"] is None
    assert checkpoint.load(tmp_path / "absent.pt") is None
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]          # no temporary file left


@pytest.mark.parametrize("keep", [0, 5, 30, -1])
def test_a_file_cut_short_is_refused(tmp_path, keep):
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"w": torch.randn(50)})
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(checkpoint.CheckpointError, match="run.pt"):
        checkpoint.load(path)


def test_a_damaged_or_foreign_file_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"w": torch.zeros(50)})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256 does not match"):
        checkpoint.load(path)
    torch.save({"w": torch.zeros(3)}, path)      # a plain torch file is not a checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="expected a file written by mos.lab.checkpoint.save"):
        checkpoint.load(path)


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    checkpoint.save(path, {"epoch": 1})

    def crash(source, target):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(path) == {"epoch": 1}       # the half-done write is never read
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def _save_many(path, value, count):
    for step in range(count):
        checkpoint.save(path, {"writer": value, "step": step, "w": torch.full((2000,), float(value))})


def test_concurrent_saves_into_one_path_never_fail(tmp_path):
    """Two jobs checkpointing into one out_dir (two `mos train`, or runs of a profile ending
    together) each write a temporary file of their own: neither fails on the rename, and the
    file left is one whole checkpoint, the last writer's."""
    import multiprocessing

    path = tmp_path / "checkpoints" / "mos-seed0.pt"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_save_many, args=(path, value, 30)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    saved = checkpoint.load(path)
    assert saved["step"] == 29 and torch.equal(saved["w"], torch.full((2000,), float(saved["writer"])))
    assert [p.name for p in path.parent.iterdir()] == ["mos-seed0.pt"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The job run straight through, and the number of training steps per epoch."""
    out_dir = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(out_dir, checkpoint_every=3)
    steps = train.load_data(cfg).splits[0].num_batches(cfg.train.batch_size)
    return train.run(cfg), out_dir, steps


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-epoch", "after an epoch", "in the first run"])
def test_resuming_a_stopped_job_equals_an_uninterrupted_one(tmp_path, monkeypatch, uninterrupted, where):
    expected, expected_dir, steps = uninterrupted
    every = {"mid-epoch": 3, "after an epoch": 0, "in the first run": 2}[where]
    # The backbone takes 3 epochs of `steps` steps first; then MoS.
    stop = {"mid-epoch": 3 * steps + steps + 5,       # MoS epoch 2, step 5: steps 4 and 5 are redone
            "after an epoch": 3 * steps + steps + 1,  # MoS epoch 2, first step: resume from epoch 1's end
            "in the first run": steps + 3}[where]    # backbone epoch 2, step 3
    cfg = tiny_config(tmp_path, checkpoint_every=every)
    with monkeypatch.context() as patch:
        stop_at_step(patch, stop)
        with pytest.raises(Stop):
            train.run(cfg)
    resumed = train.run(replace(cfg, train=replace(cfg.train, resume=True)))

    assert [comparable(r) for r in resumed] == [comparable(r) for r in expected]
    digests = [r["parameter_digests"] for r in resumed]
    assert digests == [r["parameter_digests"] for r in expected] and digests[0] != digests[1]
    # Every run is in results.jsonl exactly once, whether it finished before or after the stop.
    assert [comparable(r) for r in results(tmp_path)] == [comparable(r) for r in results(expected_dir)]


@pytest.mark.slow
def test_a_job_killed_at_random_writes_resumes_to_the_same_records(tmp_path_factory, uninterrupted):
    """Fault injection: the job dies at randomly drawn points, inside a file write (a
    checkpoint's or a prediction file's rename) or at a results append; rerun with --resume, it
    ends with the records of a job never stopped: every run once in results.jsonl, none lost,
    none doubled, and only whole files on disk."""
    import random

    expected, expected_dir, _ = uninterrupted
    real_replace, real_append = files.os.replace, train.append_line
    calls = {"write": 0, "append": 0}

    def counting(kind, real):
        def call(*args):
            calls[kind] += 1
            return real(*args)
        return call

    with pytest.MonkeyPatch.context() as patch:       # how many writes and appends an uninterrupted job makes
        patch.setattr(files.os, "replace", counting("write", real_replace))
        patch.setattr(train, "append_line", counting("append", real_append))
        train.run(tiny_config(tmp_path_factory.mktemp("count"), checkpoint_every=3))
    rng = random.Random(0)
    points = [("write", rng.randint(1, calls["write"])) for _ in range(3)] + [("append", 1), ("append", 2)]
    for kind, at in points:
        out_dir = tmp_path_factory.mktemp(f"killed-{kind}-{at}")
        cfg = tiny_config(out_dir, checkpoint_every=3)
        seen = []

        def die_at(*args, real=real_replace if kind == "write" else real_append):
            seen.append(1)
            if len(seen) == at:
                raise Stop
            return real(*args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(*((files.os, "replace") if kind == "write" else (train, "append_line")), die_at)
            with pytest.raises(Stop):
                train.run(cfg)
        resumed = train.run(replace(cfg, train=replace(cfg.train, resume=True)))
        assert [comparable(r) for r in resumed] == [comparable(r) for r in expected], (kind, at)
        assert [comparable(r) for r in results(out_dir)] == [comparable(r) for r in results(expected_dir)], (kind, at)
        leftovers = [p.name for p in out_dir.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, (kind, at, leftovers)


@pytest.mark.slow
def test_resuming_a_finished_job_trains_nothing(tmp_path, monkeypatch, uninterrupted, capsys):
    expected, expected_dir, _ = uninterrupted
    cfg = replace(tiny_config(expected_dir), train=replace(tiny_config(expected_dir).train, resume=True))
    lines_before = (expected_dir / "results.jsonl").read_text()
    stop_at_step(monkeypatch, 1)
    records = train.run(cfg)
    assert [comparable(r) for r in records] == [comparable(r) for r in expected]
    assert (expected_dir / "results.jsonl").read_text() == lines_before
    assert capsys.readouterr().out.count("finished before") == 2


def test_resume_refuses_a_changed_configuration_or_a_damaged_file(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, max_epochs=1, checkpoint_every=1)
    monkeypatch.setattr(train, "CTRModel", _Tiny)
    train.run(replace(cfg, models=("backbone",)))
    path = tmp_path / "checkpoints" / "backbone-seed0.pt"
    changed = replace(cfg, models=("backbone",), train=replace(cfg.train, lr=0.01, resume=True, quiet=False))
    with pytest.raises(ValueError, match=r"train.resume: .*backbone-seed0.pt was written with another configuration "
                                         r"\(train.lr: 0.003 -> 0.01\)"):
        train.run(changed)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError, match="cut short"):
        train.run(replace(changed, train=replace(changed.train, lr=cfg.train.lr)))


def test_resume_with_a_changed_option_is_one_error_line_from_the_command_line(tmp_path, capsys):
    """Like every other refusal of the command line: one `error:` line and exit code 2."""
    from mos.lab.cli import main
    from mos.lab.config_io import dump_yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(replace(tiny_config(tmp_path, max_epochs=1), models=("backbone",))))
    assert main(["train", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--resume", "--set", "train.lr=0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mos train: error: train.resume: ") and "train.lr: 0.003 -> 0.01" in err[0]


def test_a_checkpoint_of_an_earlier_config_layout_resumes(tmp_path, monkeypatch, capsys):
    """A checkpoint keeps the configuration tree it was written with; keys that moved since are
    compared at their new place, so the same run resumes (here: is found finished)."""
    from mos.lab.moved_options import drop_later_options
    cfg = tiny_config(tmp_path, max_epochs=1)
    monkeypatch.setattr(train, "CTRModel", _Tiny)
    train.run(replace(cfg, models=("backbone",)))
    path = tmp_path / "checkpoints" / "backbone-seed0.pt"
    saved = checkpoint.load(path)
    data, model = saved["config"]["data"], saved["config"]["model"]
    data.update(data.pop("synthetic"), **data.pop("logs"))
    for added in ("category_group", "taste_drift", "label_taste_from", "label_item"):   # newer than that layout
        del data[added]
    drop_later_options(saved["config"])                                                 # newer still
    # The earliest layout: the ablation options among the layer's (model.mos).
    model["mos"].update(model.pop("ablation"), extras_detach_inputs=model["mos"].pop("extras_detach_inputs"))
    checkpoint.save(path, saved)
    train.run(replace(cfg, models=("backbone",), train=replace(cfg.train, resume=True)))
    assert "finished before" in capsys.readouterr().out


class _Tiny(torch.nn.Module):
    """A CTR model of one logit per target item: enough to write checkpoints quickly."""

    def __init__(self, config, num_items, num_categories):
        super().__init__()
        self.logit = torch.nn.Embedding(num_items, 1)

    def forward(self, batch):
        logits = self.logit(batch.target_item).squeeze(1)
        return SimpleNamespace(logits=logits, aux_loss=logits.new_zeros(()), aux={}, routing=None, candidates=None)


def test_checkpoint_files_hold_no_partial_write(tmp_path):
    """After a job, only whole checkpoints are left: no temporary file."""
    cfg = tiny_config(tmp_path, max_epochs=1, checkpoint_every=2)
    train.run(replace(cfg, models=("backbone",)))
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["backbone-seed0.pt"]
    assert checkpoint.load(tmp_path / "checkpoints" / names[0])["record"]["epochs"] == 1
