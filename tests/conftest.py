"""Test-wide set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before
the test modules import mos_kernels (the Makefile sets it too). Tests run on CUDA when
MOS_TEST_DEVICE=cuda (the GPU check script), on CPU otherwise.
"""
import os

if os.environ.get("MOS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# xdist already runs one worker per core; torch's intra-op threads on top of that
# oversubscribe the cores (the layer tests ran 5x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def device():
    return torch.device(os.environ.get("MOS_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
