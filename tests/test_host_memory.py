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


def _faults(mode: str):
    # Without the user's malloc tuning, and without torch's own huge-page advice (a huge page
    # faults in once for 512 small ones).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**env, "OMP_NUM_THREADS": "1"})
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_new_page_faults():
    kept, faults_kept = _faults("keep")
    _, faults_default = _faults("default")
    assert kept
    # Each block comes fresh from mmap, or is an earlier round's, already mapped. (On a system
    # whose transparent huge pages are always on, both counts shrink alike.)
    assert faults_default > 0 and faults_kept * 20 < faults_default


@pytest.mark.parametrize("name, value", [("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0"),
                                         ("LD_PRELOAD", "libjemalloc.so.2")])
def test_the_user_s_malloc_tuning_is_kept(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert host_memory.keep_freed_memory() is False
