"""The CTR lab on a GPU: a quick profile with `train.device=cuda`, two runs at a time (spawned
workers sharing the card), every model kind of the hidden-theme study and both encoders, on the
kernels `backend: auto` picks there. Its runs must finish with finite predictions and name the
GPU they trained on, so that a study on a lent GPU finds nothing to fix before its numbers. The
GPU check runs it (MOS_TEST_DEVICE=cuda); skipped where torch sees no CUDA device."""
import json

import numpy as np
import pytest
import torch

from mos.lab.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = ["backbone", "stacked_backbone", "gshard", "mos", "mos_random_routing", "mos_session_router"]


def quick_profile_on(device: str, encoder: str, out_dir) -> dict:
    """Run the quick profile on `device`; returns its records by run id (`out_dir/runs/*.json`)."""
    code = main(["profile", "--quick", "--config", "configs/profile_hidden.yaml", "--quiet", "--no-tuning", "--jobs", "2", "--set",
                 f"models=[{','.join(MODELS)}]", f"train.device={device}", f"model.mos.encoder={encoder}",
                 f"train.out_dir={out_dir}"])
    assert code == 0
    return {path.stem: json.loads(path.read_text())["record"] for path in sorted((out_dir / "runs").glob("*.json"))}


@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
def test_a_quick_profile_trains_on_cuda(tmp_path, encoder):
    records = quick_profile_on("cuda", encoder, tmp_path)
    assert sorted(record["model"] for record in records.values()) == sorted(MODELS)
    for run_id, record in records.items():
        assert torch.cuda.get_device_name() in record["machine"], record["machine"]
        assert 0.0 <= record["test"]["auc"] <= 1.0, (run_id, record["test"])
        with np.load(tmp_path / "runs" / f"{run_id}.npz") as npz:
            assert np.isfinite(npz["test_logits"]).all() and np.isfinite(npz["valid_logits"]).all(), run_id
