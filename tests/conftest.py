"""Test-wide set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before
the test modules import mos_kernels (the Makefile sets it too). Tests run on CUDA when
MOS_TEST_DEVICE=cuda (the GPU check script), on CPU otherwise; there the CUDA extension's
kernel code runs under its CPU emulation (MOS_CUDA_EMULATE=1, built on first use), and the
interpreter's associative scans run slice by slice (tests/interpreter_scan.py).

Backend "cuda" is skipped where the extension cannot be had (no compiler, no CUDA torch),
unless MOS_REQUIRE_CUDA_EXT=1 (CI and the GPU check set it): then its absence fails.
"""
import os

if os.environ.get("MOS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MOS_CUDA_EMULATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from tests import interpreter_scan

    interpreter_scan.install()         # scans by slices, not elements: the same bits, minutes sooner


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


def skip_unless_required(what: str) -> None:
    """Skip for the missing `what`, or fail under MOS_REQUIRE_CUDA_EXT=1 (CI, the GPU check)."""
    if os.environ.get("MOS_REQUIRE_CUDA_EXT", "0") == "1":
        pytest.fail(f"MOS_REQUIRE_CUDA_EXT=1 but {what}")
    pytest.skip(what)


def require_cuda_ext():
    """Skip (or, under MOS_REQUIRE_CUDA_EXT=1, fail) when backend "cuda" is unavailable."""
    from mos_kernels.backend import cuda_ext_reason

    reason = cuda_ext_reason()
    if reason is not None:
        skip_unless_required(f"backend 'cuda' is unavailable: {reason}")


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request):
    """Each fused-kernel backend in turn."""
    if request.param == "cuda":
        require_cuda_ext()
    return request.param
