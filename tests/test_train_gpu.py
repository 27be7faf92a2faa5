"""The CTR lab on a GPU: a quick profile with `train.device=cuda`, two runs at a time (spawned
workers sharing the card), every model of the hidden-theme study (configs/profile_hidden.yaml's
`models`) with every built-in encoder, on the kernels `backend: auto` picks there. Every run must finish
with finite predictions and name the GPU it trained on, so that a study on a lent GPU finds
nothing to fix before its numbers. The GPU check's last test phase runs it; skipped where torch
sees no CUDA device. (No "cuda" in these names: the GPU check deselects `-k cuda` when the CUDA
extension is not built, and this test does not need it.)"""
import json

import numpy as np
import pytest
import torch

from mos.lab.cli import main
from mos.lab.config_io import load_run_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CONFIG = "configs/profile_hidden.yaml"


def quick_profile_on(device: str, encoder: str, out_dir) -> dict:
    """Run the quick profile on `device`; returns its records by run id (`out_dir/runs/*.json`)."""
    code = main(["profile", "--quick", "--config", CONFIG, "--quiet", "--no-tuning", "--jobs", "2", "--set",
                 f"train.device={device}", f"model.mos.encoder={encoder}", f"train.out_dir={out_dir}"])
    assert code == 0
    return {path.stem: json.loads(path.read_text())["record"] for path in sorted((out_dir / "runs").glob("*.json"))}


@pytest.mark.parametrize("encoder", ["target_attention", "transformer", "sdim", "mamba4rec"])
def test_a_quick_profile_trains_on_the_gpu(tmp_path, encoder):
    records = quick_profile_on("cuda", encoder, tmp_path)
    assert sorted(record["model"] for record in records.values()) == sorted(load_run_config(CONFIG, []).models)
    for run_id, record in records.items():
        assert torch.cuda.get_device_name() in record["machine"], record["machine"]
        assert 0.0 <= record["test"]["auc"] <= 1.0, (run_id, record["test"])
        with np.load(tmp_path / "runs" / f"{run_id}.npz") as npz:
            assert np.isfinite(npz["test_logits"]).all() and np.isfinite(npz["valid_logits"]).all(), run_id
