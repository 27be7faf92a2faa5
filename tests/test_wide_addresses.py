"""64-bit address arithmetic: elements past 2^31 (a tensor over 4 GB in fp16) are addressed right.

Every Triton kernel's compiled IR has no 32-bit multiplication that feeds an address
(compile_check.narrow_address_products; the CI compile step applies it to every configuration,
this file to one per kernel, so that a failure names the kernel), and the check does find one in
a kernel that has it. The ops that read rows through an index, on a reserved 4.3 GB input on the
CPU: tests/ops/test_contract.py (the ROWS_PAST_2_TO_31 tables); at full size on the GPU:
test_gather_scatter_past_2_to_31_elements in tests/ops/test_theme_gather.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import compile_check
from tests.kernel_cases import ON_GPU

REPO = Path(__file__).resolve().parent.parent
KERNELS = sorted({name for name, _, _ in compile_check.all_configs()})

_TOY = '''
import triton
import triton.language as tl


@triton.jit
def narrow(src_ptr, out_ptr, dim, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + rows * dim, tl.load(src_ptr + rows))


@triton.jit
def wide(src_ptr, out_ptr, dim, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + rows * dim, tl.load(src_ptr + rows))
'''

_CHECK = '''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tools import compile_check
import toy_kernels

found = {}
# The last configuration of each kernel: every switch on (compile_check lists them that way).
for name, signature, constexprs in compile_check.all_configs():
    found[name] = (name, signature, constexprs)
results = {name: compile_check.compile_one(config)[2] for name, config in found.items()}
sig = {"src_ptr": "*fp16", "out_ptr": "*fp16", "dim": "i32", "BLOCK": "constexpr"}
for name in ("narrow", "wide"):
    ttir = triton.compile(ASTSource(getattr(toy_kernels, name), sig, {"BLOCK": 32}),
                          target=GPUTarget("cuda", 90, 32)).asm["ttir"]
    results["toy_" + name] = compile_check.narrow_address_products(ttir)
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def ir_checks(tmp_path_factory):
    """{kernel: compile_one's error ('' when clean), toy_*: the narrow products found}, from one
    process without TRITON_INTERPRET (it compiles for sm_90)."""
    if ON_GPU:
        pytest.skip("the CPU run checks the IR; the GPU run addresses past 2^31 for real")
    folder = tmp_path_factory.mktemp("toy")
    (folder / "toy_kernels.py").write_text(textwrap.dedent(_TOY))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_ir_check_finds_a_32_bit_address_product(ir_checks):
    """The int32 products are found with their source lines (8: program id times the block, 9: row
    index times the width); with the program id widened to int64 there are none."""
    assert [entry.split(":")[:2] for entry in ir_checks["toy_narrow"]] == [["toy_kernels.py", "8"],
                                                                           ["toy_kernels.py", "9"]]
    assert ir_checks["toy_wide"] == []


@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_kernel_addresses_are_64_bit(kernel, ir_checks):
    assert ir_checks[kernel] == ""
