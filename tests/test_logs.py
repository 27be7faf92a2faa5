"""The interaction-log loader on small files written here: every column variant, bad rows counted
with examples, labels (column, rating, sampled negatives), histories sliced per sample, and the
split by time."""
import csv
import sys

import numpy as np
import pytest
import torch

from mos.lab.cli import main
from mos.lab.data.config import DataConfig, LogConfig
from mos.lab.data.logs import load_log

HEADER = ["user_id", "item_id", "timestamp", "rating", "category"]
# Two users, written out of time order on purpose; "b" rates items at 100 s steps.
ROWS = [
    ["a", "i1", "300", "5", "drama"],
    ["b", "i2", "100", "2", "comedy"],
    ["a", "i2", "100", "4", "comedy"],
    ["b", "i3", "200", "5", "drama"],
    ["a", "i3", "200", "1", "drama"],
    ["b", "i1", "300", "4", "drama"],
    ["a", "i4", "400", "3", "comedy"],
    ["b", "i4", "400", "5", "comedy"],
]


def write(path, rows, header=HEADER, delimiter=","):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def histories(ds):
    """(user, history item ids, target item, label) of every sample, by a plain loop."""
    out = []
    for i in range(len(ds)):
        user, end = int(ds.sample_user[i]), int(ds.hist_end[i])
        history = ds.item_ids[int(ds.user_offsets[user]):end].tolist()
        out.append((user, history, int(ds.target_item[i]), float(ds.label[i])))
    return out


def test_csv_with_ratings_builds_chronological_histories(tmp_path):
    log = load_log(write(tmp_path / "log.csv", ROWS), DataConfig(valid_fraction=0, test_fraction=0))
    ds, report = log.dataset, log.report
    assert (report.rows, report.used, report.refused) == (8, 8, {})
    assert report.has_timestamps and report.users == 2 and report.items == 4 and report.categories == 2
    # Items are numbered in sorted order: i1..i4 -> 1..4; events are stored once per user, by time.
    assert ds.item_ids.tolist() == [2, 3, 1, 4, 2, 3, 1, 4]
    assert ds.timestamps.tolist() == [100, 200, 300, 400] * 2
    assert ds.user_offsets.tolist() == [0, 4, 8]
    # Each event after the first is a sample whose history is every earlier event; rating >= 4.
    assert histories(ds) == [
        (0, [2], 3, 0.0), (0, [2, 3], 1, 1.0), (0, [2, 3, 1], 4, 0.0),
        (1, [2], 3, 1.0), (1, [2, 3], 1, 1.0), (1, [2, 3, 1], 4, 1.0),
    ]
    # The category is the item's: drama = 2, comedy = 1.
    assert ds.category_ids.tolist() == [1, 2, 2, 1] * 2
    assert ds.target_category.tolist() == [2, 2, 1] * 2
    assert "1 events" not in report.format() and "2 events have fewer than min_history=1" in report.format()


def test_tsv_parquet_and_renamed_columns_load_the_same(tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (requirements/ci.txt installs it)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["uid", "iid", "when", "stars", "genre"]
    cfg = DataConfig(logs=LogConfig(user_column="uid", item_column="iid", time_column="when", rating_column="stars",
                                    category_column="genre"))
    tsv = load_log(write(tmp_path / "log.tsv", ROWS, names, "\t"), cfg)
    # Parquet with native types: integer times, float ratings.
    table = pa.table({"uid": [r[0] for r in ROWS], "iid": [r[1] for r in ROWS],
                      "when": [int(r[2]) for r in ROWS], "stars": [float(r[3]) for r in ROWS],
                      "genre": [r[4] for r in ROWS]})
    pq.write_table(table, tmp_path / "log.parquet")
    parquet = load_log(tmp_path / "log.parquet", cfg)
    reference = load_log(write(tmp_path / "log.csv", ROWS), DataConfig())
    for log in (tsv, parquet):
        assert histories(log.dataset) == histories(reference.dataset)
        assert torch.equal(log.dataset.timestamps, reference.dataset.timestamps)
        assert log.report.refused == {}


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "log.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs the package pyarrow"):
        load_log(tmp_path / "log.parquet", DataConfig())


def test_bad_rows_are_counted_with_examples_and_the_rest_is_used(tmp_path):
    rows = ROWS + [
        ["", "i1", "500", "5", "drama"],              # line 10: empty user id
        ["a", "i2", "yesterday", "5", "comedy"],       # line 11: unparsable time
        ["a", "i3", "600", "5"],                       # line 12: a column short
        ["b", "  ", "700", "5", "drama"],             # line 13: blank item id
        ["b", "i2", "800", "five", "comedy"],          # line 14: rating not a number
        ["a", "i1", "", "4", "drama"],                 # line 15: no time
    ]
    report = load_log(write(tmp_path / "log.csv", rows), DataConfig()).report
    assert (report.rows, report.used) == (14, 8)
    counts = {reason: entry["count"] for reason, entry in report.refused.items()}
    assert counts == {
        "expected 5 fields (as in the header), got another number": 1,
        "no value in column 'user_id'": 1,
        "no value in column 'item_id'": 1,
        "no value in column 'timestamp'": 1,
        "column 'timestamp' is not seconds or an ISO-8601 date": 1,
        "column 'rating' is not a number": 1,
    }
    examples = {reason: entry["examples"] for reason, entry in report.refused.items()}
    assert examples["column 'timestamp' is not seconds or an ISO-8601 date"] == ["line 11: 'yesterday'"]
    assert examples["no value in column 'item_id'"] == ["line 13: (empty)"]
    assert examples["expected 5 fields (as in the header), got another number"] == ["line 12: '4 fields'"]
    text = report.format()
    assert "14 rows, 8 used, 6 refused" in text and "line 14: 'five'" in text


def test_times_too_large_for_int64_differences_are_refused_rows(tmp_path):
    """A time past 2^62 seconds would overflow int64 (a traceback) or wrap a session gap: such rows
    are refused like unparsable times, and the rest is used."""
    rows = ROWS + [["a", "i1", value, "5", "drama"] for value in ("1e30", "9.3e18", "-1e300")]
    report = load_log(write(tmp_path / "log.csv", rows), DataConfig()).report
    assert report.refused["column 'timestamp' is not seconds or an ISO-8601 date"]["count"] == 3
    assert report.used == 8


def test_a_file_with_no_usable_row_stops_with_the_reasons(tmp_path):
    rows = [["", "i1", "1", "5", "x"], ["a", "i1", "soon", "5", "x"]]
    with pytest.raises(ValueError, match=r"no usable row in .*1 no value in column 'user_id'; "
                                         r"1 column 'timestamp' is not seconds"):
        load_log(write(tmp_path / "log.csv", rows), DataConfig())
    with pytest.raises(ValueError, match="no usable row .*no rows"):
        load_log(write(tmp_path / "empty.csv", []), DataConfig())


def test_missing_columns_and_files_are_named(tmp_path):
    path = write(tmp_path / "log.csv", [["a", "1"]], ["user", "item_id"])
    with pytest.raises(ValueError, match=r"data.logs.user_column: expected a column 'user_id' in .*got columns \['user', 'item_id'\]"):
        load_log(path, DataConfig())
    with pytest.raises(ValueError, match="data.logs.label_column: label_source is 'label', so the log needs a column 'label'"):
        load_log(write(tmp_path / "ok.csv", ROWS), DataConfig(logs=LogConfig(label_source="label")))
    with pytest.raises(FileNotFoundError, match="data.source: no such file"):
        load_log(tmp_path / "absent.csv", DataConfig())
    with pytest.raises(ValueError, match=r"data.source: expected 'synthetic', 'movielens', 'sample' or a path to a log ending in "
                                         r"\.csv, \.tsv, \.parquet, got 'log.txt'"):
        DataConfig(source="log.txt")


def test_label_column_iso_dates_and_positive_only_histories(tmp_path):
    header = ["user_id", "item_id", "timestamp", "label"]
    rows = [["u", "x", "2024-01-01T00:00:00", "1"], ["u", "y", "2024-01-01T00:05:00Z", "0"],
            ["u", "z", "2024-01-01 00:10:00+00:00", "1"], ["u", "w", "2024-01-01T00:15:00", "true"],
            ["u", "v", "2024-01-01T00:20:00", "maybe"]]
    path = write(tmp_path / "log.csv", rows, header)
    log = load_log(path, DataConfig(valid_fraction=0, test_fraction=0))
    assert log.report.refused["column 'label' is not 0 or 1"]["examples"] == ["line 6: 'maybe'"]
    assert log.dataset.timestamps.tolist() == [1704067200 + 300 * k for k in range(4)]
    # Items w, x, y, z -> 1, 2, 3, 4. "all": the unclicked y stays in later histories.
    assert histories(log.dataset) == [(0, [2], 3, 0.0), (0, [2, 3], 4, 1.0), (0, [2, 3, 4], 1, 1.0)]
    positive = load_log(path, DataConfig(logs=LogConfig(history="positive"), valid_fraction=0, test_fraction=0))
    assert positive.dataset.item_ids.tolist() == [2, 4, 1]
    assert histories(positive.dataset) == [(0, [2], 3, 0.0), (0, [2], 4, 1.0), (0, [2, 4], 1, 1.0)]


def test_without_timestamps_the_row_order_is_the_time_order(tmp_path):
    rows = [["a", "i3"], ["b", "i1"], ["a", "i1"], ["a", "i2"]]
    log = load_log(write(tmp_path / "log.csv", rows, ["user_id", "item_id"]), DataConfig(logs=LogConfig(negatives=1)))
    assert not log.report.has_timestamps and "row order is the time order" in log.report.format()
    assert log.dataset.item_ids.tolist() == [3, 1, 2, 1]
    assert log.dataset.timestamps.tolist() == [0, 2, 3, 1]
    assert log.report.categories == 1 and log.dataset.num_categories == 2


def test_sampled_negatives_are_seeded_and_never_an_item_seen_by_then(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[f"u{u}", f"i{rng.integers(0, 30)}", str(t), "x"] for u in range(6) for t in range(40)]
    path = write(tmp_path / "log.csv", rows, ["user_id", "item_id", "timestamp", "category"])
    cfg = DataConfig(logs=LogConfig(negatives=3), seed=5)
    log = load_log(path, cfg)
    ds = log.dataset
    assert "3 sampled negative(s) per event" in log.report.format()
    again = load_log(path, cfg).dataset
    assert torch.equal(ds.target_item, again.target_item)
    other = load_log(path, DataConfig(logs=LogConfig(negatives=3), seed=6)).dataset
    assert not torch.equal(ds.target_item, other.target_item)
    negatives = 0
    for user, history, target, label in histories(ds):
        if label == 0:
            negatives += 1
            assert target not in history
    positives = len(ds) - negatives
    assert negatives == 3 * positives and log.report.positive_rate == pytest.approx(0.25)
    # A negative may be an item the user takes later: only the past is excluded.
    assert (ds.label == 1).sum() == 6 * 39


def test_split_by_time_puts_each_users_newest_samples_in_test(tmp_path):
    rows = [[f"u{u}", f"i{t % 7}", str(1000 * t + u), str(1 + t % 5), "c"] for u in range(3) for t in range(21)]
    log = load_log(write(tmp_path / "log.csv", rows), DataConfig(valid_fraction=0.1, test_fraction=0.2))
    train, valid, test = log.splits
    # 20 samples per user: 4 test, 2 valid, 14 train.
    assert (len(train), len(valid), len(test)) == (42, 6, 12)
    for user in range(3):
        ends = [split.hist_end[split.sample_user == user] for split in log.splits]
        assert ends[0].max() < ends[1].min() and ends[1].max() < ends[2].min()
    # Test samples are events 17..20 of 0..20: their histories reach back over train and valid events.
    assert int((test.hist_end - test.user_offsets[test.sample_user]).min()) == 17


def test_items_with_several_categories_keep_their_first_and_are_counted(tmp_path):
    rows = [["a", "i1", "50", "5", "x"], ["b", "i1", "10", "5", "y"], ["b", "i2", "20", "5", "x"]]
    log = load_log(write(tmp_path / "log.csv", rows), DataConfig())
    # i1 is first seen (at 10 s, user b) as "y".
    assert log.dataset.category_ids.tolist() == [2, 2, 1]
    assert any("1 items appear with more than one category" in note for note in log.report.notes)


def test_cli_takes_data_as_the_source(tmp_path, capsys):
    path = write(tmp_path / "2024.csv", ROWS)
    assert main(["train", "--data", path, "--print-config"]) == 0
    assert f"source: {path}" in capsys.readouterr().out
