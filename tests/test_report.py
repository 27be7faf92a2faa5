"""The summary table: one row per model, mean ± std over seeds, purity only where a router ran."""
import pytest

from mos.report import mean_std, summary_table


def record(model, seed, auc, purity=None, epochs=4, seconds=2.0, params=12345):
    test = {"auc": auc, "gauc": auc - 0.1, "logloss": 0.5 + seed / 10, "purity": purity}
    return {"model": model, "seed": seed, "test": test, "epochs": epochs,
            "seconds_per_epoch": seconds, "params": params}


def test_mean_std_is_over_seeds_and_zero_for_one_seed():
    assert mean_std([0.7]) == (0.7, 0.0)
    mean, spread = mean_std([0.6, 0.8])
    assert mean == pytest.approx(0.7) and spread == pytest.approx(0.1414213, abs=1e-6)


def test_summary_table_rows_and_values():
    records = [record("backbone", 0, 0.60), record("mos", 0, 0.70, purity=0.5, epochs=3, seconds=3.0),
               record("backbone", 1, 0.62), record("mos", 1, 0.74, purity=0.7, epochs=6, seconds=4.0)]
    lines = summary_table(records).splitlines()
    assert len(lines) == 4                       # header, rule, one row per model
    assert lines[0].startswith("| model | seeds | test AUC | test GAUC | test LogLoss | router purity")
    backbone, mos = (line.split(" | ") for line in lines[2:])
    assert backbone[0] == "| backbone" and mos[0] == "| mos"   # first-appearance order
    assert backbone[1] == "2"
    assert backbone[2] == "0.6100 ± 0.0141"
    assert backbone[4] == "0.5500 ± 0.0707"      # logloss 0.5 and 0.6
    assert backbone[5] == "-"                    # no router
    assert mos[2] == "0.7200 ± 0.0283" and mos[3] == "0.6200 ± 0.0283"
    assert mos[5] == "0.6000 ± 0.1414"
    assert mos[6:] == ["4.5", "3.50", "12,345 |"]


def test_summary_table_single_seed_has_zero_std():
    table = summary_table([record("mos", 0, 0.7, purity=0.9)])
    assert "0.7000 ± 0.0000" in table and "0.9000 ± 0.0000" in table
