"""The training loop on a tiny fake model and data: it learns, stops early, restores the best
weights, measures the router, writes one JSON line per run and prints the summary table."""
import json
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from torch import nn

from mos.lab import run_state, train
from mos.config import MoSConfig
from mos.lab.config import ModelConfig, RunConfig, TrainConfig
from mos.lab.data.batch import Batch

HISTORY = 4          # events per example, two sessions of two
INTERESTS = 3


class FakeData:
    """n examples whose label is the parity of the target item, so the target alone predicts it."""

    num_items, num_categories = 20, 3

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.target = torch.randint(1, self.num_items, (n,), generator=g)
        self.label = (self.target % 2).float()
        self.user = torch.randint(0, 8, (n,), generator=g)
        self.history = torch.randint(1, self.num_items, (n, HISTORY), generator=g)

    def __len__(self):
        return self.target.numel()

    def num_batches(self, batch_size, drop_last=False):
        return -(-len(self) // batch_size)

    def batches(self, batch_size, *, shuffle=False, generator=None, max_history=None, drop_last=False):
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for index in order.split(batch_size):
            rows = index.numel() * HISTORY
            items = self.history[index].flatten()
            yield Batch(
                item_ids=items, category_ids=items % 3, timestamps=torch.arange(rows),
                offsets=torch.arange(index.numel() + 1) * HISTORY, max_len=HISTORY,
                target_item=self.target[index], target_category=self.target[index] % 3,
                label=self.label[index], user=self.user[index],
                # One interest per session of two events, cycling over the sessions.
                true_interest=torch.arange(rows) // 2 % INTERESTS)


@dataclass
class FakeOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    aux: dict = field(default_factory=dict)
    routing: Optional[SimpleNamespace] = None
    candidates: Optional[dict] = None


class FakeModel(nn.Module):
    """A logit per target item; as "mos" it also routes each session to its true interest."""

    def __init__(self, config, num_items, num_categories):
        super().__init__()
        self.kind = config.kind
        self.logit = nn.Embedding(num_items, 1)
        nn.init.zeros_(self.logit.weight)

    def forward(self, batch):
        logits = self.logit(batch.target_item).squeeze(1)
        if self.kind == "backbone":
            return FakeOutput(logits, logits.new_zeros(()))
        sessions = batch.item_ids.numel() // 2
        routing = SimpleNamespace(session_offsets=torch.arange(sessions + 1) * 2,
                                  session_theme=torch.arange(sessions) % INTERESTS)
        shrink = logits.pow(2).mean()
        return FakeOutput(logits, 1e-3 * shrink, {"shrink": shrink.detach()}, routing)


def make_config(**train_fields) -> RunConfig:
    fields = dict(batch_size=32, lr=0.2, max_epochs=6, patience=6, progress="none", threads=0)
    fields.update(train_fields)
    # Joint: the fake "mos" has one prediction, no boosted candidates.
    return RunConfig(model=ModelConfig(mos=MoSConfig(num_themes=4), training="joint"), train=TrainConfig(**fields))


@pytest.fixture
def splits(monkeypatch):
    monkeypatch.setattr(train, "CTRModel", FakeModel)
    return FakeData(256, 0), FakeData(96, 1), FakeData(96, 2)


def test_training_lowers_the_loss_and_records_the_run(splits, capsys):
    record = train.train_one(make_config(max_epochs=4), "backbone", 0, splits, progress="none")
    assert record["train_loss"][-1] < 0.5 * record["train_loss"][0]
    assert record["train_bce"] == record["train_loss"]   # the backbone has no aux loss
    assert record["test"]["auc"] == 1.0 and record["valid"]["auc"] == 1.0
    assert record["test"]["purity"] is None and record["test"]["theme_tokens"] is None
    assert record["model"] == "backbone" and record["seed"] == 0
    assert record["config"]["model"]["kind"] == "backbone"
    assert record["epochs"] == len(record["train_loss"]) == len(record["epoch_seconds"]) == 4
    assert record["params"] == FakeData.num_items
    assert record["test"]["examples"] == 96 and record["test"]["gauc_users"] > 0
    json.dumps(record)   # the record is what results.jsonl holds
    err = capsys.readouterr().err
    assert err.count("backbone seed 0 epoch") == 4 and "valid AUC" in err and "test AUC" in err


def test_quiet_prints_nothing_and_same_seed_repeats(splits, capsys):
    first = train.train_one(make_config(quiet=True, max_epochs=2), "backbone", 3, splits, progress="none")
    again = train.train_one(make_config(quiet=True, max_epochs=2), "backbone", 3, splits, progress="none")
    assert capsys.readouterr().err == ""
    assert first["train_loss"] == again["train_loss"]


def test_router_purity_nmi_and_tokens_per_theme(splits):
    record = train.train_one(make_config(max_epochs=1, quiet=True), "mos", 0, splits, progress="none")
    test = record["test"]
    assert test["purity"] == pytest.approx(1.0) and test["nmi"] == pytest.approx(1.0)
    # Three batches of 32 examples; each has 64 sessions of 2 tokens cycling over themes 0, 1, 2
    # of 4, so 22, 21, 21 sessions per batch.
    assert test["theme_tokens"] == [3 * 44, 3 * 42, 3 * 42, 0]
    assert list(record["train_aux"]) == ["shrink"] and len(record["train_aux"]["shrink"]) == 1
    assert record["train_loss"][0] == pytest.approx(record["train_bce"][0] + 1e-3 * record["train_aux"]["shrink"][0])


def test_early_stopping_restores_the_best_weights(splits, monkeypatch):
    valid_aucs = iter([0.6, 0.8, 0.7, 0.75, 0.9, 0.95])
    seen = []   # (split, weights) at every prediction of a split

    def recording_predict(model, dataset, **kwargs):
        split = "valid" if dataset is splits[1] else "test"
        seen.append((split, model.logit.weight.detach().clone()))
        return split

    def scripted_metrics(split, num_themes, model=None):
        auc = next(valid_aucs) if split == "valid" and len(seen) <= 4 else 0.5
        return {"auc": auc, "gauc": auc, "logloss": 0.5}

    monkeypatch.setattr(train, "predict_split", recording_predict)
    monkeypatch.setattr(train, "split_metrics", scripted_metrics)
    record = train.train_one(make_config(patience=2, quiet=True), "backbone", 0, splits, progress="none")
    # Best at epoch 2; epochs 3 and 4 do not beat it, so training stops after epoch 4.
    assert record["epochs"] == 4 and record["best_epoch"] == 2
    assert record["valid_auc_curve"] == [0.6, 0.8, 0.7, 0.75]
    # After training, validation and test are predicted again with the best weights.
    assert [split for split, _ in seen] == ["valid"] * 5 + ["test"]
    assert torch.equal(seen[-1][1], seen[1][1]) and torch.equal(seen[-2][1], seen[1][1])   # epoch 2's weights
    assert not torch.equal(seen[-1][1], seen[3][1])        # not the last epoch's


def test_progress_bar_choice(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(train.sys.stderr, "isatty", lambda: True, raising=False)
    assert train._show_bar("auto") and train._show_bar("bar") and not train._show_bar("none")
    monkeypatch.setenv("CI", "1")
    assert not train._show_bar("auto") and train._show_bar("bar")
    with pytest.raises(ValueError, match="progress"):
        train._show_bar("always")


def test_the_progress_bar_raises_no_warning(splits, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # a warning would fail the run
        record = train.train_one(make_config(max_epochs=1, quiet=True), "backbone", 0, splits, progress="bar")
    assert record["epochs"] == 1 and "backbone seed 0 epoch 1" in capsys.readouterr().err


def test_run_appends_json_lines_and_prints_the_table(splits, monkeypatch, tmp_path, capsys):
    data = FakeData(8, 9)
    monkeypatch.setattr(train.synthetic, "generate", lambda cfg, seed: data)
    monkeypatch.setattr(train, "split_by_user", lambda ds, valid, test, seed: splits)
    monkeypatch.setattr(train.stats, "session_statistics", lambda ds, gap_seconds: {"sessions": 2})
    monkeypatch.setattr(train.stats, "format_statistics", lambda stats: f"statistics {stats}")
    out_dir = tmp_path / "runs" / "fake"
    cfg = make_config(max_epochs=2, seeds=(0, 1), quiet=True, out_dir=str(out_dir))

    records = train.run(cfg)
    lines = (out_dir / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["model"] for line in lines] == ["backbone", "mos", "backbone", "mos"]
    assert [json.loads(line)["seed"] for line in lines] == [0, 0, 1, 1]
    assert json.loads(lines[-1]) == json.loads(json.dumps(records[-1]))
    out = capsys.readouterr().out
    assert out.count("statistics {'sessions': 2}") == 1          # printed once, not per run
    assert "| backbone | 2 | 1.0000 ± 0.0000" in out and "| mos | 2 |" in out

    # Every validation and test prediction is kept beside the records.
    import numpy as np
    with np.load(out_dir / "predictions" / "mos-seed1.npz") as saved:
        assert len(saved["test_logits"]) == len(splits[2]) and len(saved["valid_labels"]) == len(splits[1])
        assert np.array_equal(saved["test_labels"], splits[2].label.numpy())

    train.run(cfg)
    assert len((out_dir / "results.jsonl").read_text().splitlines()) == 8   # appended, not replaced


STACKED = ["mos", "gshard", "dselect_k", "expert_choice", "stacked_backbone"]


@pytest.mark.parametrize("kind, encoder", [(kind, "target_attention") for kind in STACKED] + [("mos", "transformer")])
def test_boosted_kinds_carry_their_backbone_step_for_step(kind, encoder):
    """Boosted training: after Adam steps on the same batches from the same seed, every stacked
    model's backbone candidate equals the backbone model's prediction bit for bit (its backbone
    part got exactly the backbone's gradients), while its corrected candidate has moved away
    from it; a jointly trained model's prediction has not stayed on the backbone's."""
    from mos.lab.data import synthetic
    from mos.lab.data.config import SyntheticConfig
    from mos.lab.model import CTRModel

    data = synthetic.generate(SyntheticConfig(num_users=40, num_items=60))
    batches = list(data.batches(16))[:4]
    mos_cfg = MoSConfig(dim=16, num_heads=2, encoder=encoder, session_mode="gap")
    predictions = {}
    for name, training in (("backbone", "boosted"), (kind, "boosted"), (kind, "joint")):
        torch.manual_seed(3)
        model = CTRModel(ModelConfig(kind=name, mos=mos_cfg, training=training, item_id_dim=8), data.num_items,
                         data.num_categories)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        state = run_state.RunState(epoch_shuffle=torch.Generator().get_state())
        for batch in batches:
            train._train_step(model, optimizer, batch, state)
        with torch.no_grad():
            out = model(batches[0])
        predictions[name, training] = out.candidates._asdict() if out.candidates else {"served": out.logits}
    backbone = predictions["backbone", "boosted"]["served"]
    torch.testing.assert_close(predictions[kind, "boosted"]["backbone"], backbone, rtol=0, atol=0)
    assert not torch.allclose(predictions[kind, "boosted"]["corrected"], backbone)
    assert not torch.allclose(predictions[kind, "joint"]["served"], backbone)


def _boosted_model(data, gain_scale: float):
    from mos.lab.model import CTRModel

    torch.manual_seed(0)
    model = CTRModel(ModelConfig(mos=MoSConfig(dim=16, num_heads=2)), data.num_items, data.num_categories)
    with torch.no_grad():
        model.encoder.extras_out.weight.normal_(std=gain_scale)          # make the two candidates differ
    return model


def test_boosted_selection_serves_the_correction_only_beyond_its_standard_error():
    """With the best weights, `_select` compares the candidates on validation once: it serves
    the corrected one iff its AUC gain exceeds the gain's user-clustered DeLong SE, and the
    served prediction is then that candidate's."""
    from mos.lab.data import synthetic
    from mos.lab.data.config import SyntheticConfig
    from mos.delong import auc_difference

    data = synthetic.generate(SyntheticConfig(num_users=200, num_items=60))
    for scale in (0.05, 3.0):
        model = _boosted_model(data, scale)
        pred = train.predict_split(model, data, batch_size=128, device=torch.device("cpu"))
        choice = train._select(model, pred)
        want = auc_difference(pred.labels, pred.candidates["corrected"], pred.candidates["backbone"], pred.users)
        assert choice["gain"] == pytest.approx(want.difference) and choice["se"] == pytest.approx(want.se)
        assert choice["serve_correction"] == (want.difference > want.se) == bool(model.serve_correction)
        served = train.split_metrics(train.predict_split(model, data, batch_size=128, device=torch.device("cpu")), 8,
                                     model)
        assert served["auc"] == pytest.approx(choice["corrected_auc" if choice["serve_correction"] else "backbone_auc"])
        assert served["serves_correction"] == choice["serve_correction"]


def test_a_one_class_split_has_undefined_auc_and_gauc(splits):
    data = FakeData(32, 5)
    data.label = torch.ones(32)
    model = FakeModel(SimpleNamespace(kind="backbone"), 20, 3)
    result = train.split_metrics(train.predict_split(model, data, batch_size=16, device="cpu"), 4)
    assert result["auc"] is None and result["gauc"] is None
    assert (result["gauc_users"], result["gauc_users_skipped"]) == (0, len(torch.unique(data.user)))
    assert result["logloss"] == pytest.approx(float(torch.log(torch.tensor(2.0))))


def test_training_on_a_cpu_uses_the_deterministic_algorithms_and_gives_the_setting_back(splits, monkeypatch):
    """With more than one thread some default CPU backward kernels add in a varying order (the
    measurement is in docs/profile.md); training and its evaluations run with the deterministic
    ones, without their NaN fill of every new tensor (a pass per op output)."""
    seen = []
    deterministic = torch.utils.deterministic

    class Spy(FakeModel):
        def forward(self, batch):
            seen.append((torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory))
            return super().forward(batch)

    monkeypatch.setattr(train, "CTRModel", Spy)
    assert not torch.are_deterministic_algorithms_enabled() and deterministic.fill_uninitialized_memory
    train.train_one(make_config(max_epochs=1, quiet=True), "backbone", 0, splits, progress="none")
    assert seen and all(s == (True, False) for s in seen)
    assert not torch.are_deterministic_algorithms_enabled() and deterministic.fill_uninitialized_memory


def test_a_diverging_run_stops_at_its_first_non_finite_step_and_keeps_its_last_good_checkpoint(tmp_path):
    """With a learning rate that diverges, training stops with one error naming the run, the
    epoch, the step and what to try; every checkpoint it wrote holds finite weights only."""
    from mos.lab import checkpoint
    from mos.lab.data import synthetic
    from mos.lab.data.config import SyntheticConfig
    from mos.lab.data.dataset import split_by_user

    data = synthetic.generate(SyntheticConfig(num_users=80, num_items=60))
    cfg = RunConfig(model=ModelConfig(mos=MoSConfig(dim=16, num_heads=2, session_mode="gap")),
                    train=TrainConfig(batch_size=32, lr=1e6, max_epochs=2, checkpoint_every=1, progress="none",
                                      quiet=True, out_dir=str(tmp_path)))
    path = tmp_path / "mos-seed0.pt"
    with pytest.raises(train.TrainingDiverged, match=r"train: mos seed 0 diverged in epoch 1: .* at step \d+ of the "
                                                     r"epoch .*its last checkpoint .* is kept\. Try a smaller "
                                                     r"train\.lr \(now 1e\+06\)"):
        train.train_one(cfg, "mos", 0, split_by_user(data, 0.2, 0.2, 0), progress="none", checkpoint_path=path)
    saved = checkpoint.load(path)
    assert saved is not None and saved["run"]["step"] >= 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_a_non_finite_gradient_is_not_stepped(splits):
    """A NaN reaching the loss stops the run before the optimizer moves any weight."""
    model = FakeModel(SimpleNamespace(kind="backbone"), FakeData.num_items, FakeData.num_categories)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    state = run_state.RunState(epoch_shuffle=torch.Generator().get_state())
    batch = next(splits[0].batches(8))
    batch.label[0] = float("nan")
    before = model.logit.weight.detach().clone()
    with pytest.raises(train.TrainingDiverged, match=r"the loss or a gradient became non-finite at step 1 of the "
                                                     r"epoch \(loss nan\); the step was not taken"):
        train._train_step(model, optimizer, batch, state)
    assert torch.equal(model.logit.weight, before) and state.step == 0
