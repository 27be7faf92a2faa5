"""The training process keeps freed memory in malloc's heap: large blocks freed by one step are
reused by the next without faulting in fresh pages, and a user's own MALLOC_* tuning is left alone."""
import os
import subprocess
import sys

import pytest

from mos.lab import host_memory

# Allocate and free a 64 MiB tensor, writing it whole each time: print the page faults of 10
# rounds after 10 that warm malloc's heap up (a few rounds still land at new addresses).
ROUNDS = """
import resource, sys, torch
from mos.lab.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(10):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env=None):
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**(env or {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}),
                              "OMP_NUM_THREADS": "1"})
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_new_page_faults():
    kept, faults_kept = _faults("keep")
    _, faults_default = _faults("default")
    block = (64 << 20) // 4096                 # pages of one block
    assert kept
    assert faults_default > 5 * block          # each block comes fresh from mmap
    assert faults_kept < block // 4            # ... or is an earlier round's, already mapped


def test_the_user_s_malloc_tuning_is_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert host_memory.keep_freed_memory() is False
