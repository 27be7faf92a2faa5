"""`python -m mos profile --quick`: the tables, the files and figures, the saved predictions,
resuming, the validation grid, parallel runs (equal to serial ones; a killed job loses and
doubles nothing), and the verdict's rules."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mos.lab.cli import main
from mos.lab.metrics import auc
from mos.lab.profiling.paired import Comparison
from mos.lab.profiling.tables import verdict

MODELS = "models=[backbone,stacked_backbone,gshard,mos]"


def _quick(tmp_path, *extra, config="configs/default.yaml"):
    return ["profile", "--quick", "--config", config, "--quiet", "--set", MODELS, f"train.out_dir={tmp_path}", *extra]


def _records(folder):
    return {p.stem: json.loads(p.read_text())["record"] for p in sorted((folder / "runs").glob("*.json"))}


@pytest.mark.slow
def test_quick_profile_writes_everything_and_resumes(tmp_path, capsys):
    assert main(_quick(tmp_path)) == 0
    out = capsys.readouterr()
    for section in ("### Models", "### References", "### Paired comparisons (test AUC)", "### Verdict",
                    "### Paired comparisons on the validation split", "### Options chosen on validation",
                    "| mos vs backbone |", "| Bayes |", "| share LR |"):
        assert section in out.out, section
    assert out.out.count("| mos vs backbone |") == 2                 # on test and on validation
    # Toy models cost well under a GFLOP: the table says MFLOPs; one seed shows no "± 0.0000".
    assert "| MFLOPs/ex (fwd) |" in out.out and "± 0.0000" not in out.out and "wall s/epoch" in out.out
    for name in ("profile.md", "profile.csv", "paired.csv", "profile.json", "auc_vs_flops.png", "flops_vs_length.png",
                 "session_similarity.png", "routing.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (tmp_path / "auc_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert len(saved["comparisons"]) == len(saved["valid_comparisons"]) > 0
    # The routing picture's numbers: every MoS run's test sessions by theme and true interest.
    for record in _records(tmp_path).values():
        table = record["test"]["routing_table"]
        if record["model"].startswith("mos"):
            assert len(table) == record["config"]["model"]["mos"]["num_themes"] and sum(map(sum, table)) > 0
            assert "(cap " in out.out
        else:
            assert table is None
    assert {r["model"] for r in saved["rows"]} == {"backbone", "stacked_backbone", "gshard", "mos"}
    assert all(r["mflops"] > 0 and r["train_mflops"] > r["mflops"] for r in saved["rows"])
    # One FLOP unit: the table's cells are the CSV's numbers (and the figures' axes say MFLOPs, test_plots).
    with open(tmp_path / "profile.csv", newline="") as stream:
        csv_rows = {row["model"]: row for row in csv.DictReader(stream)}
    for row in saved["rows"]:
        line = next(l for l in out.out.splitlines() if l.startswith(f"| {row['model']} |"))
        cells = [cell.strip() for cell in line.split("|")]
        assert cells[4:6] == [f"{float(csv_rows[row['model']]['mflops']):.3f}",
                              f"{float(csv_rows[row['model']]['train_mflops']):.3f}"]
    assert saved["provenance"]["command"].endswith(f"train.out_dir={tmp_path}")
    assert "Commit " in (tmp_path / "profile.md").read_text()
    # Every run names the machine it trained on (CPU kernels decide the rounding); the report counts them.
    from mos.lab.run_log import machine
    assert all(record["machine"] == machine() for record in saved["records"])
    assert saved["provenance"]["run_machines"] == {machine(): len(saved["records"])}
    assert f"Final runs trained on: {machine()}: {len(saved['records'])} run(s)." in (tmp_path / "profile.md").read_text()
    assert ", CPU kernels " in machine() and " thread(s)" in machine()
    # ... and the code it trained with, which a run read back from an older profile keeps.
    from mos.lab.run_log import code_version
    code = code_version()
    assert all(record["code"] == code for record in saved["records"])
    assert saved["provenance"]["run_code"] == {code: len(saved["records"])}
    assert f"Final runs trained at: {code}: {len(saved['records'])} run(s)." in (tmp_path / "profile.md").read_text()
    # Every run's predictions are beside its record, and reproduce its test AUC.
    for run_id, record in _records(tmp_path).items():
        with np.load(tmp_path / "runs" / f"{run_id}.npz") as npz:
            assert auc(npz["test_labels"], npz["test_logits"]) == pytest.approx(record["test"]["auc"], abs=1e-12)
            assert len(npz["valid_logits"]) == record["valid"]["examples"]
            if record["model"] != "backbone":
                assert {"test_backbone", "test_corrected"} <= set(npz.files)

    assert main(_quick(tmp_path)) == 0                       # a second run reads every finished run back
    err = capsys.readouterr().err
    assert "4 runs: 4 finished before, 0 to train" in err


@pytest.mark.slow
def test_parallel_runs_equal_serial_ones(tmp_path):
    """--jobs 2 (one thread per run) gives the records and predictions of a serial run with one
    thread, number for number."""
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert main(_quick(serial, "train.seeds=[0,1]", "train.threads=1")) == 0
    assert main(_quick(parallel, "train.seeds=[0,1]") + ["--jobs", "2"]) == 0
    a, b = _records(serial), _records(parallel)
    assert set(a) == set(b) and len(a) == 8
    for run_id in a:
        assert a[run_id]["parameter_digests"] == b[run_id]["parameter_digests"]
        assert a[run_id]["test"] == b[run_id]["test"] and a[run_id]["valid"] == b[run_id]["valid"]
        with np.load(serial / "runs" / f"{run_id}.npz") as x, np.load(parallel / "runs" / f"{run_id}.npz") as y:
            assert all(np.array_equal(x[name], y[name]) for name in x.files)


@pytest.mark.slow
def test_a_killed_parallel_profile_loses_and_doubles_nothing(tmp_path):
    """Kill the whole job (its workers too) once the first runs are written: what is on disk is
    whole, and the rerun trains only the missing runs, ending with one record per run."""
    args = [sys.executable, "-m", "mos", *_quick(tmp_path, "train.seeds=[0,1,2]"), "--jobs", "2"]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**os.environ, "CI": "1"})
    deadline = time.time() + 300
    while len(list((tmp_path / "runs").glob("*.json"))) < 2 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    finished = _records(tmp_path)
    assert job.returncode == -signal.SIGKILL and 2 <= len(finished) < 12
    for run_id in finished:                       # every record on disk is whole, its predictions beside it
        assert (tmp_path / "runs" / f"{run_id}.npz").exists()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr
    assert f"12 runs: {len(finished)} finished before, {12 - len(finished)} to train" in done.stderr
    records = _records(tmp_path)
    assert len(records) == 12 and len({(r["model"], r["seed"]) for r in records.values()}) == 12
    assert not [p for p in (tmp_path / "runs").iterdir()
                if p.suffix not in (".json", ".npz") and not p.name.endswith(".epochs.csv")]


@pytest.mark.slow
def test_the_grid_keeps_the_option_set_best_on_validation(tmp_path, capsys):
    grid = "profile.grid={gshard: [{model.moe.num_experts: 2}, {model.moe.num_experts: 4}], mos: [{model.mos.num_themes: 2}, {model.mos.num_themes: 4}]}"
    assert main(_quick(tmp_path, grid, "profile.tuning_seeds=[0,1]", "profile.per_model={gshard: {model.moe.top_k: 1}}")) == 0
    tuning = json.loads((tmp_path / "profile.json").read_text())["tuning"]
    assert len(tuning) == 4 and all(row["seeds"] == 2 for row in tuning)
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    for model in ("gshard", "mos"):
        tried = [row for row in tuning if row["model"] == model]
        best = max(tried, key=lambda row: row["valid_auc_mean"])
        assert [row["chosen"] for row in tried].count(True) == 1 and best["chosen"]
        used = next(row for row in rows if row["model"] == model)["options"]
        assert used == best["options"]
    assert next(row for row in rows if row["model"] == "gshard")["options"]["model.moe.top_k"] == 1
    assert "| gshard | moe.num_experts=2, moe.top_k=1 | 2 |" in (tmp_path / "profile.md").read_text()
    # The chosen set's seed-0 run is the tuning run: the final stage trains nothing new for it.
    assert "4 runs: 2 finished before, 2 to train" in capsys.readouterr().err


def test_provenance_counts_the_machines_and_code_of_the_runs():
    """Runs read back from elsewhere are named by their machine and commit; records from before
    runs named them are counted as such."""
    from mos.lab.config import RunConfig
    from mos.lab.profiling.study import UNRECORDED, _provenance_text, provenance

    records = [{}, {"machine": "A", "code": "c1"}, {"machine": "A", "code": "c2 with uncommitted changes"}]
    origin = provenance(RunConfig(), 2, "python -m mos profile", records)
    assert origin["run_machines"] == {UNRECORDED: 1, "A": 2}
    assert origin["run_code"] == {UNRECORDED: 1, "c1": 1, "c2 with uncommitted changes": 1}
    assert _provenance_text(origin).endswith(
        f" Final runs trained on: {UNRECORDED}: 1 run(s); A: 2 run(s). Final runs trained at: {UNRECORDED}: 1 run(s);"
        " c1: 1 run(s); c2 with uncommitted changes: 1 run(s).")
    assert "Final runs" not in _provenance_text(provenance(RunConfig(), 1, "python -m mos profile"))
    if not torch.cuda.is_available():     # a CUDA config's report on a machine without a GPU
        from mos.lab.run_log import machine
        assert machine("cuda") == machine("cpu")


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(_quick(tmp_path) + ["--jobs", "0"]) == 2
    assert "--jobs: expected a positive number of parallel runs, got 0" in capsys.readouterr().err


def test_a_grid_key_of_no_option_is_refused_by_name():
    from mos.lab.config_io import load_run_config

    with pytest.raises(ValueError, match=r"profile\.grid\.gshard\[0\]: expected keys under \['model\.', 'train\.'\]"):
        load_run_config(None, ["profile.grid={gshard: [{data.seed: 1}]}", "profile.tuning_seeds=[0]"])
    with pytest.raises(ValueError, match=r"profile\.tuning_seeds: expected at least one seed"):
        load_run_config(None, ["profile.grid={gshard: [{model.moe.top_k: 1}]}"])
    with pytest.raises(ValueError, match=r"profile\.per_model key: expected one of"):
        load_run_config(None, ["profile.per_model={gshrd: {model.moe.top_k: 1}}"])


def test_changed_config_is_recomputed():
    from mos.lab.config_io import load_run_config
    from mos.lab.profiling.runs import fingerprint

    a = load_run_config("configs/default.yaml", ["train.out_dir=/a"])
    b = load_run_config("configs/default.yaml", ["train.out_dir=/b", "train.progress=none", "train.threads=1"])
    c = load_run_config("configs/default.yaml", ["train.lr=0.01"])
    assert fingerprint(a, "mos", 0) == fingerprint(b, "mos", 0)     # where and how loudly: same run
    assert fingerprint(a, "mos", 0) != fingerprint(c, "mos", 0)     # what it computes: another run
    assert fingerprint(a, "mos", 0) != fingerprint(a, "mos", 1)
    # A MoS-only option leaves the other kinds' runs valid; an option every kind reads does not.
    temperature = load_run_config("configs/default.yaml", ["model.mos.temperature=0.5"])
    gap = load_run_config("configs/default.yaml", ["model.mos.gap_seconds=600"])     # recency's sessions
    moe = load_run_config("configs/default.yaml", ["model.moe.num_experts=8"])
    item = load_run_config("configs/default.yaml", ["model.item_id_dim=8"])
    assert fingerprint(a, "mos", 0) != fingerprint(temperature, "mos", 0)
    assert fingerprint(a, "backbone", 0) == fingerprint(temperature, "backbone", 0)
    assert fingerprint(a, "gshard", 0) == fingerprint(temperature, "gshard", 0)
    for name in ("backbone", "gshard", "stacked_backbone"):
        assert fingerprint(a, name, 0) != fingerprint(gap, name, 0)
        assert fingerprint(a, name, 0) != fingerprint(item, name, 0)
    assert fingerprint(a, "gshard", 0) != fingerprint(moe, "gshard", 0)
    assert fingerprint(a, "mos", 0) == fingerprint(moe, "mos", 0)


def _comparison(model, baseline, mean, half_width, seeds=5):
    return Comparison(model, baseline, tuple(range(seeds)), (mean,) * seeds, (0.001,) * seeds, mean, 0.0,
                      half_width / 1.96, half_width / 1.96, mean - half_width, mean + half_width, seeds)


def _row(model, auc_mean, logloss):
    return {"model": model, "auc_mean": auc_mean, "logloss_mean": logloss}


def test_verdict_rules():
    references = [{"name": "constant", "logloss": 0.60, "auc": None}, {"name": "share LR", "auc": 0.75}]
    rows = [_row("backbone", 0.745, 0.55), _row("mos", 0.76, 0.54)]
    text = verdict(rows, references, [_comparison("mos", "backbone", 0.004, 0.003),
                                      _comparison("mos", "gshard", -0.001, 0.003)])
    assert "MoS never worse than its backbone: HOLDS (+0.0040 [+0.0010, +0.0070] over 5 seeds: better)" in text
    assert "MoS against gshard: no difference detected" in text
    assert "Test LogLoss below the constant prediction's (0.6000): every model" in text
    assert "Within 0.01 test AUC of the share-of-category regression (0.7500) or above: every model" in text
    worse = verdict([_row("backbone", 0.70, 0.61)], references, [_comparison("mos", "backbone", -0.004, 0.003)])
    assert "MoS never worse than its backbone: DOES NOT HOLD" in worse and ": worse)" in worse
    assert "NOT backbone (0.6100)" in worse and "NOT backbone (-0.0500)" in worse
    few = verdict(rows, references, [_comparison("mos", "backbone", 0.004, 0.003, seeds=3)])
    assert "NOT EVALUATED" in few and "not evaluated (3 seeds, 5 needed)" in few


def test_the_verdict_holds_each_headline_model_to_the_targets():
    """profile.headline: every MoS model named there gets the verdict's lines (against its
    backbone, each rival, random routing) and the FLOPs line against each MoE baseline; a model
    not named gets none."""
    references = [{"name": "constant", "logloss": 0.60, "auc": None}]
    rows = [{**_row(name, 0.7, 0.5), "mflops": flops} for name, flops in
            (("backbone", 1.0), ("mos", 3.0), ("mos_session_router", 3.0), ("gshard", 5.0), ("dselect_k", 2.5))]
    pairs = [_comparison("mos_session_router", "backbone", 0.01, 0.003),
             _comparison("mos_session_router", "mos_random_routing", 0.008, 0.003),
             _comparison("mos_session_router", "gshard", 0.006, 0.003), _comparison("mos", "backbone", 0.0, 0.003)]
    text = verdict(rows, references, pairs, headline=("mos", "mos_session_router"))
    assert "mos_session_router never worse than its backbone: HOLDS" in text
    assert "mos_session_router against mos_random_routing: better (+0.0080" in text
    assert "mos_session_router against gshard: better" in text
    assert ("mos_session_router at fewer forward FLOPs than each MoE baseline (3 MFLOPs per example): "
            "DOES NOT HOLD against dselect_k 2.5") in text
    assert "MoS never worse than its backbone: HOLDS" in text
    assert "mos_session_router" not in verdict(rows, references, pairs)        # not a headline model
    assert "- mos_theme_mass: not run" in verdict(rows, references, pairs, headline=("mos", "mos_theme_mass"))


def test_headline_comparisons_and_names():
    """Each headline model is compared with every rival and its matched random-routing control; a
    headline name must be a MoS variant."""
    import numpy as np
    from mos.lab.config import ProfileConfig
    from mos.lab.profiling.study import _comparisons

    rng = np.random.default_rng(0)
    labels, users = rng.integers(0, 2, 60), np.arange(60) // 3
    names = ("backbone", "mos", "mos_session_router", "mos_random_routing", "mos_random_routing_embedding", "gshard",
             "stacked_backbone")
    records = [{"model": name, "seed": seed, "run_id": f"{name}-{seed}"} for name in names for seed in (0, 1)]
    split = {"labels": labels, "users": users, **{r["run_id"]: rng.normal(size=60) for r in records}}
    pairs = {(c.model, c.baseline) for c in _comparisons(records, split, {}, None, ("mos", "mos_session_router"))}
    want = {("mos_session_router", rival) for rival in ("gshard", "stacked_backbone", "mos_random_routing_embedding")}
    assert want <= pairs and ("mos_session_router", "mos") in pairs and ("mos", "gshard") in pairs
    # Each learned router against its own matched control, once and in that direction.
    assert ("mos", "mos_random_routing") in pairs and ("mos_random_routing", "mos") not in pairs
    assert ("mos_session_router", "mos_random_routing") not in pairs
    assert not any(model == "mos_session_router" for model, _ in
                   {(c.model, c.baseline) for c in _comparisons(records, split, {}, None)} - {
                       ("mos_session_router", "backbone"), ("mos_session_router", "mos")})
    # A jointly trained variant against its boosted twin, in that direction, even when not a headline.
    joint = [{"model": name, "seed": seed, "run_id": f"{name}-{seed}"}
             for name in ("backbone", "mos_session_router", "mos_session_router_joint") for seed in (0, 1)]
    split |= {r["run_id"]: rng.normal(size=60) for r in joint}
    pairs = {(c.model, c.baseline) for c in _comparisons(joint, split, {}, None)}
    assert ("mos_session_router_joint", "mos_session_router") in pairs
    assert ("mos_session_router", "mos_session_router_joint") not in pairs
    with pytest.raises(ValueError, match=r"profile.headline\[\]: expected one of .*got 'gshard'"):
        ProfileConfig(headline=["gshard"])
    assert ProfileConfig(headline="mos_session_router").headline == ("mos_session_router",)


@pytest.mark.slow
def test_quick_profile_on_the_long_setting(tmp_path, capsys):
    """The long-history configuration runs end to end at toy size, and its title names it."""
    args = _quick(tmp_path, "data.synthetic.num_users=40", config="configs/profile_long.yaml")
    args[args.index(MODELS)] = "models=[backbone,mos]"
    assert main(args) == 0
    report = (tmp_path / "profile.md").read_text()
    assert report.startswith("## synthetic, long") and "| mos |" in report
    assert "how to read the tables" in report.lower()
    records = json.loads((tmp_path / "profile.json").read_text())["records"]
    assert all(len(r["flops_by_length"]) == 2 for r in records)     # the trained models' L sweep


@pytest.mark.slow
def test_report_only_reports_finished_runs_and_names_missing_ones(tmp_path, capsys):
    """--report-only trains nothing: it reports the finished runs and names the missing ones,
    and with no finished run it stops with one line and exit code 2."""
    def args(models, *flags):
        out = _quick(tmp_path, *flags)
        out[out.index(MODELS)] = f"models=[{models}]"
        return out

    assert main(args("backbone") + ["--report-only"]) == 2
    assert "expected finished runs" in capsys.readouterr().err
    assert main(args("backbone")) == 0
    capsys.readouterr()
    assert main(args("backbone,mos") + ["--report-only"]) == 0
    err = capsys.readouterr().err
    assert "1 finished before, 0 to train, 1 missing" in err
    report = (tmp_path / "profile.md").read_text()
    assert "| backbone |" in report and "| mos |" not in report and "Not run (reported without them): mos seed 0" in report
