"""64-bit address arithmetic: elements past 2^31 (a tensor over 4 GB in fp16) are addressed right.

On the CPU, without 4 GB of memory:
- every Triton kernel's compiled IR has no 32-bit multiplication that feeds an address
  (compile_check.narrow_address_products; the CI compile step applies it to every configuration,
  this file to one per kernel, so that a failure names the op), and the check does find one in
  a kernel that has it;
- the ops read rows past 2^31 elements of an input that is only reserved: the OS maps a page on
  first touch, so a 4.3 GB tensor of which a few rows are written costs a few pages. That covers
  every op that reads token rows through an index (gather, the gate's gradient, the gathered
  attention), on every backend.
At full size on the GPU: tests/test_kernels_gpu.py (the gather's output and its backward).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mos_kernels as mk
from tools import compile_check
from mos_kernels.backend import IMPLEMENTED
from tests.conftest import require_cuda_ext
from tests.kernel_cases import ON_GPU, random_values
from tests.tolerances import assert_close

# Rows of a reserved fp16 input: WIDE_ROWS x WIDE_DIM = 2^31 + 8,192 elements, so its last rows
# start past 2^31 (the widest row the attention kernels take is 256).
WIDE_ROWS, WIDE_DIM = 8_388_640, 256
TOUCHED = [0, 5, WIDE_ROWS - 40, WIDE_ROWS - 1]     # the last two past 2^31 elements
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


# ----------------------------------------------------------------------------- reads past 2^31

def _reserved_tokens():
    """[WIDE_ROWS, WIDE_DIM] fp16 of which only the TOUCHED rows are written (random values)."""
    tokens = torch.empty(WIDE_ROWS, WIDE_DIM, dtype=torch.float16)
    tokens[TOUCHED] = random_values(len(TOUCHED), WIDE_DIM, torch.float16, "cpu")
    return tokens


def _index_and_gate():
    index = torch.tensor(TOUCHED[::-1] + TOUCHED[2:])
    # Gates exact in fp16: the reference rounds the gate to the rows' dtype, the kernels do not.
    gate = torch.tensor([0.5, 1.25, -2.0, 0.75, 1.5, -0.25]).requires_grad_()
    return index, gate


def _ops_reading_through_an_index():
    return [(op, backend) for op in ("theme_gather", "expert_target_attention")
            for backend in IMPLEMENTED[op]]


@pytest.mark.skipif(ON_GPU, reason="CPU memory trick; the GPU run allocates for real")
@pytest.mark.parametrize("op,backend", _ops_reading_through_an_index())
def test_rows_past_2_to_31_elements_read_through_an_index(op, backend):
    """The op on the gathered rows of a reserved 4.3 GB input equals the op on a dense copy of
    those rows (forward, and the gate's gradient, which reads the rows again)."""
    if backend == "cuda":
        require_cuda_ext()
    tokens = _reserved_tokens()
    index, gate = _index_and_gate()
    small = tokens[index].clone()
    small_index = torch.arange(index.numel())
    small_gate = gate.detach().clone().requires_grad_()
    # The reserved rows were never written: a data check would read all 4.3 GB of them.
    with mk.data_checks(False):
        out = _run_op(op, tokens, index, gate, backend)
        expected = _run_op(op, small, small_index, small_gate, backend)
    assert torch.equal(out, expected), f"{op}[{backend}]: rows past 2^31 elements read wrong"
    weight = random_values(out.shape[0], out.shape[1], torch.float32, "cpu", seed=4)
    (out.float() * weight).sum().backward()
    (expected.float() * weight).sum().backward()
    assert_close(gate.grad, small_gate.grad, "reduction", msg=f"{op}[{backend}] gate gradient")


def _run_op(op, tokens, index, gate, backend):
    if op == "theme_gather":
        return mk.theme_gather(tokens, index, gate, backend=backend)
    # Two experts over the gathered rows; small weights keep fp16 attention scores moderate.
    weights = random_values(2 * WIDE_DIM, WIDE_DIM, torch.float16, "cpu", seed=3).view(2, WIDE_DIM, WIDE_DIM) * 0.05
    offsets = torch.tensor([0, 2, index.numel()])
    return mk.expert_target_attention(tokens, weights[:, 1], weights, None, weights.flip(0), None, offsets,
                                      num_heads=4, gather_index=index, row_gate=gate, backend=backend)
