"""More than one process: each rank's share of the batches, and a real two-process CPU run under
torchrun whose ranks end with identical parameters and whose loss goes down."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mos.lab import distributed
from mos.lab.data.config import DataConfig
from mos.lab.data.logs import load_log


def group(rank, world):
    return distributed.Group(rank=rank, world_size=world, device=torch.device("cpu"))


@pytest.mark.parametrize("num_batches", [1, 2, 5, 6, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_takes_the_same_steps_and_together_they_cover_the_epoch(num_batches, world):
    shares = [list(distributed.rank_batches(iter(range(num_batches)), num_batches, group(rank, world)))
              for rank in range(world)]
    steps = distributed.steps_per_epoch(num_batches, group(0, world))
    assert all(len(share) == steps for share in shares)
    # Step s of rank r is global batch s * world + r, wrapping around to the epoch's first batches.
    assert [[shares[r][s] for r in range(world)] for s in range(steps)] == \
        [[(s * world + r) % num_batches for r in range(world)] for s in range(steps)]
    assert sorted({b for share in shares for b in share}) == list(range(num_batches))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_resumed_epoch_skips_the_steps_already_taken(world):
    for rank in range(world):
        full = list(distributed.rank_batches(iter(range(7)), 7, group(rank, world)))
        assert list(distributed.rank_batches(iter(range(7)), 7, group(rank, world), start=2)) == full[2:]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_takes_each_batch_once(world):
    shares = [list(distributed.rank_batches(iter(range(7)), 7, group(rank, world), wrap_around=False))
              for rank in range(world)]
    assert sorted(b for share in shares for b in share) == list(range(7))
    assert shares[0] == list(range(0, 7, world))


def test_a_world_of_one_passes_through():
    alone = distributed.setup("cpu")
    model = torch.nn.Linear(2, 2)
    assert not alone.distributed and alone.is_main
    assert distributed.wrap(model, alone) is model
    assert distributed.gather(alone, {"x": 1}) == [{"x": 1}]
    assert len(distributed.parameter_digests(alone, model)) == 1


def write_log(path: Path) -> None:
    """40 users x 25 events; an item is clicked when its id is a multiple of 3, so the loss can fall."""
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["user_id", "item_id", "timestamp", "label", "category"])
        for user in range(40):
            time = 1_700_000_000 + int(rng.integers(0, 10**6))
            for _ in range(25):
                item = int(rng.integers(1, 40))
                time += int(rng.choice([60, 7200]))
                writer.writerow([f"u{user}", f"i{item}", time, int(item % 3 == 0), f"c{item % 4}"])


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    log = tmp_path / "log.csv"
    write_log(log)
    out_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mos", "train", "--data", str(log), "--set", "models=[backbone,mos]", "train.seeds=[0]",
               "train.max_epochs=3", "train.patience=3", "train.batch_size=32", "train.threads=1",
               "train.checkpoint_every=4", "model.mos.dim=16", "model.mos.session_mode=gap", f"train.out_dir={out_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    test_examples = len(load_log(log, DataConfig()).splits[2])
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["backbone", "mos"]      # rank 0 alone wrote them
    for record in records:
        assert record["processes"] == 2
        digests = record["parameter_digests"]
        assert len(digests) == 2 and digests[0] == digests[1]
        assert record["train_bce"][-1] < record["train_bce"][0], record["train_bce"]
        # Metrics over the predictions of both ranks: the whole test split, not half of it.
        assert record["test"]["examples"] == test_examples
    # Only rank 0 prints: one table, one statistics block, one line per epoch.
    assert done.stdout.count("| backbone |") == 1 and done.stdout.count("sessions/user") == 1
    assert done.stderr.count("backbone seed 0 epoch 1/3") == 1
    assert sorted(os.listdir(out_dir / "checkpoints")) == ["backbone-seed0.pt", "mos-seed0.pt"]
