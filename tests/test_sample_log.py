"""The sample interaction log shipped with the lab: what tools/make_sample_log.py writes, small,
named by `--data sample`, and read as a consumed-events log with sampled negatives."""
from pathlib import Path

from mos.lab.config_io import load_run_config
from mos.lab.data import logs
from mos.lab.data.config import SAMPLE_LOG, DataConfig
from tools.make_sample_log import SAMPLE_USERS, sample_log_text


def test_the_shipped_file_is_what_the_tool_writes():
    assert SAMPLE_LOG.read_text() == sample_log_text()
    assert SAMPLE_LOG.stat().st_size < 400_000, "a few hundred KB at most: it ships in every wheel"
    lines = SAMPLE_LOG.read_text().splitlines()
    assert all(a != b for a, b in zip(lines, lines[1:])), "a repeated row: the loader would warn a newcomer"


def test_data_sample_names_the_shipped_file():
    """By name in the config (a run's record does not depend on where the package lives), by path
    where the log is read."""
    cfg = load_run_config(None, ["data.source=sample"])
    assert cfg.data.source == "sample" and Path(cfg.data.log_path) == SAMPLE_LOG
    assert DataConfig(source="synthetic").log_path == "synthetic"


def test_it_reads_as_events_with_sampled_negatives():
    cfg = DataConfig(source="sample")
    log = logs.load_log(cfg.log_path, cfg)
    rows = SAMPLE_LOG.read_text().count("\n") - 1
    users = {line.split(",", 1)[0] for line in SAMPLE_LOG.read_text().splitlines()[1:]}
    assert len(users) == SAMPLE_USERS and rows > 10_000
    labels = log.dataset.label
    # Every event after a user's first is a positive sample with one sampled negative.
    assert int(labels.sum()) == rows - SAMPLE_USERS
    assert labels.numel() == 2 * int(labels.sum())
