"""benchmarks/summarize.py on hand-made CSVs of a cut run: providers joined across phases (the
speedups of a provider timed before its baseline), a repeat replacing the earlier row, a line cut
mid-write, a CSV of other columns, the logs of the script, and the summary printed last.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `benchmarks` is not an installed package

from benchmarks import harness, machine, summarize, tables  # noqa: E402

SHAPE = dict(B=256, L=1000, T=256000, S=32000, rows=256000, d=64, K=8, top_k=1)


def _row(op, provider, mode, median_ms, **values):
    env = machine.Environment(card="NVIDIA H200", device="cuda", peak_bw=4.3e12, peak_source="table", timing="t",
                              date="d", torch="t", triton="t", python="p", git_commit="unknown", note="")
    return harness.make_row(env, op=op, provider=provider, mode=mode, dtype=torch.bfloat16, shape=SHAPE,
                            median_ms=median_ms, **values)


def _cut_run(folder: Path) -> None:
    csv_path = folder / "bench_attention.csv"
    # phase "attention": reference and triton, the triton row flushed before any compiled baseline
    tables.append_csv(csv_path, [_row("layer", "reference", "fwd+bwd", 40.0)])
    tables.append_csv(csv_path, [_row("layer", "triton", "fwd+bwd", 5.0, graph_ms=2.5)])
    # phase "compiled": the fused baseline, then a repeat of triton, then a line cut mid-write
    tables.append_csv(csv_path, [_row("layer", "compiled_fused", "fwd+bwd", 12.0),
                                 _row("layer", "triton", "fwd+bwd", 4.0, graph_ms=2.0)])
    with csv_path.open("a") as f:
        f.write("layer,compiled,fwd+bwd,bf16,256,1000")
    (folder / "other.csv").write_text("a,b\n1,2\n")
    (folder / "phases.log").write_text("attention: rc=0, 90s of 140s\ncompiled: cut at its budget (rc=124), 50s of 50s\n"
                                       "tests: skipped, 3s left before the deadline (needs 15s)\n")


def test_joins_phases_and_prints_the_summary_last(tmp_path, capsys):
    _cut_run(tmp_path)
    assert summarize.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert lines[-1] == f"summary: 3 rows (0 with errors) from {tmp_path}"
    # triton's row was written before compiled_fused ran: the join still gives its speedup,
    # and the repeat (4.0 ms) replaced the first timing (5.0 ms).
    short = next(line for line in lines if line.startswith("layer fwd+bwd bf16"))
    assert short.endswith("reference 40.0000 | triton 4.0000 [2.0000] | compiled_fused 12.0000")
    rows, skipped = summarize.read_rows(tmp_path)
    joined = summarize.latest(rows["attention"])
    tables.add_speedups(joined)
    triton = next(r for r in joined if r["provider"] == "triton")
    assert (triton["median_ms"], triton["speedup_vs_eager"], triton["speedup_vs_compiled_fused"]) == (4.0, 10.0, 3.0)
    assert triton["speedup_vs_compiled"] == "", "no compiled row was completed"
    assert any("incomplete line" in s for s in skipped) and any("other.csv" in s for s in skipped)
    # The targets of the benchmark, on the joined rows: the fused target is met, compiled has no row.
    assert "layer fwd+bwd: speedup over compiled_fused" in printed
    fused = next(line for line in lines if line.startswith("layer fwd+bwd: speedup over compiled_fused"))
    assert fused.split()[-2:] == ["3.00x", "PASS"]
    compiled = next(line for line in lines if line.startswith("layer fwd+bwd: speedup over reference compiled"))
    assert compiled.split()[-2:] == ["n/a", "MISS"]
    # The script's phases, after the tables.
    assert printed.index("phases:") > printed.index("Targets of bench_attention")
    assert "compiled: cut at its budget" in printed


def test_empty_folder_still_summarizes(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"summary: 0 rows (0 with errors) from {tmp_path}"


def test_summary_needs_no_torch(tmp_path):
    """The GPU check's EXIT trap gives it a few seconds: importing torch could take them all."""
    _cut_run(tmp_path)
    code = ("import sys; from benchmarks import summarize; summarize.main([sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'summarize imported torch'")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("summary: 3 rows")
