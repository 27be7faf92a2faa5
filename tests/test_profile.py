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


def _row(model, auc, std, gflops, seeds=3):
    return {"model": model, "auc_mean": auc, "auc_std": std, "gflops": gflops, "seeds": seeds}


def test_target_verdict():
    from mos.profile import target_verdict

    baselines = [_row("backbone", 0.70, 0.01, 1.0), _row("gshard", 0.70, 0.01, 2.0),
                 _row("dselect_k", 0.69, 0.01, 2.0), _row("expert_choice", 0.71, 0.01, 2.0)]
    assert target_verdict(baselines + [_row("mos", 0.75, 0.01, 1.5)]).startswith("target HOLDS")
    # A gap inside the spread, or more FLOPs than one MoE baseline, and the claim fails.
    assert "DOES NOT HOLD" in target_verdict(baselines + [_row("mos", 0.715, 0.01, 1.5)])
    assert "DOES NOT HOLD" in target_verdict(baselines + [_row("mos", 0.75, 0.01, 2.5)])
    # Without every baseline, or with one seed, nothing is claimed either way.
    assert "not evaluated" in target_verdict(baselines[:2] + [_row("mos", 0.75, 0.01, 1.5)])
    assert "not evaluated" in target_verdict(baselines + [_row("mos", 0.75, 0.0, 1.5, seeds=1)])
