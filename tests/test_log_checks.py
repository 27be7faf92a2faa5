"""A log's file is checked before its rows are read (one line and exit code 2 from the command
line), and input that loads but is probably wrong is warned about in the data report."""
import csv
import json
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from mos.lab.data.config import DataConfig, LogConfig, SyntheticConfig
from mos.lab.data.logs import load_log
from mos.lab.errors import InputError

HEADER = ["user_id", "item_id", "timestamp", "label"]


def rows(users=3, events=6, start=1_700_000_000, step=60):
    """`events` per user, one minute apart, labels alternating."""
    return [[f"u{u}", f"i{(u + e) % 5}", str(start + step * e), str(e % 2)] for u in range(users) for e in range(events)]


def write(path, body, header=HEADER, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(body)
    return path


def cli(*args, env_drop=()):
    """`python -m mos ...` in a subprocess: (exit code, stdout, stderr)."""
    env = {name: value for name, value in os.environ.items() if name not in env_drop}
    done = subprocess.run([sys.executable, "-m", "mos", *args], capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "log.csv").write_bytes(b"")
    with pytest.raises(InputError, match=r"data.source: .*log.csv is empty \(0 bytes\); expected a header line"):
        load_log(tmp_path / "log.csv", DataConfig())
    (tmp_path / "blank.csv").write_text("\n\n")
    with pytest.raises(InputError, match="has no header on line 1"):
        load_log(tmp_path / "blank.csv", DataConfig())


def test_binary_files_under_a_text_name_and_the_reverse_are_named(tmp_path):
    pytest.importorskip("pyarrow", reason="writing a Parquet file needs pyarrow (requirements/ci.txt installs it)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["x"]}), tmp_path / "log.csv")
    with pytest.raises(InputError, match=r"log.csv is named .csv but is a Parquet file \(it starts with b'PAR1'\); "
                                         r"rename it to log.parquet"):
        load_log(tmp_path / "log.csv", DataConfig())
    with gzip.open(tmp_path / "zipped.tsv", "wt") as stream:
        stream.write("user_id\titem_id\n")
    with pytest.raises(InputError, match="named .tsv but is gzip-compressed .*decompress"):
        load_log(tmp_path / "zipped.tsv", DataConfig())
    write(tmp_path / "text.parquet", rows())
    with pytest.raises(InputError, match=r"text.parquet is named .parquet but is bytes b'user', not the Parquet magic"):
        load_log(tmp_path / "text.parquet", DataConfig())


def test_a_byte_order_mark_is_stripped_and_other_encodings_are_named(tmp_path):
    plain = load_log(write(tmp_path / "plain.csv", rows()), DataConfig())
    text = (tmp_path / "plain.csv").read_bytes()
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text)
    marked = load_log(tmp_path / "bom.csv", DataConfig())
    assert marked.report.users == plain.report.users == 3 and len(marked.dataset) == len(plain.dataset)
    (tmp_path / "latin.csv").write_bytes(text.replace(b"u1", b"\xe91"))
    with pytest.raises(InputError, match=r"latin.csv is not UTF-8 text \(byte 0xe9 near line \d+\)"):
        load_log(tmp_path / "latin.csv", DataConfig())


def test_a_header_read_as_one_column_names_the_delimiter(tmp_path):
    write(tmp_path / "log.csv", rows(), delimiter="\t")
    with pytest.raises(InputError, match=r"data.logs.user_column: .*\(one column: the header is separated by tabs, not by ','\)"):
        load_log(tmp_path / "log.csv", DataConfig())


def test_milliseconds_and_microseconds_read_as_seconds_are_warned_about(tmp_path):
    seconds = load_log(write(tmp_path / "s.csv", rows()), DataConfig()).report
    assert seconds.warnings == [] and "WARNING" not in seconds.format()
    for unit, factor in (("milliseconds", 1000), ("microseconds", 1_000_000)):
        path = write(tmp_path / f"{unit}.csv", rows(start=1_700_000_000 * factor, step=60 * factor))
        report = load_log(path, DataConfig()).report
        assert len(report.warnings) == 1
        assert f"column 'timestamp' looks like {unit}, not seconds" in report.warnings[0]
        assert f"divide the column by {factor:g}" in report.warnings[0]
        assert "WARNING: column 'timestamp'" in report.format()


def test_exact_duplicate_rows_are_counted_and_optionally_dropped(tmp_path):
    body = rows()
    path = write(tmp_path / "log.csv", body + [body[2], body[2], body[7]])    # lines 20-22 repeat 4 and 9
    kept = load_log(path, DataConfig())
    assert kept.report.warnings == [
        "3 rows repeat an earlier row in every column read ('user_id', 'item_id', 'timestamp', 'label'), e.g. "
        "line 20 = line 4; line 21 = line 4; line 22 = line 9: duplicates are kept and count twice; "
        "data.logs.drop_duplicates=true drops them"]
    assert kept.report.used == 21
    dropped = load_log(path, DataConfig(logs=LogConfig(drop_duplicates=True)))
    reason = "repeats an earlier row in every column read ('user_id', 'item_id', 'timestamp', 'label'; data.logs.drop_duplicates)"
    assert dropped.report.refused[reason] == {"count": 3, "examples": ["line 20: 'same as line 4'",
                                                                     "line 21: 'same as line 4'",
                                                                     "line 22: 'same as line 9'"]}
    assert (dropped.report.rows, dropped.report.used, dropped.report.warnings) == (21, 18, [])
    clean = load_log(write(tmp_path / "clean.csv", body), DataConfig())
    assert np.array_equal(dropped.dataset.item_ids.numpy(), clean.dataset.item_ids.numpy())
    assert len(dropped.dataset) == len(clean.dataset)
    # The same user, item and time with another label is no duplicate.
    other = body + [body[2][:3] + [str(1 - int(body[2][3]))]]
    assert load_log(write(tmp_path / "other.csv", other), DataConfig()).report.warnings == []


@pytest.mark.parametrize("case, expected", [
    ("no_user_column", "data.logs.user_column: expected a column 'user_id' in"),
    ("empty", "is empty (0 bytes)"),
    ("no_sample", "data.logs.min_history: no event of"),
    ("all_positive", "data.source: expected train samples of both classes (labels 0 and 1), got"),
])
def test_data_errors_are_one_line_and_exit_code_2(tmp_path, case, expected):
    path = tmp_path / "log.csv"
    if case == "no_user_column":
        write(path, [["a", "x", "1", "1"]], ["uid", "item_id", "timestamp", "label"])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no_sample":
        write(path, [[f"u{u}", "x", "1", "1"] for u in range(4)])      # one event per user: no history
    else:
        write(path, [row[:3] + ["1"] for row in rows()])
    code, out, err = cli("train", "--data", str(path), "--quiet", "--set", f"train.out_dir={tmp_path / 'out'}")
    assert code == 2, err
    assert err.startswith("mos train: error: ") and expected in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_device_or_backend_this_machine_lacks_stops_before_loading(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from mos.lab.distributed import check_machine

    with pytest.raises(InputError, match="train.device: expected a device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"):
        check_machine("gpu", "auto")
    code, out, err = cli("train", "--set", "train.device=cuda", f"train.out_dir={tmp_path}")
    assert code == 2 and "train.device: expected a device this machine has, got 'cuda'" in err
    assert out == "" and len(err.strip().splitlines()) == 1          # nothing loaded, nothing printed
    code, out, err = cli("profile", "--quick", "--set", "model.mos.backend=triton", f"train.out_dir={tmp_path}",
                         env_drop=("TRITON_INTERPRET",))
    assert code == 2 and "model.mos.backend: 'triton' runs its kernels on a CUDA device" in err and out == ""


def test_a_small_log_with_one_validation_sample_per_user_trains_and_says_gauc_is_undefined(tmp_path):
    # 30 users x 10 events: the newest sample of each user is test, the one before validation.
    rng = np.random.default_rng(0)
    body = [[f"u{u}", f"i{rng.integers(1, 50)}", str(1000 + 100 * e + u), str(int(rng.random() < 0.5))]
            for u in range(30) for e in range(10)]
    path = write(tmp_path / "log.csv", body)
    code, out, err = cli("train", "--data", str(path), "--set", "models=[backbone]", "train.max_epochs=1",
                         f"train.out_dir={tmp_path}")
    assert code == 0, err
    assert "GAUC undefined (30 users skipped: each has one class)" in err
    assert "| undefined (30 users skipped: each has one class) |" in out
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["test"]["gauc"] is None and record["test"]["gauc_users_skipped"] == 30


def test_splits_are_checked_before_training():
    from mos.lab.data.checks import check_splits
    from mos.lab.data.synthetic import generate

    train, valid, test = (generate(SyntheticConfig(num_users=20, num_items=40, num_interests=4)),) * 3
    check_splits((train, valid, test), DataConfig())
    one_class = valid.subset(valid.label == 1)
    with pytest.raises(InputError, match=r"data.valid_fraction: expected validation samples of both classes .*"
                                         r"all labelled 1"):
        check_splits((train, one_class, test), DataConfig())
    with pytest.raises(InputError, match="data.test_fraction: expected a test split with samples, got none"):
        check_splits((train, valid, test.subset(test.label > 1)), DataConfig())
    check_splits((train, valid, one_class), DataConfig())       # a one-class test split: metrics undefined
