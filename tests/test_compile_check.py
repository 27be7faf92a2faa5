"""CI step: every Triton kernel compiles to sm_90 machine code (the interpreter is lenient), with no
32-bit multiplication in its address arithmetic (compile_check.narrow_address_products), no spill
to local memory and no fewer resident warps per SM than the floor declared beside the kernel.

The resource rules are checked here on their own: the occupancy arithmetic against values worked
out by hand from the sm_90 limits, and the spill and floor verdicts on toy kernels compiled for
sm_90, one that fits in registers and one that cannot."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tools.compile_check import programs_per_sm, resource_errors

ON_GPU_RUN = os.environ.get("MOS_TEST_DEVICE") == "cuda"
COMPILE_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.skipif(ON_GPU_RUN, reason="the GPU run compiles the kernels for real")
def test_every_kernel_compiles_for_sm90():
    done = subprocess.run([sys.executable, "-m", "tools.compile_check", "--jobs", "2"], env=COMPILE_ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configurations of 18 kernels compiled to sm_90" in done.stdout


@pytest.mark.parametrize("registers, shared, warps, expected", [
    (80, 16384, 4, 6),       # 80 -> 80 regs/thread, 2,560 per warp: 6 warps per quarter = 24 warps
    (122, 34816, 4, 4),      # rounded to 128: 4,096 per warp, 16 warps by registers
    (255, 0, 4, 2),          # 256 per thread: 8,192 per warp, 8 warps
    (32, 0, 4, 16),          # warps bind first: 64 / 4
    (16, 0, 1, 32),          # then the 32-program limit
    (40, 110000, 4, 2),      # shared memory binds: 233,472 / (110,000 + 1,024)
    (64, 0, 8, 4),           # 2,048 per warp: 32 warps by registers, 8 per program
])
def test_programs_per_sm(registers, shared, warps, expected):
    assert programs_per_sm(registers, shared, warps) == expected


def test_resource_verdicts():
    fits = {"registers": 80, "spill_stores": 0, "spill_loads": 0, "shared": 16384, "num_warps": 4,
            "programs_per_sm": 6}
    assert resource_errors("k", fits, {"k": 24}) == []
    assert resource_errors("k", fits, {"k": 32}) == [
        "24 resident warps per SM (6 programs of 4 warps: 80 registers, 16384 B shared), floor 32"]
    assert resource_errors("k", fits, {}) == ["no MIN_WARPS_PER_SM entry beside the kernel"]
    spills = dict(fits, registers=255, spill_stores=16, spill_loads=8, programs_per_sm=2)
    assert resource_errors("k", spills, {"k": 8}) == ["spills 16 B stores / 8 B loads at 255 registers"]
    assert resource_errors("k", spills, {"k": 8}, spill_allowed=True) == []
    assert resource_errors("k", spills, {"k": 16}, spill_allowed=True) == [
        "8 resident warps per SM (2 programs of 4 warps: 255 registers, 16384 B shared), floor 16"]


_TOYS = '''
import triton
import triton.language as tl


@triton.jit
def small(src_ptr, out_ptr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + cols, tl.load(src_ptr + cols) * 2.0)


@triton.jit
def huge(src_ptr, out_ptr, BLOCK: tl.constexpr):
    # A [BLOCK, BLOCK] fp32 tile kept live across a data-dependent loop: far past 255 registers.
    rows = tl.arange(0, BLOCK)
    tile = tl.load(src_ptr + rows[:, None] * BLOCK + rows[None, :])
    acc = tile
    for i in range(tl.load(src_ptr).to(tl.int32)):
        acc = acc * tile + i
    tl.store(out_ptr + rows[:, None] * BLOCK + rows[None, :], acc)
'''

_MEASURE = '''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tools import compile_check
import toy_kernels

out = {}
for name, block in (("small", 128), ("huge", 128)):
    compiled = triton.compile(ASTSource(getattr(toy_kernels, name), {"src_ptr": "*fp32", "out_ptr": "*fp32",
                              "BLOCK": "constexpr"}, {"BLOCK": block}), target=GPUTarget("cuda", 90, 32))
    found = compile_check.ptxas_resources(compiled.asm["ptx"], compile_check._ptxas_path())
    found.update(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps)
    found["programs_per_sm"] = compile_check.programs_per_sm(found["registers"], found["shared"], found["num_warps"])
    out[name] = [found, compile_check.resource_errors(name, found, {"small": 16, "huge": 4})]
print(json.dumps(out))
'''


@pytest.mark.skipif(ON_GPU_RUN, reason="the GPU run compiles the kernels for real")
def test_spills_and_floors_of_compiled_toys(tmp_path):
    (tmp_path / "toy_kernels.py").write_text(textwrap.dedent(_TOYS))
    env = dict(COMPILE_ENV, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd(), COMPILE_ENV.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _MEASURE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    small, small_errors = found["small"]
    assert small["spill_stores"] == 0 and small["registers"] < 64 and small_errors == []
    huge, huge_errors = found["huge"]
    assert huge["spill_stores"] > 0 and huge["registers"] == 255
    assert any(error.startswith("spills") for error in huge_errors)
