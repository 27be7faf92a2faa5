"""The CPU MoS-versus-backbone benchmark runs, writes its table and CSV, and refuses bad options.
No timing is asserted (speed is read from the benchmark's output, never from a test)."""
import csv

import pytest
import torch

from benchmarks import bench_cpu_layer


def test_rows_for_every_config_and_length(tmp_path, capsys):
    tables = bench_cpu_layer.main(["--lengths", "6,12", "--reps", "1", "--out", str(tmp_path)])
    rows, attention = tables["layer"], tables["attention"]
    assert [(r["config"], r["L"]) for r in rows] == [(c, n) for c in bench_cpu_layer.CONFIGS for n in (6, 12)]
    with open(tmp_path / "bench_cpu_layer.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with open(tmp_path / "bench_cpu_attention.csv") as f:
        assert [int(r["L"]) for r in csv.DictReader(f)] == [6, 12]
    out = capsys.readouterr().out
    assert "wall_per_flop_ratio" in out and "matmul_gflops" in out
    for r in attention:
        assert r["flash_ms"] > 0 and r["dense_ms"] > 0 and r["matmul_gflops"] > 0 and r["speedup"] > 0
        assert r["refwd_ms"] > 0 and r["saved_lse_speedup"] > 0
        assert r["tokens"] == next(row["tokens"] for row in rows if row["L"] == r["L"])   # the same histories
    by_config = {(r["config"], r["L"]): r for r in rows}
    # MoS contains its backbone, so it costs more FLOPs than it; over session vectors the global
    # expert's quadratic attention shrinks, and at L = 12 the layer's other experts still dominate.
    assert by_config[("target_attention", 12)]["flop_ratio"] > 1
    assert by_config[("transformer", 12)]["flop_ratio"] > 1
    for r in rows:
        assert r["backbone_ms"] > 0 and r["mos_ms"] > 0
        assert r["wall_per_flop_ratio"] == pytest.approx(r["wall_ratio"] / r["flop_ratio"], rel=0.01)


def test_the_attention_table_counts_flops_as_the_op_s_formulas_do():
    """The GFLOP/s of the attention table divide by what FlopCounterMode counts for the reference
    custom op's forward + backward over the same histories."""
    import mos_kernels as mk
    from torch.utils.flop_counter import FlopCounterMode

    inputs = bench_cpu_layer.make_inputs(20)
    q, k, v = (torch.randn(inputs.values.shape, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        mk.jagged_self_attention(q, k, v, inputs.offsets, num_heads=2, backend="reference").sum().backward()
    assert bench_cpu_layer.attention_flops(inputs.offsets) == counter.get_total_flops()


def test_global_over_sessions_costs_fewer_flops_than_the_backbone_on_long_histories():
    """The FLOP ratio is computed from the ops' jagged formulas: at L = 200 a global expert over
    ~25 session vectors makes the transformer MoS cheaper than its backbone."""
    row = bench_cpu_layer.measure("transformer_global_sessions", 200, reps=1)
    assert row["flop_ratio"] < 1


@pytest.mark.parametrize("config", list(bench_cpu_layer.CONFIGS))
def test_both_sides_skip_the_data_scans(config, monkeypatch):
    """The layer runs its experts' forward with the data-reading checks off; the backbone side
    must too, or it alone pays a NaN scan per op and the wall ratio reads MoS cheaper than it is.
    (The ops' backward checks run on both sides alike, as in training.)"""
    import sys

    from mos_kernels import checks

    real, scans, in_backward = checks.reads_data, {"n": 0}, {"on": False}

    def counting():
        on = real()
        scans["n"] += on and not in_backward["on"]
        return on

    for module in list(sys.modules.values()):       # every module that asks, by its own name
        if getattr(module, "reads_data", None) is real:
            monkeypatch.setattr(module, "reads_data", counting)
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        in_backward["on"] = True
        try:
            return real_backward(self, *args, **kwargs)
        finally:
            in_backward["on"] = False

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    steps = bench_cpu_layer.training_steps(bench_cpu_layer.CONFIGS[config], bench_cpu_layer.make_inputs(8))
    for name, step in steps.items():
        scans["n"] = 0
        step()
        assert scans["n"] == 0, f"{name}: {scans['n']} data scans in the forward"


@pytest.mark.parametrize("argv, word", [(["--configs", "nope"], "--configs"), (["--lengths", "a"], "--lengths"),
                                        (["--reps", "0"], "--reps")])
def test_bad_options_are_refused_by_name(argv, word, capsys):
    with pytest.raises(SystemExit):
        bench_cpu_layer.main(argv)
    assert word in capsys.readouterr().err
