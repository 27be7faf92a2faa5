"""MovieLens-100k: the fetch checks what it downloads and caches atomically (tested offline with a
stand-in pip); the real data (skipped when it cannot be fetched) loads as documented and trains."""
import hashlib
import subprocess
import zipfile

import pytest
import torch

from mos.lab import train
from mos.lab.data.config import DataConfig
from mos.config import MoSConfig
from mos.lab.config import ModelConfig, RunConfig, TrainConfig
from mos.lab.data import movielens


@pytest.fixture(scope="module")
def ml100k():
    """The real data, from the cache or fetched once; skipped (with the reason) when unavailable."""
    try:
        return movielens.load(DataConfig(source="movielens"))
    except movielens.MovieLensUnavailable as err:
        pytest.skip(f"MovieLens-100k cannot be fetched here (needs PyPI): {err}")


def fake_pip(wheel_bytes: bytes):
    """A stand-in for `pip download` that writes `wheel_bytes` as the wheel (None: pip fails)."""

    def run(command, **kwargs):
        if wheel_bytes is None:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for recbole==1.2.1")
        target = command[command.index("-d") + 1]
        with open(f"{target}/{movielens.WHEEL_FILE}", "wb") as stream:
            stream.write(wheel_bytes)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_no_network_is_a_clear_error_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(movielens.subprocess, "run", fake_pip(None))
    with pytest.raises(movielens.MovieLensUnavailable, match="pip download recbole==1.2.1` failed .*No matching"):
        movielens.fetch()
    assert not movielens.log_path().exists()


def test_no_network_from_the_command_line_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    from mos.lab.cli import main
    monkeypatch.setenv("MOS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(movielens.subprocess, "run", fake_pip(None))
    code = main(["train", "--data", "movielens", "--set", f"train.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mos train: error: MovieLens-100k is unavailable: "), err
    assert len(err.strip().splitlines()) == 1


def test_a_wheel_with_another_digest_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(movielens.subprocess, "run", fake_pip(b"not the recbole wheel"))
    with pytest.raises(movielens.MovieLensUnavailable, match=f"expected sha256 {movielens.WHEEL_SHA256}, got "):
        movielens.fetch()
    assert list(tmp_path.rglob("*.tsv*")) == []


def test_the_cache_is_the_ratings_joined_with_genres(tmp_path, monkeypatch):
    """A small wheel with RecBole's file layout, its digest accepted: the cached log is complete."""
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(movielens._RATINGS, "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                             "196\t242\t3\t881250949\n22\t377\t5\t878887116.0\n")
        archive.writestr(movielens._MOVIES, "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                            "242\tKolya\t1996\tComedy\n377\tHeavyweights\t1994\tChildren's Comedy\n")
    data = wheel.read_bytes()
    monkeypatch.setenv("MOS_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(movielens.subprocess, "run", fake_pip(data))
    monkeypatch.setattr(movielens, "WHEEL_SHA256", hashlib.sha256(data).hexdigest())
    path = movielens.fetch()
    assert path == tmp_path / "cache" / "ml-100k" / "ml-100k.tsv"
    assert path.read_text().splitlines() == ["user_id\titem_id\trating\ttimestamp\tcategory",
                                             "196\t242\t3\t881250949\tComedy",
                                             "22\t377\t5\t878887116\tChildren's|Comedy"]
    assert [p.name for p in path.parent.iterdir()] == ["ml-100k.tsv"]    # no temporary file left
    monkeypatch.setattr(movielens.subprocess, "run", fake_pip(None))
    assert movielens.fetch() == path                                     # cached: no second download


def test_movielens_100k_as_documented(ml100k):
    report, ds = ml100k.report, ml100k.dataset
    assert (report.rows, report.used, report.users, report.items) == (100_000, 100_000, 943, 1682)
    assert report.has_timestamps and report.label_source == "'rating' >= 4"
    # Every rating but each user's first is a sample; 55 % of ratings are 4 or 5.
    assert report.samples == 100_000 - 943 and report.positive_rate == pytest.approx(0.5536, abs=1e-3)
    train_set, valid_set, test_set = ml100k.splits
    assert len(train_set) + len(valid_set) + len(test_set) == len(ds)
    # Split by time: for every user, the test samples come after the validation ones.
    for user in range(0, 943, 97):
        valid_end = valid_set.hist_end[valid_set.sample_user == user]
        test_end = test_set.hist_end[test_set.sample_user == user]
        if len(valid_end) and len(test_end):
            assert valid_end.max() < test_end.min()


@pytest.mark.slow
def test_one_epoch_on_a_subset_trains(ml100k, tmp_path):
    """MoS, one epoch on the first 10 users' samples, the newest 30 events of each history."""
    keep = [split.subset(split.sample_user < 10) for split in ml100k.splits]
    cfg = RunConfig(models=("mos",), data=DataConfig(source="movielens", max_history=30),
                    model=ModelConfig(mos=MoSConfig(dim=16, num_heads=2, num_themes=4, session_mode="gap")),
                    train=TrainConfig(batch_size=128, max_epochs=1, progress="none", quiet=True, out_dir=str(tmp_path)))
    record = train.train_one(cfg, "mos", 0, keep, progress="none")
    assert record["epochs"] == 1 and torch.isfinite(torch.tensor(record["train_bce"])).all()
    assert 0.0 < record["test"]["auc"] < 1.0 and record["test"]["examples"] == len(keep[2])
    assert sum(record["test"]["theme_tokens"]) <= 30 * len(keep[2])     # histories cut to 30 events
