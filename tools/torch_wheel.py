"""Which torch build `make venv` installs: the CPU build wherever the machine has no CUDA.

On Linux, PyPI's `torch` wheel is the CUDA build (several GB of CUDA libraries a machine without
a GPU never uses); PyTorch's own CPU index has the `+cpu` build of the same version. So, for the
torch version pinned in requirements/ci.txt:

- macOS and Windows: what pip resolves (PyPI's wheels there are CPU builds; a Windows GPU build
  comes from PyTorch's CUDA indexes, which this tool does not choose);
- a Linux machine with CUDA (an NVIDIA driver answers `nvidia-smi`): what pip resolves (PyPI's CUDA build);
- otherwise, if pip as configured already resolves a `+cpu` build (a local wheelhouse in its
  find-links, as on our CI machines): that, with no other index asked;
- otherwise: the `+cpu` build from PyTorch's CPU index, PyPI kept for torch's dependencies.

Prints the pip arguments, one per line:  python tools/torch_wheel.py  (--explain says why).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements" / "ci.txt"


def pinned_version(requirements: Path = REQUIREMENTS) -> str:
    """The X of `torch==X` in the requirements file; ValueError if it pins none."""
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(r"\s*torch==([^\s;#]+).*", line)
        if match:
            return match.group(1)
    raise ValueError(f"{requirements}: expected a line torch==<version>, found none")


def install_args(version: str, platform: str, has_cuda: bool, resolved: Optional[str]) -> tuple[List[str], str]:
    """(pip arguments, the reason) for torch `version` on `platform` (sys.platform); `resolved`
    is the version pip resolves for torch==version as configured (None: it resolves none)."""
    plain = [f"torch=={version}"]
    if platform in ("darwin", "win32"):
        return plain, f"{platform}: PyPI's wheels are CPU builds"
    if has_cuda:
        return plain, "CUDA found: PyPI's CUDA build"
    if resolved is not None and resolved.endswith("+cpu"):
        return plain, f"no CUDA; pip already resolves the CPU build {resolved} as configured"
    return (["--index-url", CPU_INDEX, "--extra-index-url", PYPI, f"torch=={version}+cpu"],
            "no CUDA: the CPU build from PyTorch's CPU index")


def has_cuda() -> bool:
    """An NVIDIA driver that answers: what a CUDA build of torch needs to be of any use."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolved_version(version: str) -> Optional[str]:
    """The torch version pip picks for torch==version with its own configuration (no download:
    a dry run's report), or None when it finds none."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--quiet", "--report", "-", f"torch=={version}"], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        return None
    versions = [item["metadata"]["version"] for item in report.get("install", [])
                if item["metadata"]["name"].lower() == "torch"]
    return versions[0] if versions else None


def main(argv: List[str]) -> int:
    version = pinned_version()
    cuda = has_cuda()
    # Ask pip only where its answer decides anything.
    resolved = None if cuda or sys.platform in ("darwin", "win32") else resolved_version(version)
    args, reason = install_args(version, sys.platform, cuda, resolved)
    if "--explain" in argv:
        print(f"torch {version}: {reason}", file=sys.stderr)
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
