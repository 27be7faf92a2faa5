"""The summary table: one row per model, mean ± std over seeds, purity only where a router ran."""
import pytest

from mos.lab.report import WALL_TIME_NOTE, format_mean_std, mean_std, metric_text, summary_table


def record(model, seed, auc, purity=None, epochs=4, seconds=2.0, params=12345, served=None):
    test = {"auc": auc, "gauc": auc - 0.1, "logloss": 0.5 + seed / 10, "purity": purity}
    selection = None if served is None else {"serve_correction": served, "gain": 0.001, "se": 0.002}
    return {"model": model, "seed": seed, "test": test, "epochs": epochs,
            "seconds_per_epoch": seconds, "params": params, "selection": selection}


def test_mean_std_is_over_seeds_and_zero_for_one_seed():
    assert mean_std([0.7]) == (0.7, 0.0)
    mean, spread = mean_std([0.6, 0.8])
    assert mean == pytest.approx(0.7) and spread == pytest.approx(0.1414213, abs=1e-6)


def test_summary_table_rows_and_values():
    records = [record("backbone", 0, 0.60), record("mos", 0, 0.70, purity=0.5, epochs=3, seconds=3.0, served=True),
               record("backbone", 1, 0.62), record("mos", 1, 0.74, purity=0.7, epochs=6, seconds=4.0, served=False)]
    lines = summary_table(records).split("\n\n")[0].splitlines()
    assert len(lines) == 4                       # header, rule, one row per model (the wall-time note below)
    assert lines[0].startswith("| model | seeds | test AUC | test GAUC | test LogLoss | router purity")
    backbone, mos = (line.split(" | ") for line in lines[2:])
    assert backbone[0] == "| backbone" and mos[0] == "| mos"   # first-appearance order
    assert backbone[1] == "2"
    assert backbone[2] == "0.6100 ± 0.0141"
    assert backbone[4] == "0.5500 ± 0.0707"      # logloss 0.5 and 0.6
    assert backbone[5] == "-"                    # no router
    assert mos[2] == "0.7200 ± 0.0283" and mos[3] == "0.6200 ± 0.0283"
    assert mos[5] == "0.6000 ± 0.1414"
    # A boosted model says in how many seeds its correction was served; a plain one has none.
    assert mos[6:] == ["4.5", "1 of 2", "3.50", "12,345 |"] and backbone[7] == "-"


def test_summary_table_single_seed_shows_the_value_without_a_spread():
    table = summary_table([record("mos", 0, 0.7, purity=0.9)])
    assert "| 0.7000 |" in table and "| 0.9000 |" in table and "±" not in table


def test_undefined_metrics_are_said_and_counted_not_averaged():
    gauc_undefined = record("mos", 0, 0.7)
    gauc_undefined["test"].update(gauc=None, gauc_users_skipped=30)
    row = summary_table([gauc_undefined]).splitlines()[2].split(" | ")
    assert row[3] == "undefined (30 users skipped: each has one class)"
    one_of_two = [record("mos", 0, 0.7), record("mos", 1, 0.7)]
    one_of_two[1]["test"]["auc"] = None
    assert summary_table(one_of_two).splitlines()[2].split(" | ")[2] == "0.7000 (1 of 2 seeds undefined)"
    assert metric_text({"auc": None}, "auc") == "undefined (one class)"


def test_epoch_time_is_labelled_wall_time_on_a_shared_machine():
    lines = summary_table([record("mos", 0, 0.7)]).splitlines()
    assert "| wall s/epoch |" in lines[0]
    assert lines[-1] == WALL_TIME_NOTE and "other jobs may share" in WALL_TIME_NOTE


def test_means_read_with_their_spread_over_seeds():
    assert format_mean_std(0.25, 0.01, 1) == "0.2500" and format_mean_std(0.25, 0.01, 3) == "0.2500 ± 0.0100"
    assert format_mean_std(None, None, 3) == "-"
