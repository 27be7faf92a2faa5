"""jagged_self_attention: causal or full attention within each jagged segment, against the loop
oracle (tests/oracles.py) on awkward lengths, its max_len bound, the reference's length-bucketed
padding (_padded_attention.py), gradcheck, FLOPs counted on the jagged lengths, opcheck of the
reference, and float64 precision. Kernel outputs are poisoned before they run
(tests/ops/conftest.py). The Triton kernel against the reference in fp32 / fp16 / bf16, its
opcheck and FLOP formula; the tile-size rule and length buckets, their compiled configurations
and each tile against the reference. Bad arguments and strided views: the tables at the end,
run by test_contract.py; B = 64, L = 512 on the GPU: the tests marked gpu.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.jagged_self_attention_kernels import LONGEST_BUCKETS, attention_tiles, longest_bucket
from tests import oracles
from tests.gpu_cases import (GPU_DTYPES, RELATIVE_ERROR, cotangent, needs_cuda, relative_error, rounded_leaves,
                             theme_layout)
from tests.input_cases import DIM, STRIDED_DIM, strided_layout, with_value_at
from tests.kernel_cases import (ALL_DTYPES, DTYPES, assert_matches, attention_kinds, backends, check_forward_backward,
                                compare_in_dtype, compare_to_reference, float64_attention_inputs, is_compiled,
                                random_values)
from tests.oracles import generator, randn
from tests.tolerances import assert_close


SELF_ATTENTION_LENGTHS = [[1], [0], [7], [0, 5, 0, 7, 1, 0], [3, 11, 2], [0, 0, 0]]


@pytest.mark.parametrize("backend", backends("jagged_self_attention"))
@pytest.mark.parametrize("lengths", SELF_ATTENTION_LENGTHS, ids=str)
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_jagged_self_attention_matches_oracle(lengths, num_heads, causal, backend, device):
    """Per segment and head, row i attends to rows j <= i (causal) or all rows of its segment;
    fp32 against the float64 oracle, forward and backward (q, k, v)."""
    gen = generator(len(lengths) * 3 + num_heads)
    total, dim = sum(lengths), 6
    inputs = {name: randn(gen, total, dim, dtype=torch.float32, device=device) for name in ("q", "k", "v")}
    offsets = oracles.offsets_of(lengths).to(device)
    check_forward_backward(
        lambda q, k, v: mk.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, causal=causal,
                                                 backend=backend),
        lambda q, k, v: oracles.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, causal=causal),
        inputs, kind="attention", grad_kind="attention_grad", gen=gen)


@pytest.mark.parametrize("backend", backends("jagged_self_attention"))
def test_jagged_self_attention_max_len_bound(backend, device):
    """A max_len bound above the longest segment changes nothing (padding is masked)."""
    gen = generator(16)
    q, k, v = (randn(gen, 12, 4, dtype=torch.float32, device=device) for _ in range(3))
    offsets = torch.tensor([0, 0, 5, 12], device=device)
    assert_close(mk.jagged_self_attention(q, k, v, offsets, num_heads=2, max_len=20, backend=backend),
                 mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend=backend), "attention")


@pytest.mark.parametrize("path", ["cpu_flash", "dense"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("one_bucket", [False, True], ids=["length_buckets", "one_bucket"])
def test_padded_attention_matches_oracle_on_long_uneven_segments(causal, one_bucket, path):
    """The reference's two paddings (length buckets on the CPU, one bucket padded to max_len
    elsewhere) on both its paths (torch's CPU flash attention, the dense one it takes elsewhere)
    against the float64 oracle, forward and backward, on segments that share buckets (9 and 10
    pad to 10, 33 and 40 to 40), empty ones and a single row."""
    from mos_kernels._padded_attention import _cpu_flash, padded_attention_backward, padded_attention_forward
    assert _cpu_flash(*(torch.zeros(1, 8) for _ in range(3)))       # the default on the CPU
    flash = path == "cpu_flash"
    lengths = [0, 9, 10, 17, 33, 1, 40, 0, 3]
    gen = generator(44)
    q, k, v, g_out = (randn(gen, sum(lengths), 8, dtype=torch.float32) for _ in range(4))
    offsets = oracles.offsets_of(lengths)
    got, lse = padded_attention_forward(q, k, v, offsets, 2, 40, causal, one_bucket=one_bucket, flash=flash)
    got_grads = padded_attention_backward(g_out, q, k, v, got, lse, offsets, 2, 40, causal, one_bucket=one_bucket,
                                          flash=flash)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = oracles.jagged_self_attention(*leaves, offsets, num_heads=2, causal=causal)
    expected_grads = torch.autograd.grad(expected, leaves, g_out.double())
    assert_matches(got, expected, "attention")
    assert lse.dtype == torch.float32
    assert_matches(lse, oracles.jagged_attention_logsumexp(q.double(), k.double(), offsets, num_heads=2,
                                                           causal=causal), "attention", msg="log-sum-exp")
    for name, g, e in zip("qkv", got_grads, expected_grads):
        assert_matches(g, e, "attention_grad", msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_flash_path_matches_the_dense_path_in_half_precision(dtype):
    """In bf16 / fp16 the CPU flash path (run in fp32) and the dense path (fp32 probabilities
    rounded to the input dtype for the product) agree to the dtype's attention tolerance,
    forward and backward."""
    from mos_kernels import _padded_attention as pa
    lengths = [0, 9, 1, 33, 12]
    gen = generator(45)
    q, k, v, g_out = (randn(gen, sum(lengths), 8, dtype=torch.float32).to(dtype) for _ in range(4))
    offsets = oracles.offsets_of(lengths)
    for causal in (True, False):
        flash, flash_lse = pa.padded_attention_forward(q, k, v, offsets, 2, None, causal, one_bucket=False, flash=True)
        flash_grads = pa.padded_attention_backward(g_out, q, k, v, flash, flash_lse, offsets, 2, None, causal,
                                                   one_bucket=False, flash=True)
        dense, dense_lse = pa.padded_attention_forward(q, k, v, offsets, 2, None, causal, one_bucket=False, flash=False)
        dense_grads = pa.padded_attention_backward(g_out, q, k, v, dense, dense_lse, offsets, 2, None, causal,
                                                   one_bucket=False, flash=False)
        assert flash.dtype == dtype and flash_lse.dtype == torch.float32
        assert_close(flash.float(), dense.float(), "attention", dtype=dtype)
        assert_close(flash_lse, dense_lse, "attention", dtype=torch.float32, msg="log-sum-exp")
        for name, a, b in zip("qkv", flash_grads, dense_grads):
            assert_close(a.float(), b.float(), "attention", dtype=dtype, msg=name)


def test_the_reference_runs_cpu_flash_where_it_can(monkeypatch):
    """Through the custom op on the CPU the buckets go to torch's CPU flash attention (forward and
    backward, the backward from the forward's saved output and log-sum-exp: no forward again);
    mixed dtypes or another device take the dense path. The private aten ops keep the schemas the
    calls rely on (a torch update that changes them fails here, not in training)."""
    from mos_kernels import _padded_attention as pa
    for op, words in (("_scaled_dot_product_flash_attention_for_cpu", "bool is_causal=False, *, Tensor? attn_mask"),
                      ("_scaled_dot_product_flash_attention_for_cpu_backward", "Tensor logsumexp, float dropout_p, "
                                                                              "bool is_causal, *, Tensor? attn_mask")):
        assert words in str(getattr(torch.ops.aten, op).default._schema), op
    calls = []
    flash, lse_heads = pa._flash, pa._lse_heads
    monkeypatch.setattr(pa, "_flash", lambda *args: calls.append("forward") or flash(*args))
    monkeypatch.setattr(pa, "_lse_heads", lambda *args: calls.append("backward") or lse_heads(*args))
    q, k, v = (torch.randn(12, 8, requires_grad=True) for _ in range(3))
    out = mk.jagged_self_attention(q, k, v, torch.tensor([0, 5, 12]), num_heads=2, backend="reference")
    assert calls == ["forward"] * 2                       # two length buckets (5 and 7)
    out.sum().backward()
    assert calls == ["forward"] * 2 + ["backward"] * 2
    assert not pa._cpu_flash(q, k.double(), v)


@pytest.mark.parametrize("op", ["reference", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_the_ops_log_sum_exp_matches_the_oracle(op, causal):
    """Both ops return each row's log-sum-exp [N, H] in fp32 beside the output (what their
    backwards rebuild the probabilities from), on segments that are empty, of one row or prime."""
    gen = generator(47)
    lengths = [0, 5, 0, 7, 1, 0, 13]
    q, k, v = (randn(gen, sum(lengths), 6, dtype=torch.float32) for _ in range(3))
    offsets = oracles.offsets_of(lengths)
    if op == "reference":
        out, lse = torch.ops.mos.jagged_self_attention_reference(q, k, v, offsets, 3, None, causal)
    else:
        out, lse = torch.ops.mos.jagged_self_attention(q, k, v, offsets, 3, causal, None)
    assert lse.shape == (sum(lengths), 3) and lse.dtype == torch.float32
    q.requires_grad_()
    again = (torch.ops.mos.jagged_self_attention_reference(q, k, v, offsets, 3, None, causal) if op == "reference"
             else torch.ops.mos.jagged_self_attention(q, k, v, offsets, 3, causal, None))
    assert again[0].requires_grad and not again[1].requires_grad     # lse: saved for the backward only
    assert_matches(lse, oracles.jagged_attention_logsumexp(q.double(), k.double(), offsets, num_heads=3,
                                                           causal=causal), "attention", msg="log-sum-exp")
    assert_matches(out, oracles.jagged_self_attention(q.double(), k.double(), v.double(), offsets, num_heads=3,
                                                      causal=causal), "attention")


def test_an_extreme_row_stays_in_its_segment():
    """Padded positions are zeros: a huge or infinite row of one segment (row 0, which the padding
    used to read) leaves every other segment's outputs and gradients finite, on both paths."""
    from mos_kernels._padded_attention import padded_attention_backward, padded_attention_forward
    offsets = torch.tensor([0, 3, 12, 21])
    for flash in (True, False):
        for causal in (True, False):
            q, k, v, g_out = (torch.randn(21, 8) for _ in range(4))
            q[0], k[0] = 1e30, float("nan")
            g_out[0] = float("inf")
            others = slice(3, 21)
            out, lse = padded_attention_forward(q, k, v, offsets, 2, None, causal, one_bucket=False, flash=flash)
            grads = padded_attention_backward(g_out, q, k, v, out, lse, offsets, 2, None, causal, one_bucket=False,
                                              flash=flash)
            for name, t in (("out", out), ("lse", lse), *zip("qkv", grads)):
                assert torch.isfinite(t[others]).all(), (flash, causal, name)


def test_bucket_lengths_pad_by_less_than_a_quarter():
    """Every length fits its bucket with under 25 % padding, and 1..1000 take few buckets."""
    from mos_kernels._padded_attention import bucket_length
    lengths = torch.arange(0, 5001)
    padded = bucket_length(lengths)
    assert padded[0] == 0 and bool((padded >= lengths).all())
    assert bool((padded[1:] < 1.25 * lengths[1:]).all()), int((padded[1:] / lengths[1:]).argmax()) + 1
    assert torch.unique(padded[1:1001]).numel() <= 40


def test_jagged_self_attention_reference_gradcheck():
    """float64 finite differences through the reference custom op (its backward is written out)."""
    gen = generator(45)
    offsets = oracles.offsets_of([3, 0, 5, 1])
    q, k, v = (randn(gen, 9, 4, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend="reference"), (q, k, v))


def test_jagged_self_attention_reference_counts_jagged_flops():
    """FLOP counters see the jagged pairs (4·d forward, 10·d backward per causal pair), not the
    padding of the reference's dense products."""
    from torch.utils.flop_counter import FlopCounterMode
    lengths, dim = [30, 2, 0, 7], 8
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    q, k, v = (torch.randn(sum(lengths), dim, requires_grad=True) for _ in range(3))
    offsets = oracles.offsets_of(lengths)
    with FlopCounterMode(display=False) as forward:
        out = mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend="reference")
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    assert forward.get_total_flops() == 4 * dim * pairs
    assert backward.get_total_flops() == 10 * dim * pairs


@pytest.mark.parametrize("max_len", [None, 12])
def test_opcheck_jagged_self_attention_reference(max_len):
    """Schema, fake tensor and autograd registration of the reference custom op."""
    gen = generator(46)
    q, k, v = (randn(gen, 12, 4, dtype=torch.float32).requires_grad_() for _ in range(3))
    offsets = oracles.offsets_of([5, 0, 7])
    torch.library.opcheck(torch.ops.mos.jagged_self_attention_reference.default, (q, k, v, offsets, 2, max_len, True))


def test_jagged_self_attention_max_len_too_small_is_refused():
    q = torch.randn(6, 4)
    with pytest.raises(ValueError, match="max_len"):
        mk.jagged_self_attention(q, q, q, torch.tensor([0, 5, 6]), num_heads=2, max_len=4, backend="reference")


@pytest.mark.parametrize("backend", ["reference"])   # the kernels compute in fp32 at most
def test_jagged_self_attention_keeps_float64_precision(backend, device):
    """Run in float64, the reference agrees with the float64 oracle to float64 precision."""
    tokens, _, w_key, w_value, offsets = float64_attention_inputs(device)
    q, k, v = tokens, tokens @ w_key[0], tokens @ w_value[0]
    got = mk.jagged_self_attention(q, k, v, offsets, num_heads=2, backend=backend)
    expected = oracles.jagged_self_attention(q.cpu(), k.cpu(), v.cpu(), offsets.cpu(), num_heads=2)
    assert_matches(got, expected, "float64")


# ---- the Triton kernel against the reference in fp32 / fp16 / bf16 --------------------------------

SELF_SEGMENTS = {"one_token": [1], "empty": [0], "mixed": [0, 5, 0, 70, 1, 0], "primes": [3, 11, 2],
                 "two_blocks_and_more": [130]}


@pytest.mark.parametrize("case", list(SELF_SEGMENTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim,num_heads", [(6, 3), (32, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_jagged_self_attention(case, dtype, dim, num_heads, causal, device):
    """Every row and the gradients of q, k and v; q, k and v are column slices of one [N, 3d]
    projection (read in place through their row stride)."""
    lengths = SELF_SEGMENTS[case]
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    inputs = {"qkv": random_values(sum(lengths), 3 * dim, dtype, device)}

    def run(backend):
        def fn(qkv):
            q, k, v = qkv.split(dim, dim=1)
            return mk.jagged_self_attention(q, k, v, offsets, num_heads=num_heads, causal=causal, backend=backend)
        return fn

    compare_to_reference(run("triton"), run("reference"), inputs, dtype, *attention_kinds(dtype))


# ---- operator registration: opcheck, FLOP formula ---------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_opcheck_jagged_self_attention(causal, device):
    qkv = random_values(19, 24, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in qkv.clone().split(8, dim=1))
    offsets = torch.tensor([0, 5, 5, 16, 19], device=device)
    torch.library.opcheck(torch.ops.mos.jagged_self_attention.default, (q, k, v, offsets, 2, causal))


def test_opcheck_jagged_self_attention_backward(device):
    """The backward kernel is a custom op too (no autograd of its own): schema, fake, tracing."""
    q, k, v = random_values(19, 24, torch.float32, device).split(8, dim=1)
    offsets = torch.tensor([0, 5, 5, 16, 19], device=device)
    out, lse = torch.ops.mos.jagged_self_attention(q, k, v, offsets, 2, True)
    torch.library.opcheck(torch.ops.mos.jagged_self_attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, offsets, 2, True))


def test_flop_formula_jagged_self_attention(device):
    """FlopCounterMode counts the kernel: 4·d per (query, key) pair, the jagged count sum L(L+1)/2
    causal."""
    lengths, dim, heads = [5, 0, 11], 8, 2
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    x = random_values(16, dim, torch.float32, device)
    for causal, pairs in ((True, 15 + 66), (False, 25 + 121)):
        with FlopCounterMode(display=False) as counter:
            torch.ops.mos.jagged_self_attention(x, x, x, offsets, heads, causal)
        assert counter.get_total_flops() == 4 * dim * pairs


# ---- tile sizes: the rule, its compiled configurations, each choice against the reference ----

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
    for dtype in ALL_DTYPES:
        for head_dim in (16, 32, 64, 128, 256) if dtype != torch.float16 else (64,):
            for longest in (0,) + LONGEST_BUCKETS:
                block_m, block_n, block_dh, warps, stages = attention_tiles(longest, head_dim, dtype)
                assert block_m == block_n and block_m in (16, 32, 64) and warps in (2, 4) and stages in (2, 3)
                wanted = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DH": block_dh, "num_warps": warps,
                          "num_stages": stages}
                for kernel in ("_self_attention_fwd", "_self_attention_bwd_kv", "_self_attention_bwd_q"):
                    assert is_compiled(kernel, "q_ptr", dtype, wanted), (kernel, dtype, head_dim, longest)


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
    compare_in_dtype(run("triton"), run("reference"), inputs, dtype, "attention")


# ---- at GPU scale (marked gpu: the GPU check selects them with -m gpu; skipped without CUDA) ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_jagged_self_attention_large(dtype):
    dispatch, values = theme_layout(64, 512, 192, torch.float32)
    results = []
    for backend, run_dtype in (("triton", dtype), ("reference", torch.float32)):
        (qkv,) = rounded_leaves([values], dtype, run_dtype)
        q, k, v = qkv.split(64, dim=1)
        out = mk.jagged_self_attention(q, k, v, dispatch.theme_offsets, num_heads=2, backend=backend)
        (out.float() * cotangent(out.shape, dtype, 4)).sum().backward()
        results.append((out, qkv.grad))
    for name, got, want in zip(("out", "qkv gradient"), *results):
        error = relative_error(got, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

def _self_attention(q=None, k=None, v=None, **kw):
    """jagged_self_attention on a good segment of 3 rows, any argument replaced."""
    q, k, v = (torch.randn(3, DIM) if t is None else t for t in (q, k, v))
    return mk.jagged_self_attention(q, k, v, torch.tensor([0, 3]), **{"num_heads": 2, **kw})


BAD_INPUT = {
    # name: (call, exception, argument named)
    "self_attention_k_shape": (lambda: mk.jagged_self_attention(torch.randn(3, DIM), torch.randn(2, DIM),
                                                                torch.randn(3, DIM), torch.tensor([0, 3]),
                                                                num_heads=2), ValueError, "k"),
    "self_attention_offsets_short": (lambda: mk.jagged_self_attention(torch.randn(3, DIM), torch.randn(3, DIM),
                                                                      torch.randn(3, DIM), torch.tensor([0, 2]),
                                                                      num_heads=2), ValueError, "segment_offsets"),
    # NaN or inf in q, k or v: refused (the CPU flash path dropped a NaN key where Triton spread it).
    "self_attention_nan_q": (lambda: _self_attention(q=with_value_at(torch.randn(3, DIM), (1, 0), math.nan)),
                             ValueError, "q"),
    "self_attention_nan_k": (lambda: _self_attention(k=with_value_at(torch.randn(3, DIM), (2, 1), math.nan)),
                             ValueError, "k"),
    "self_attention_inf_v": (lambda: _self_attention(v=with_value_at(torch.randn(3, DIM), (0, 0), math.inf)),
                             ValueError, "v"),
    "self_attention_float_heads": (lambda: _self_attention(num_heads=2.0), TypeError, "num_heads"),
    "self_attention_causal_string": (lambda: _self_attention(causal="no"), TypeError, "causal"),
    "self_attention_negative_max_len": (lambda: _self_attention(max_len=-1), ValueError, "max_len"),
    "self_attention_float_max_len": (lambda: _self_attention(max_len=2.5), TypeError, "max_len"),
}


def _self_attention_case(device):
    offsets, _, _, _, _ = strided_layout(device)
    qkv = {name: random_values(int(offsets[-1]), STRIDED_DIM, torch.float32, device, seed)
           for seed, name in enumerate("qkv")}

    def run(backend, q, k, v, segment_offsets):
        return (mk.jagged_self_attention(q, k, v, segment_offsets, num_heads=2, backend=backend),)
    return run, dict(**qkv, segment_offsets=offsets)


STRIDED_CASES = {"jagged_self_attention": _self_attention_case}
