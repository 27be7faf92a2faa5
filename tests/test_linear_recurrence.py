"""linear_recurrence (mos/linear_recurrence.py), the selective scan of the Mamba4Rec encoder:
against the row-by-row oracle on awkward segments (empty, one row, prime lengths, segments that
start and end on and off chunk boundaries, enough rows for three levels of chunks), forward and
both gradients; gradcheck and opcheck of the custom op; fp16/bf16; the FLOPs counters see; bad
input named; on a CUDA device (the GPU check), the long setting's shape in fp32/fp16/bf16 and
bitwise repeatable."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mos.linear_recurrence import linear_recurrence, shift_rows
from tests import oracles
from tests.gpu_cases import GPU_DTYPES, RELATIVE_ERROR, cotangent, needs_cuda, relative_error, rounded_leaves
from tests.kernel_cases import assert_matches
from tests.tolerances import assert_close

LENGTHS = [0, 1, 37, 0, 2, 13, 1, 0]


def _inputs(lengths=LENGTHS, shape=(3, 2), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    a = torch.rand(n, *shape, generator=gen).mul(0.98).add(0.01).to(dtype)    # decays in (0, 1)
    b = torch.randn(n, *shape, generator=gen).to(dtype)
    return a, b, oracles.offsets_of(lengths)


# CHUNK = 16: [16, 16, 32, 15, 17] puts boundaries on and beside chunk edges; 4,418 rows make 277
# chunks, then 18, then 2 (three levels); [64, 65] two levels.
@pytest.mark.parametrize("lengths", [LENGTHS, [1], [5], [0, 0], [1, 1, 1], [64, 65], [16, 16, 32, 15, 17],
                                     [0, 300, 1, 17, 4100]], ids=lambda lengths: str(lengths)[:30])
def test_the_scan_matches_the_row_by_row_oracle(lengths):
    """Forward and the gradients of a and b equal the float64 loop's, segment boundaries kept."""
    a, b, offsets = _inputs(lengths)
    a.requires_grad_(), b.requires_grad_()
    h = linear_recurrence(a, b, offsets)
    leaves = [t.detach().double().requires_grad_() for t in (a, b)]
    expected = oracles.linear_recurrence(*leaves, offsets)
    assert_matches(h, expected, "reduction")
    if h.numel():
        g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(h, (a, b), g)
        want = torch.autograd.grad(expected, leaves, g.double(), allow_unused=True, materialize_grads=True)
        for name, x, y in zip("ab", got, want):
            assert_matches(x, y, "reduction", msg=name)


def test_gradcheck_and_opcheck():
    a, b, offsets = _inputs([3, 0, 6, 1], shape=(2,), dtype=torch.float64)
    a, b = a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_recurrence(a, b, offsets), (a, b))
    torch.library.opcheck(torch.ops.mos.linear_recurrence.default, (a.float(), b.float(), offsets))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_scans_in_fp32(dtype):
    a, b, offsets = _inputs(dtype=dtype)
    h = linear_recurrence(a, b, offsets)
    assert h.dtype == dtype
    assert_close(h.float(), linear_recurrence(a.float(), b.float(), offsets), "reduction", dtype=dtype)


def test_flop_counters_see_the_recurrence_not_the_scan():
    """2 FLOPs per element forward (a multiply-add), 3 backward, whatever the number of steps."""
    a, b, offsets = _inputs()
    a.requires_grad_(), b.requires_grad_()
    with FlopCounterMode(display=False) as forward:
        h = linear_recurrence(a, b, offsets)
    with FlopCounterMode(display=False) as backward:
        h.sum().backward()
    assert forward.get_total_flops() == 2 * b.numel()
    assert backward.get_total_flops() == 3 * b.numel()


@pytest.mark.parametrize("num_rows", [0, 1, 5])
def test_shift_rows_moves_rows_down_and_fills_zeros(num_rows):
    """Mamba4Rec's causal convolution reads row t - step through it: every step, past the end too."""
    x = torch.randn(num_rows, 2, 3)
    for step in range(num_rows + 2):
        expected = torch.zeros_like(x)
        expected[step:] = x[:max(num_rows - step, 0)]
        assert torch.equal(shift_rows(x, step), expected), step


@pytest.mark.parametrize("change, error, words", [
    (lambda a, b, o: (a[:, :1], b, o), ValueError, ["a", "shape of b"]),
    (lambda a, b, o: (a.double(), b, o), TypeError, ["a", "float32", "float64"]),
    (lambda a, b, o: (a, b.index_fill(0, torch.tensor([3]), float("nan")), o), ValueError, ["b", "finite"]),
    (lambda a, b, o: (a, b, o.flip(0)), ValueError, ["segment_offsets"]),
    (lambda a, b, o: (a, b.long(), o), TypeError, ["b", "int64"]),
])
def test_bad_input_is_named(change, error, words):
    a, b, offsets = change(*_inputs())
    with pytest.raises(error) as info:
        linear_recurrence(a, b, offsets)
    for word in words:
        assert word in str(info.value)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_the_scan_at_scale_on_cuda_matches_float64_and_repeats_bitwise(dtype):
    """The long setting's shape on the card (64 histories of 112-565 rows, Mamba4Rec's D * S = 1024
    channels, four levels of chunks): h and both gradients in dtype against the float64 scan of
    the same rounded inputs, and a second run bitwise equal to the first (no atomics)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.randint(112, 566, (64,), device="cuda", generator=gen)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    num_rows = int(offsets[-1])
    a = torch.rand(num_rows, 64, 16, device="cuda", generator=gen).mul(0.98).add(0.01)
    b = torch.randn(num_rows, 64, 16, device="cuda", generator=gen)
    g = cotangent(b.shape, dtype, 1)
    runs = []
    for run_dtype in (dtype, dtype, torch.float64):
        leaves = rounded_leaves([a, b], dtype, run_dtype)
        h = linear_recurrence(*leaves, offsets)
        h.backward(g.to(run_dtype))
        runs.append([h, *(leaf.grad for leaf in leaves)])
    for name, first, again, want in zip(("h", "grad a", "grad b"), *runs):
        assert torch.equal(first, again), f"{name}: two runs differ"
        error = relative_error(first, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"
