"""Training the real models on the embedded synthetic data, through the command line."""
import json

import pytest

from mos.lab.cli import main


@pytest.mark.slow
def test_training_lowers_the_loss_and_beats_chance(tmp_path, capsys):
    """Backbone and MoS, a small synthetic set, a few epochs: the loss falls and test AUC is clearly
    above 0.5 (the label depends on the history; the oracle score reaches AUC 0.83)."""
    rc = main(["train", "--config", "configs/default.yaml", "--quiet", "--set",
               "data.synthetic.num_users=800", "data.synthetic.num_items=300", "train.seeds=[0]", "train.max_epochs=8",
               "train.patience=8", "train.batch_size=128", f"train.out_dir={tmp_path}"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["backbone", "mos"]
    for record in records:
        losses = record["train_bce"]
        assert losses[-1] < losses[0], (record["model"], losses)
        assert record["test"]["auc"] > 0.58, (record["model"], record["test"]["auc"])
    mos = records[1]["test"]
    assert mos["purity"] is not None and 0 < mos["purity"] <= 1
    assert sum(mos["theme_tokens"]) > 0
    table = capsys.readouterr().out
    assert "| backbone |" in table and "| mos |" in table
