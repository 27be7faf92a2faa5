"""linear_recurrence (mos_kernels/linear_recurrence.py), the selective scan of the Mamba4Rec
encoder: each backend against the row-by-row oracle on awkward segments (empty, one row, prime
lengths, segments that start and end on and off the reference's chunk edges, enough rows for
three levels of chunks, channel counts off the Triton block), forward and both gradients; the
Triton kernels against the reference in fp32/fp16 (bf16 on the GPU); gradcheck and opcheck of the
custom ops; the FLOPs counters see; every launch configuration compiled; bad input named and
strided views (the contract's tables); on a CUDA device (the GPU check), the long setting's shape
in fp32/fp16/bf16 against float64 and bitwise repeatable."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.linear_recurrence import recurrence_blocks
from tests import oracles
from tests.gpu_cases import GPU_DTYPES, RELATIVE_ERROR, cotangent, needs_cuda, relative_error, rounded_leaves
from tests.input_cases import strided_layout
from tests.kernel_cases import DTYPES, ON_GPU, assert_matches, backends, compare_to_reference, is_compiled, random_values

LENGTHS = [0, 1, 37, 0, 2, 13, 1, 0]


def _inputs(lengths=LENGTHS, shape=(3, 2), dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    a = torch.rand(n, *shape, generator=gen).mul(0.98).add(0.01).to(device=device, dtype=dtype)   # decays in (0, 1)
    b = torch.randn(n, *shape, generator=gen).to(device=device, dtype=dtype)
    return a, b, oracles.offsets_of(lengths).to(device)


# The reference's CHUNK = 16: [16, 16, 32, 15, 17] puts boundaries on and beside chunk edges; 4,418
# rows make 277 chunks, then 18, then 2 (three levels); [64, 65] two levels.
ORACLE_LENGTHS = [LENGTHS, [1], [5], [0, 0], [1, 1, 1], [64, 65], [16, 16, 32, 15, 17], [0, 300, 1, 17, 4100]]


# The 4,418-row case tests the reference's chunk levels; the Triton kernel has none, and under the
# interpreter its thousands of serial rows take 20 s, so it runs there on a GPU only.
ORACLE_CASES = [pytest.param(lengths, backend, id=f"{str(lengths)[:30]}-{backend}") for lengths in ORACLE_LENGTHS
                for backend in backends("linear_recurrence")
                if backend == "reference" or sum(lengths) < 1000 or ON_GPU]


@pytest.mark.parametrize("lengths, backend", ORACLE_CASES)
def test_the_scan_matches_the_row_by_row_oracle(lengths, backend, device):
    """Forward and the gradients of a and b equal the float64 loop's, segment boundaries kept."""
    a, b, offsets = _inputs(lengths, device=device)
    a.requires_grad_(), b.requires_grad_()
    h = mk.linear_recurrence(a, b, offsets, backend=backend)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (a, b)]
    expected = oracles.linear_recurrence(*leaves, offsets.cpu())
    assert_matches(h, expected, "reduction")
    if h.numel():
        g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(h, (a, b), g.to(device))
        want = torch.autograd.grad(expected, leaves, g.double(), allow_unused=True, materialize_grads=True)
        for name, x, y in zip("ab", got, want):
            assert_matches(x, y, "reduction", msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 5, 128, 300])
def test_triton_equals_the_reference_in_its_dtype(width, dtype, device):
    """Channel counts below, at and across the kernel's block (several programs per segment)."""
    a, b, offsets = _inputs([0, 9, 1, 0, 21, 4], shape=(width,), dtype=dtype, seed=width, device=device)

    def run(backend):
        return lambda a, b: mk.linear_recurrence(a, b, offsets, backend=backend)
    compare_to_reference(run("triton"), run("reference"), dict(a=a, b=b), dtype, "reduction", "reduction")


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")   # the interpreter's inf * 0
def test_a_first_row_reads_no_a_on_either_backend():
    """h = b at a segment's first row whatever a holds there: with the data checks off, a non-finite
    a at a first row must not reach h (a * 0 would be NaN)."""
    a = torch.tensor([[float("inf")], [0.5], [float("nan")], [0.5]])
    b = torch.ones(4, 1)
    offsets = torch.tensor([0, 2, 4])
    with mk.data_checks(False):
        for backend in backends("linear_recurrence"):
            assert torch.equal(mk.linear_recurrence(a, b, offsets, backend=backend),
                               torch.tensor([[1.0], [1.5], [1.0], [1.5]])), backend


def test_gradcheck_and_opcheck():
    a, b, offsets = _inputs([3, 0, 6, 1], shape=(2,), dtype=torch.float64)
    a, b = a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mk.linear_recurrence(a, b, offsets), (a, b))
    torch.library.opcheck(torch.ops.mos.linear_recurrence_reference.default, (a.float(), b.float(), offsets))
    flat = (a.float().detach().view(10, 2).requires_grad_(), b.float().detach().view(10, 2).requires_grad_())
    torch.library.opcheck(torch.ops.mos.linear_recurrence.default, (*flat, offsets),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_scans_in_fp32(dtype):
    a, b, offsets = _inputs(dtype=dtype)
    h = mk.linear_recurrence(a, b, offsets)
    assert h.dtype == dtype
    assert_matches(h, mk.linear_recurrence(a.float(), b.float(), offsets), "reduction")


@pytest.mark.parametrize("backend", backends("linear_recurrence"))
def test_flop_counters_see_the_recurrence_not_the_scan(backend):
    """2 FLOPs per element forward (a multiply-add), 3 backward, whatever the number of steps."""
    a, b, offsets = _inputs()
    a.requires_grad_(), b.requires_grad_()
    with FlopCounterMode(display=False) as forward:
        h = mk.linear_recurrence(a, b, offsets, backend=backend)
    with FlopCounterMode(display=False) as backward:
        h.sum().backward()
    assert forward.get_total_flops() == 2 * b.numel()
    assert backward.get_total_flops() == 3 * b.numel()


def test_every_launch_configuration_is_compiled():
    """Every width maps to a (BLOCK_C, num_warps) that tools/compile_check compiles for sm_90."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for width in (1, 2, 3, 17, 64, 100, 128, 129, 1024, 5000):
            block_c, num_warps = recurrence_blocks(width)
            for kernel, ptr in (("_recurrence_fwd", "a_ptr"), ("_recurrence_bwd", "g_ptr")):
                assert is_compiled(kernel, ptr, dtype, {"BLOCK_C": block_c, "num_warps": num_warps}), \
                    (kernel, dtype, width)


# ---- on a CUDA device ---------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_the_scan_at_scale_on_cuda_matches_float64_and_repeats_bitwise(dtype, backend):
    """The long setting's shape on the card (64 histories of 112-565 rows, Mamba4Rec's D * S = 1024
    channels, four levels of the reference's chunks): h and both gradients in dtype against the
    float64 reference of the same rounded inputs, and a second run bitwise equal to the first (no
    atomics)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.randint(112, 566, (64,), device="cuda", generator=gen)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    num_rows = int(offsets[-1])
    a = torch.rand(num_rows, 64, 16, device="cuda", generator=gen).mul(0.98).add(0.01)
    b = torch.randn(num_rows, 64, 16, device="cuda", generator=gen)
    g = cotangent(b.shape, dtype, 1)
    runs = []
    for run_dtype, run_backend in ((dtype, backend), (dtype, backend), (torch.float64, "reference")):
        leaves = rounded_leaves([a, b], dtype, run_dtype)
        h = mk.linear_recurrence(*leaves, offsets, backend=run_backend)
        h.backward(g.to(run_dtype))
        runs.append([h, *(leaf.grad for leaf in leaves)])
    for name, first, again, want in zip(("h", "grad a", "grad b"), *runs):
        assert torch.equal(first, again), f"{name}: two runs differ"
        error = relative_error(first, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

def _ok():
    return _inputs([2, 0, 3])


BAD_INPUT = {
    # name: (call, exception, argument named)
    "linear_recurrence_shape": (lambda: mk.linear_recurrence(_ok()[0][:, :1], *_ok()[1:]), ValueError, "a"),
    "linear_recurrence_dtype": (lambda: mk.linear_recurrence(_ok()[0].double(), *_ok()[1:]), TypeError, "a"),
    "linear_recurrence_nan": (lambda: mk.linear_recurrence(_ok()[0], _ok()[1].index_fill(0, torch.tensor([3]), float("nan")),
                                                           _ok()[2]), ValueError, "b"),
    "linear_recurrence_inf_a": (lambda: mk.linear_recurrence(_ok()[0].index_fill(0, torch.tensor([1]), float("inf")),
                                                             *_ok()[1:]), ValueError, "a"),
    "linear_recurrence_offsets": (lambda: mk.linear_recurrence(*_ok()[:2], _ok()[2].flip(0)), ValueError,
                                  "segment_offsets"),
    "linear_recurrence_offsets_total": (lambda: mk.linear_recurrence(*_ok()[:2], torch.tensor([0, 2, 4])),
                                        ValueError, "segment_offsets"),
    "linear_recurrence_int": (lambda: mk.linear_recurrence(_ok()[0].long(), _ok()[1].long(), _ok()[2]), TypeError,
                              "b"),
    "linear_recurrence_backend": (lambda: mk.linear_recurrence(*_ok(), backend="cuda"), NotImplementedError,
                                  "linear_recurrence"),
}


def _linear_recurrence_case(device):
    offsets, _, _, _, _ = strided_layout(device)
    num_rows = int(offsets[-1])

    def run(backend, a, b, segment_offsets):
        return (mk.linear_recurrence(a, b, segment_offsets, backend=backend),)
    a = random_values(num_rows, 6, torch.float32, device, 1).sigmoid()
    return run, dict(a=a, b=random_values(num_rows, 6, torch.float32, device, 2), segment_offsets=offsets)


STRIDED_CASES = {"linear_recurrence": _linear_recurrence_case}
