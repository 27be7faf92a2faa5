"""What a log file can hold that would be read wrong without a word: each is refused naming the
file, line or column, or read the way it means (sub-second times)."""

import numpy as np
import pytest

from mos.lab.data.config import DataConfig, LogConfig
from mos.lab.data.logs import load_log
from mos.lab.errors import InputError
from tests.test_log_checks import HEADER, rows, write


def _refused(path, pattern, cfg=None):
    with pytest.raises(InputError, match=pattern):
        load_log(path, cfg or DataConfig())


def test_an_unclosed_quote_is_refused_not_read_as_one_long_field(tmp_path):
    """The csv module reads a quote that never closes as one field running to the end of the file:
    the rows after it would vanish into it (counted as one refused row)."""
    lines = [",".join(HEADER)] + [",".join(row) for row in rows(users=6)]
    lines[5] = '"' + lines[5]                       # line 6 opens a quote nothing closes
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    _refused(path, r"^data.source: .*log.csv line 6: a quoted field runs over lines 6-37 \(an unclosed quote\?\)")


def test_line_breaks_in_a_column_not_read_are_text_unless_they_hold_rows(tmp_path):
    """A quoted review over two lines is legal CSV and loads; an unclosed quote in that column,
    swallowing lines that look like the log's rows, is refused."""
    header = HEADER + ["review"]
    body = [row + ["ok"] for row in rows()]
    body[2][4] = "great\nmovie"
    assert load_log(write(tmp_path / "review.csv", body, header), DataConfig()).report.used == 18
    lines = [",".join(header)] + [",".join(row) for row in body[:2]] + [",".join(body[2][:4]) + ',"never closed'] + \
        [",".join(row) for row in body[3:]]
    path = tmp_path / "open.csv"
    path.write_text("\n".join(lines) + "\n")
    _refused(path, r"line 4: a quoted field runs over lines 4-19 \(an unclosed quote\?\)")


def test_a_field_past_the_csv_limit_names_its_line(tmp_path):
    body = rows()
    body[3][1] = "x" * 200_000
    _refused(write(tmp_path / "log.csv", body), r"^data.source: .*log.csv line 5: not a readable CSV row \(field larger")


def test_a_wanted_column_twice_in_the_header_is_refused(tmp_path):
    path = write(tmp_path / "log.csv", [row + [row[3]] for row in rows()], HEADER + ["label"])
    _refused(path, r"^data.logs.label_column: expected one column 'label' in .*, got it 2 times \(fields 4, 5\)")


@pytest.mark.parametrize("role, name", [("time", "ts"), ("category", "genre"), ("label", "clicked"),
                                        ("rating", "stars")])
def test_an_optional_column_named_in_the_config_must_be_there(tmp_path, role, name):
    """A default optional column may be absent (the log has none); one the config names is wanted,
    and missing it would drop it silently (row order as time, one category for every item)."""
    cfg = DataConfig(logs=LogConfig(**{f"{role}_column": name}))
    _refused(write(tmp_path / "log.csv", rows()), rf"^data.logs.{role}_column: expected a column '{name}' in .*"
                                                   rf"\(named in the config; the default '\w+' would be optional\)", cfg)


def test_a_log_to_score_may_lack_named_label_and_category_columns(tmp_path):
    """Scoring reads no labels and takes categories from the model's vocabulary: the training
    config's label and category columns need not be in the new log."""
    cfg = DataConfig(logs=LogConfig(label_column="clicked", category_column="genre"))
    trained = load_log(write(tmp_path / "train.csv", [row + [f"g{row[1][-1]}"] for row in rows()],
                             HEADER[:3] + ["clicked", "genre"]), cfg)
    scored = load_log(write(tmp_path / "score.csv", [row[:3] for row in rows()], HEADER[:3]), cfg,
                      vocabulary=trained.vocabulary)
    assert scored.report.used == 18 and not scored.report.has_labels
    assert np.array_equal(scored.dataset.category_ids.numpy(), trained.dataset.category_ids.numpy())


def test_sub_second_times_order_the_events(tmp_path):
    """Times are kept whole seconds, but events are ordered (and duplicates told apart) by the
    exact time: an event at .9 s is after one at .1 s of the same second, whatever the file order,
    and two events in one second are no duplicate."""
    body = [["u0", f"i{e}", f"{1_700_000_000 + 60 * e}", str(e % 2)] for e in range(6)]
    late, early = ["u0", "x", "1700000300.9", "1"], ["u0", "y", "1700000300.1", "0"]
    in_order = load_log(write(tmp_path / "a.csv", body[:5] + [early, late] + body[5:]), DataConfig())
    swapped = load_log(write(tmp_path / "b.csv", body[:5] + [late, early] + body[5:]), DataConfig())
    assert np.array_equal(in_order.dataset.item_ids.numpy(), swapped.dataset.item_ids.numpy())
    assert np.array_equal(in_order.dataset.timestamps.numpy(), swapped.dataset.timestamps.numpy())
    same_second = load_log(write(tmp_path / "c.csv", body + [early, early[:2] + ["1700000300.6", "0"]]),
                           DataConfig(logs=LogConfig(drop_duplicates=True)))
    assert same_second.report.used == 8 and same_second.report.warnings == []


def test_parquet_nan_ids_nested_columns_and_truncated_files(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (requirements/ci.txt installs it)")
    import pyarrow.parquet as pq

    body = rows()
    columns = {name: [row[i] for row in body] for i, name in enumerate(HEADER)}
    users = [float(row[0][1:]) for row in body]
    users[4] = float("nan")                           # a missing id, as a NaN in a float column
    pq.write_table(pa.table({**columns, "user_id": users}), tmp_path / "nan.parquet")
    nan = load_log(tmp_path / "nan.parquet", DataConfig())
    assert nan.report.users == 3 and nan.report.used == 17                    # no user "nan"
    assert sum(entry["count"] for entry in nan.report.refused.values()) == 1
    nested = {**columns, "item_id": [[item] for item in columns["item_id"]]}
    pq.write_table(pa.table(nested), tmp_path / "nested.parquet")
    _refused(tmp_path / "nested.parquet", r"^data.logs.item_column: expected a column of plain values in .*, got "
                                          r"'item_id' of type list<element: string>")
    whole = (tmp_path / "nan.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[:len(whole) // 2])
    _refused(tmp_path / "cut.parquet", r"^data.source: .*cut.parquet is not a readable Parquet file")
