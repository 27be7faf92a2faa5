"""The `mos` command backs large tensors with transparent huge pages (mos.lab.host_memory), and a
user's own THP_MEM_ALLOC_ENABLE is kept."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mos.lab import host_memory

_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Optionally run the command line first (it exits on --version), then print how much of a new
# 64 MiB tensor the kernel backs with huge pages.
HUGE_KB = """
import sys
if sys.argv[1] == "cli":
    from mos.lab import cli
    try:
        cli.main(["--version"])
    except SystemExit:
        pass
import torch
x = torch.ones(16 << 20)
print(sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages")))
"""


def _huge_kb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != host_memory.HUGE_PAGES}
    out = subprocess.run([sys.executable, "-c", HUGE_KB, mode], capture_output=True, text=True, check=True,
                         env={**env, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])     # after the version line


@pytest.mark.skipif(not _THP_MODE.exists() or "[madvise]" not in _THP_MODE.read_text(),
                    reason="needs Linux transparent huge pages in madvise mode (on: every process has them; off: none)")
def test_the_command_line_backs_large_tensors_with_huge_pages():
    assert _huge_kb("plain") == 0           # no advice, no huge pages
    # Advised: the kernel backs the tensor with 2 MiB pages where it finds them free (on a
    # fragmented host fewer than all 32).
    assert _huge_kb("cli") > 0


def test_huge_pages_are_asked_for_unless_the_environment_says(monkeypatch):
    monkeypatch.setenv(host_memory.HUGE_PAGES, "")        # recorded, so that the end restores what was
    monkeypatch.delenv(host_memory.HUGE_PAGES)
    assert host_memory.use_huge_pages() is True
    assert os.environ[host_memory.HUGE_PAGES] == "1"
    monkeypatch.setenv(host_memory.HUGE_PAGES, "0")
    assert host_memory.use_huge_pages() is False
    assert os.environ[host_memory.HUGE_PAGES] == "0"
