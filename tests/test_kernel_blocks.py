"""The block sizes the row and attention kernels launch with: the rules themselves (what they
return for representative inputs, and that compile_check lists every return value), and each
choice against the reference forward and backward on short, long and empty segments.

On the CPU these run under TRITON_INTERPRET=1 in fp32 and fp16; the GPU check adds bf16.
"""
from __future__ import annotations

import math

import pytest
import torch

import mos_kernels as mk
from tools import compile_check
from mos_kernels._alloc import poisoned_outputs
from mos_kernels.expert_target_attention_kernels import attention_blocks
from mos_kernels.jagged_self_attention_kernels import LONGEST_BUCKETS, attention_tiles, longest_bucket
from mos_kernels.theme_gather import inverse_of, row_blocks
from tests.kernel_cases import DTYPES, random_values
from tests.tolerances import assert_close

ALL = (torch.float32, torch.float16, torch.bfloat16)
NAMES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


def _listed(kernel: str, ptr_arg: str):
    """{(pointer type, constexprs)} of `kernel` in compile_check, the pointer typed by ptr_arg."""
    return [(sig[ptr_arg], const) for name, sig, const in compile_check.all_configs() if name == kernel]


def _is_listed(kernel, ptr_arg, dtype, wanted):
    return any(ptr == NAMES[dtype] and all(const.get(k) == v for k, v in wanted.items())
               for ptr, const in _listed(kernel, ptr_arg))


# ----------------------------------------------------------------------------- the rules

@pytest.mark.parametrize("dim,dtype,expected", [
    (64, torch.bfloat16, (128, 64, 8)), (256, torch.float32, (16, 256, 4)), (64, torch.float32, (64, 64, 4)),
    (16, torch.float16, (256, 16, 4)), (256, torch.bfloat16, (32, 256, 8)), (100, torch.float16, (64, 128, 8))])
def test_row_blocks(dim, dtype, expected):
    assert row_blocks(dim, dtype) == expected


def test_every_row_block_is_compiled():
    """~16 KB a program at most, powers of two, 32 tile elements a thread, and compile_check
    compiles exactly what the wrappers launch at every supported width."""
    for dtype in ALL:
        for dim in range(9, 257):
            block_r, block_d, warps = row_blocks(dim, dtype)
            assert block_r & (block_r - 1) == 0 and block_d >= dim
            assert block_r * block_d * dtype.itemsize <= 16384
            assert block_r * block_d <= 32 * 32 * warps
            wanted = {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": warps}
            for kernel, arg in (("_gather_rows", "out_ptr"), ("_scatter_rows", "out_ptr"), ("_row_dot", "a_ptr")):
                assert _is_listed(kernel, arg, dtype, wanted), (kernel, dtype, dim)


@pytest.mark.parametrize("dim,dtype,backward,expected", [
    (64, torch.bfloat16, False, (32, 64, 4, 3)), (64, torch.bfloat16, True, (16, 64, 4, 3)),
    (128, torch.bfloat16, True, (16, 128, 4, 3)), (256, torch.bfloat16, True, (16, 256, 8, 3)),
    (64, torch.float32, False, (32, 64, 4, 3)), (128, torch.float32, False, (16, 128, 4, 3)),
    (256, torch.float32, False, (16, 256, 8, 3)), (128, torch.float32, True, (16, 128, 8, 3)),
    (6, torch.float16, False, (32, 16, 4, 3))])
def test_target_attention_blocks(dim, dtype, backward, expected):
    assert attention_blocks(dim, dtype, backward) == expected


def test_every_target_attention_block_is_compiled():
    for dtype in ALL:
        for dim in (16, 32, 64, 128, 256) if dtype != torch.float16 else (64,):
            for kernel, backward in (("_target_attention_fwd", False), ("_target_attention_bwd", True)):
                block_t, block_d, warps, stages = attention_blocks(dim, dtype, backward)
                wanted = {"BLOCK_T": block_t, "BLOCK_D": block_d, "NUM_STAGES": stages, "num_warps": warps,
                          "num_stages": stages}
                assert _is_listed(kernel, "tokens_ptr", dtype, wanted), (kernel, dtype, dim)


@pytest.mark.parametrize("max_len,bucket", [(None, 0), (0, 16), (1, 16), (16, 16), (17, 32), (32, 32), (33, 64),
                                            (64, 64), (65, 0), (5000, 0)])
def test_longest_bucket(max_len, bucket):
    assert longest_bucket(max_len) == bucket


@pytest.mark.parametrize("longest,head_dim,dtype,expected", [
    (0, 32, torch.bfloat16, (64, 64, 32, 4, 3)), (64, 64, torch.bfloat16, (64, 64, 64, 4, 3)),
    (32, 32, torch.bfloat16, (32, 32, 32, 4, 3)), (16, 64, torch.bfloat16, (16, 16, 64, 2, 3)),
    (0, 128, torch.float16, (32, 32, 128, 4, 3)), (0, 256, torch.bfloat16, (16, 16, 256, 4, 3)),
    (16, 128, torch.bfloat16, (16, 16, 128, 2, 3)), (0, 128, torch.float32, (16, 16, 128, 4, 2)),
    (0, 32, torch.float32, (16, 16, 32, 2, 2)), (32, 64, torch.float32, (16, 16, 64, 4, 2)),
    (0, 8, torch.bfloat16, (64, 64, 16, 4, 3))])
def test_self_attention_tiles(longest, head_dim, dtype, expected):
    assert attention_tiles(longest, head_dim, dtype) == expected


def test_every_self_attention_tile_is_compiled():
    for dtype in ALL:
        for head_dim in (16, 32, 64, 128, 256) if dtype != torch.float16 else (64,):
            for longest in (0,) + LONGEST_BUCKETS:
                block_m, block_n, block_dh, warps, stages = attention_tiles(longest, head_dim, dtype)
                assert block_m == block_n and block_m in (16, 32, 64) and warps in (2, 4) and stages in (2, 3)
                wanted = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DH": block_dh, "num_warps": warps,
                          "num_stages": stages}
                for kernel in ("_self_attention_fwd", "_self_attention_bwd_kv", "_self_attention_bwd_q"):
                    assert _is_listed(kernel, "q_ptr", dtype, wanted), (kernel, dtype, head_dim, longest)


# ----------------------------------------------------------------------------- each choice against the reference

def _grads(fn, inputs, dtype, seed=3):
    """Output and gradients for one random cotangent representable in `dtype` (the kernel's)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (out.float() * cotangent.to(device=out.device, dtype=torch.float32)).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}


def _check(triton_fn, reference_fn, inputs, dtype, kind):
    """The Triton op in `dtype` against the reference on fp32 copies of the same inputs."""
    out, grads = _grads(triton_fn, inputs, dtype)
    ref, ref_grads = _grads(reference_fn, {k: v.float() for k, v in inputs.items()}, dtype)
    assert_close(out.float(), ref, kind, dtype=dtype, msg="output")
    for name, grad in grads.items():
        assert_close(grad.float(), ref_grads[name], kind if kind != "attention" or dtype != torch.float32
                     else "attention_grad", dtype=dtype, msg=f"gradient of {name}")


@pytest.mark.parametrize("dim", [16, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows", [0, 1, 300])
def test_gather_scatter_blocks(dim, dtype, num_rows, device):
    """Several programs and a partial last one at every width's rows per program (256, 128 and
    16-32 rows): gather and scatter with a gate, and both gradients."""
    num_tokens = 260
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, num_tokens, (num_rows,), generator=gen).to(device)
    inverse = inverse_of(index, num_tokens)
    inputs = {"values": random_values(num_tokens, dim, dtype, device),
              "gate": (torch.rand(num_rows, generator=gen) + 0.5).to(device=device, dtype=dtype)}
    rows = {"rows": random_values(num_rows, dim, dtype, device, seed=2), "gate": inputs["gate"]}
    for backend in ("triton", "reference"):
        assert mk.theme_gather(inputs["values"], index, inputs["gate"], inverse_index=inverse, backend=backend).shape \
            == (num_rows, dim)

    def gather(backend):
        return lambda values, gate: mk.theme_gather(values, index, gate, inverse_index=inverse, backend=backend)

    def scatter(backend):
        return lambda rows, gate: mk.theme_scatter(rows, index, gate, num_tokens=num_tokens, inverse_index=inverse,
                                                   backend=backend)
    _check(gather("triton"), gather("reference"), inputs, dtype, "reduction")
    _check(scatter("triton"), scatter("reference"), rows, dtype, "reduction")


@pytest.mark.parametrize("dim,num_heads", [(16, 1), (64, 4), (256, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[0, 3, 16, 0], [0, 95, 33, 130]], ids=["short", "long"])
def test_target_attention_blocks_against_reference(dim, num_heads, dtype, lengths, device):
    """Gathered, gated rows over short and long segments (partial, whole and several tiles of
    the forward's 32 / 16 rows and the backward's 16), with empty ones, at every width rule."""
    num_experts, num_tokens = 2, 150
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    gen = torch.Generator().manual_seed(5)
    index = torch.randint(0, num_tokens, (sum(lengths),), generator=gen).to(device)
    inverse = inverse_of(index, num_tokens)
    inputs = {"tokens": random_values(num_tokens, dim, dtype, device),
              "query": random_values(len(lengths), dim, dtype, device, seed=1),
              "w_key": random_values(num_experts * dim, dim, dtype, device, seed=2).view(num_experts, dim, dim)
              / math.sqrt(dim),
              "w_value": random_values(num_experts * dim, dim, dtype, device, seed=4).view(num_experts, dim, dim)
              / math.sqrt(dim),
              "gate": (torch.rand(sum(lengths), generator=gen) + 0.5).to(device=device, dtype=dtype)}

    def run(backend):
        def fn(tokens, query, w_key, w_value, gate):
            return mk.expert_target_attention(tokens, query, w_key, None, w_value, None, offsets, num_heads=num_heads,
                                              gather_index=index, row_gate=gate, inverse_index=inverse,
                                              backend=backend)
        return fn
    _check(run("triton"), run("reference"), inputs, dtype, "attention")


@pytest.mark.parametrize("dim,num_heads", [(32, 2), (64, 1), (256, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths,max_len", [([0, 16, 1, 0, 9], 16), ([31, 0, 17], 32), ([0, 64, 5], 64),
                                             ([130, 0, 3, 70], None)], ids=["16", "32", "64", "long"])
def test_self_attention_tiles_against_reference(dim, num_heads, dtype, lengths, max_len, device):
    """Each tile size the rule picks (16 / 32 / 64 rows, and the width caps), causal, with
    empty segments; q, k, v column slices of one projection."""
    if dim == 256 and max_len is None:
        lengths = [40, 0, 3]            # the interpreter is slow at this width; 16-row tiles all the same
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = {"qkv": random_values(sum(lengths), 3 * dim, dtype, device)}

    def run(backend):
        def fn(qkv):
            q, k, v = qkv.split(dim, dim=1)
            return mk.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, max_len=max_len, backend=backend)
        return fn
    _check(run("triton"), run("reference"), inputs, dtype, "attention")
