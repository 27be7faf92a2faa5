"""`make venv` takes torch's CPU build wherever the machine has no CUDA (tools/torch_wheel.py),
and on this machine the build pip already resolves from its wheelhouse."""
import subprocess
import sys
from pathlib import Path

import pytest

from tools import torch_wheel
from tools.torch_wheel import CPU_INDEX, install_args

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ["torch==2.13.0"]
CPU = ["--index-url", CPU_INDEX, "--extra-index-url", torch_wheel.PYPI, "torch==2.13.0+cpu"]

CASES = {
    # (platform, CUDA found, what pip resolves as configured) -> pip arguments
    "linux_cuda": (("linux", True, "2.13.0"), PLAIN),
    "linux_no_cuda_pypi_only": (("linux", False, "2.13.0"), CPU),
    "linux_no_cuda_nothing_resolves": (("linux", False, None), CPU),
    "linux_no_cuda_local_cpu_wheel": (("linux", False, "2.13.0+cpu"), PLAIN),
    "windows_no_cuda": (("win32", False, "2.13.0"), PLAIN),      # PyPI's Windows wheels are CPU builds
    "windows_cuda": (("win32", True, "2.13.0"), PLAIN),
    "macos": (("darwin", False, "2.13.0"), PLAIN),
}


@pytest.mark.parametrize("case", CASES)
def test_the_cpu_build_wherever_there_is_no_cuda(case):
    (platform, cuda, resolved), expected = CASES[case]
    args, reason = install_args("2.13.0", platform, cuda, resolved)
    assert args == expected and reason


def test_the_pin_is_the_requirements_one(tmp_path):
    assert torch_wheel.pinned_version() == "2.13.0"
    empty = tmp_path / "ci.txt"
    empty.write_text("numpy<2.4\n")
    with pytest.raises(ValueError, match=r"ci\.txt: expected a line torch==<version>, found none"):
        torch_wheel.pinned_version(empty)


def test_make_venv_installs_torch_as_the_tool_says():
    makefile = (ROOT / "Makefile").read_text()
    assert "tools/torch_wheel.py" in makefile.split("$(STAMP):", 1)[1].split("\nrun:", 1)[0]


def test_on_this_machine_the_answer_is_a_cpu_build_or_cuda():
    """Run as make runs it: the arguments name the pinned torch, and without CUDA they are the
    CPU build (the one pip resolves from the wheelhouse, or the CPU index's)."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "torch_wheel.py"), "--explain"],
                          capture_output=True, text=True, check=True, timeout=300)
    args = done.stdout.split()
    assert args[-1].startswith("torch==2.13.0") and done.stderr.startswith("torch 2.13.0: ")
    if not torch_wheel.has_cuda() and sys.platform == "linux":
        assert args == CPU or (args == PLAIN and "resolves the CPU build" in done.stderr), (args, done.stderr)
