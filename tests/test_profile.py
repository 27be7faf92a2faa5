"""`python -m mos profile --quick`: the table, the CSV/JSON, the three PNGs, and resuming."""
import json

import pytest

from mos.cli import main


@pytest.mark.slow
def test_quick_profile_writes_everything_and_resumes(tmp_path, capsys):
    args = ["profile", "--quick", "--config", "configs/default.yaml", "--quiet",
            "--set", "models=[backbone,gshard,mos]", f"train.out_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "| backbone |" in out.out and "| gshard |" in out.out and "| mos |" in out.out
    assert "target" in out.out
    # Toy models cost well under a GFLOP: the table says MFLOPs; one seed shows no "± 0.0000".
    assert "| MFLOPs/ex (fwd) |" in out.out and "± 0.0000" not in out.out and "wall s/epoch" in out.out
    for name in ("profile.md", "profile.csv", "profile.json", "auc_vs_flops.png", "flops_vs_length.png",
                 "session_similarity.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (tmp_path / "auc_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"backbone", "gshard", "mos"}
    assert all(r["gflops"] > 0 and r["train_gflops"] > r["gflops"] for r in rows)

    assert main(args) == 0                       # a second run reads every finished run back
    assert out.err.count("training") == 3
    assert capsys.readouterr().err.count("cached") == 3


def test_changed_config_is_recomputed(tmp_path, capsys):
    from mos.profile import _fingerprint
    from mos.config_io import load_run_config

    a = load_run_config("configs/default.yaml", [f"train.out_dir={tmp_path}"])
    b = load_run_config("configs/default.yaml", [f"train.out_dir={tmp_path}/other", "train.progress=none"])
    c = load_run_config("configs/default.yaml", ["train.lr=0.01"])
    assert _fingerprint(a, "mos", 0) == _fingerprint(b, "mos", 0)     # where and how loudly: same run
    assert _fingerprint(a, "mos", 0) != _fingerprint(c, "mos", 0)     # what it computes: another run
    assert _fingerprint(a, "mos", 0) != _fingerprint(a, "mos", 1)
    # A MoS-only option leaves the other kinds' runs valid; an encoder option every kind reads does not.
    fusion = load_run_config("configs/default.yaml", ["model.mos.temperature=0.5"])
    dim = load_run_config("configs/default.yaml", ["model.mos.dim=16"])
    moe = load_run_config("configs/default.yaml", ["model.moe.num_experts=8"])
    assert _fingerprint(a, "mos", 0) != _fingerprint(fusion, "mos", 0)
    assert _fingerprint(a, "backbone", 0) == _fingerprint(fusion, "backbone", 0)
    assert _fingerprint(a, "gshard", 0) == _fingerprint(fusion, "gshard", 0)
    assert _fingerprint(a, "backbone", 0) != _fingerprint(dim, "backbone", 0)
    assert _fingerprint(a, "gshard", 0) != _fingerprint(moe, "gshard", 0)
    assert _fingerprint(a, "mos", 0) == _fingerprint(moe, "mos", 0)


def _row(model, auc, std, gflops, seeds=3):
    return {"model": model, "auc_mean": auc, "auc_std": std, "gflops": gflops, "seeds": seeds}


def test_target_verdict():
    from mos.profile import target_verdict

    baselines = [_row("backbone", 0.70, 0.01, 1.0), _row("gshard", 0.70, 0.01, 2.0),
                 _row("dselect_k", 0.69, 0.01, 2.0), _row("expert_choice", 0.71, 0.01, 2.0)]
    holds = target_verdict(baselines + [_row("mos", 0.75, 0.01, 1.5)])
    assert "never worse than the backbone: HOLDS" in holds
    assert "better than the backbone and every MoE baseline: HOLDS" in holds
    # A gap inside the spread, or more FLOPs than one MoE baseline: not better, still never worse.
    for mos in (_row("mos", 0.715, 0.01, 1.5), _row("mos", 0.75, 0.01, 2.5)):
        verdict = target_verdict(baselines + [mos])
        assert "never worse than the backbone: HOLDS" in verdict
        assert "better than the backbone and every MoE baseline: DOES NOT HOLD" in verdict
    # The never-worse rule allows 0.002 below the backbone, no more.
    assert "never worse than the backbone: HOLDS" in target_verdict(baselines + [_row("mos", 0.6985, 0.01, 1.5)])
    assert "never worse than the backbone: DOES NOT HOLD" in target_verdict(
        baselines + [_row("mos", 0.6975, 0.01, 1.5)])
    # Without every baseline, or with one seed, nothing is claimed either way.
    assert "not evaluated" in target_verdict(baselines[:2] + [_row("mos", 0.75, 0.01, 1.5)])
    assert "not evaluated" in target_verdict(baselines + [_row("mos", 0.75, 0.0, 1.5, seeds=1)])


@pytest.mark.slow
def test_quick_profile_on_the_long_setting(tmp_path, capsys):
    """The long-history configuration runs end to end at toy size, and its title names it."""
    args = ["profile", "--quick", "--config", "configs/profile_long.yaml", "--quiet",
            "--set", "models=[backbone,mos]", "data.synthetic.num_users=40", f"train.out_dir={tmp_path}"]
    assert main(args) == 0
    report = (tmp_path / "profile.md").read_text()
    assert report.startswith("## synthetic, long") and "| mos |" in report
    assert "how to read the verdict" in report.lower()
    rows = json.loads((tmp_path / "profile.json").read_text())["records"]
    assert all(len(r["flops_by_length"]) == 2 for r in rows)     # the trained models' L sweep


@pytest.mark.slow
def test_report_only_reports_finished_runs_and_names_missing_ones(tmp_path, capsys):
    """--report-only trains nothing: it reports the finished runs and names the missing ones,
    and with no finished run it stops with one line and exit code 2."""
    base = ["profile", "--quick", "--config", "configs/default.yaml", "--quiet", f"train.out_dir={tmp_path}"]
    base.insert(5, "--set")
    assert main(base[:5] + ["--report-only"] + base[5:] + ["models=[backbone]"]) == 2
    assert "expected finished runs" in capsys.readouterr().err
    assert main(base + ["models=[backbone]"]) == 0
    capsys.readouterr()
    assert main(base[:5] + ["--report-only"] + base[5:] + ["models=[backbone,mos]"]) == 0
    out = capsys.readouterr()
    assert "mos seed 0: missing" in out.err and "training" not in out.err
    report = (tmp_path / "profile.md").read_text()
    assert "| backbone |" in report and "| mos |" not in report and "Not run (reported without them): mos seed 0" in report
