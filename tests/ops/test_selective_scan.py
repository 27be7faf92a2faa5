"""selective_scan (mos_kernels/selective_scan.py), Mamba4Rec's scan and readout: each backend
against the row-by-row oracle on awkward segments (empty, one row, segments that start and end on
and beside the Triton kernels' 8-row chunks, several chunks of carried state, one and several
experts, channel and state counts off the kernels' blocks), forward and all five gradients; the
Triton kernels against the reference in fp32/fp16 (bf16 on the GPU); gradcheck of the float64
reference and opcheck of the Triton custom op; what the FLOP counters see; every launch
configuration compiled; bad input named and strided views (the contract's tables); on a CUDA
device (the GPU check), the long setting's shape in fp32/fp16/bf16 against float64 and bitwise
repeatable, and the compiled kernels' every tile layout (S from 1 to 64, padded channels)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mos_kernels as mk
from mos_kernels.selective_scan import CHUNK, MAX_STATE, scan_blocks
from tests import oracles
from tests.gpu_cases import GPU_DTYPES, RELATIVE_ERROR, cotangent, needs_cuda, relative_error, rounded_leaves
from tests.input_cases import strided_layout
from tests.kernel_cases import DTYPES, assert_matches, backends, compare_to_reference, is_compiled

LENGTHS = [0, 1, 37, 0, 2, 13, 1, 0]
NAMES = ("u", "delta", "A", "B", "C")


def _inputs(lengths=LENGTHS, experts=2, dim=5, state=3, dtype=torch.float32, seed=0, device="cpu"):
    """u, delta, A, B, C as Mamba makes them (delta > 0 as a softplus gives, A < 0) and the offsets."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    values = (torch.randn(n, dim, generator=gen), torch.rand(n, dim, generator=gen).mul(0.5).add(0.01),
              -torch.rand(experts, dim, state, generator=gen).mul(2).add(0.05), torch.randn(n, state, generator=gen),
              torch.randn(n, state, generator=gen))
    return [v.to(device=device, dtype=dtype) for v in values], oracles.offsets_of(lengths).to(device)


# (lengths, experts, dim, state): lengths on and beside the 8-row chunks' edges, a partial last
# chunk, five chunks of carried state, 20 channels (two forward blocks of 16 at S = 3, five
# backward blocks of 4), 17 state elements (padded to 32), one expert shared by every segment,
# all segments empty.
ORACLE_CASES = [(LENGTHS, 2, 5, 3), ([16, 17, 32, 33], 2, 20, 3), ([1], 1, 3, 17), ([0, 0, 5], 1, 4, 2),
                ([5, 0, 9, 3, 0, 2], 3, 6, 4), ([0, 0], 2, 3, 2)]


@pytest.mark.parametrize("backend", backends("selective_scan"))
@pytest.mark.parametrize("lengths, experts, dim, state", ORACLE_CASES, ids=lambda v: str(v)[:20])
def test_the_scan_matches_the_row_by_row_oracle(lengths, experts, dim, state, backend, device):
    """y and the gradients of u, delta, A, B and C equal the float64 loop's, segments kept apart."""
    values, offsets = _inputs(lengths, experts, dim, state, device=device)
    leaves = [v.requires_grad_() for v in values]
    y = mk.selective_scan(*leaves, offsets, backend=backend)
    exact = [v.detach().cpu().double().requires_grad_() for v in values]
    expected = oracles.selective_scan(*exact, offsets.cpu())
    assert_matches(y, expected, "reduction")
    if not y.numel():           # no rows: A (the only non-empty input) gets a zero gradient
        y.sum().backward()
        assert torch.equal(leaves[2].grad, torch.zeros_like(leaves[2]))
        return
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, leaves, g.to(device), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(expected, exact, g.double(), allow_unused=True, materialize_grads=True)
    for name, x, w in zip(NAMES, got, want):
        assert_matches(x, w, "reduction", msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim, state", [(1, 1), (8, 16), (24, 16)])
def test_triton_equals_the_reference_in_its_dtype(dim, state, dtype, device):
    """Channel counts below, at and across the kernels' blocks; Mamba's state size 16."""
    values, offsets = _inputs([0, 9, 1, 0, 21, 4], 2, dim, state, dtype=dtype, seed=dim, device=device)

    def run(backend):
        return lambda u, delta, A, B, C: mk.selective_scan(u, delta, A, B, C, offsets, backend=backend)
    compare_to_reference(run("triton"), run("reference"), dict(zip(NAMES, values)), dtype, "reduction", "reduction")


def test_a_first_row_reads_no_decay_on_either_backend():
    """h = delta u B at a segment's first row whatever exp(delta A) is there: with the data checks
    off, a decay that overflows to inf at a first row reaches neither y nor a gradient (inf * 0
    would be NaN), and both backends agree."""
    (u, delta, A, B, C), offsets = _inputs([3, 2], experts=1, dim=2, state=2)
    A = A.abs()                          # growth: exp(100 * A) overflows at the two first rows
    delta[[0, 3]] = 100.0
    runs = {}
    with mk.data_checks(False):
        for backend in backends("selective_scan"):
            leaves = [v.clone().requires_grad_() for v in (u, delta, A, B, C)]
            y = mk.selective_scan(*leaves, offsets, backend=backend)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
            runs[backend] = [y, *(leaf.grad for leaf in leaves)]
    for backend, run in runs.items():
        for name, got, want in zip(("y",) + NAMES, run, runs["reference"]):
            assert torch.isfinite(got).all(), (backend, name)
            assert_matches(got, want, "reduction", msg=f"{backend} {name}")
    assert torch.equal(runs["reference"][0][0], (delta[0] * u[0])[:, None].mul(B[0]).matmul(C[0]))


def test_gradcheck_and_opcheck():
    (u, delta, A, B, C), offsets = _inputs([3, 0, 6, 1], experts=2, dim=2, state=2, dtype=torch.float64)
    leaves = [v.requires_grad_() for v in (u, delta, A, B, C)]
    assert torch.autograd.gradcheck(lambda *x: mk.selective_scan(*x, offsets), leaves)
    single = [v.detach().float().requires_grad_() for v in leaves]
    for store_entering in (True, False):
        torch.library.opcheck(torch.ops.mos.selective_scan.default, (*single, offsets, store_entering),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


class _StoreFlags(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the store_entering argument of every mos::selective_scan call."""

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mos.selective_scan.default:
            self.flags.append(args[6])
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif("triton" not in backends("selective_scan"), reason="the Triton op stores the states")
def test_a_forward_autograd_will_not_differentiate_stores_no_states():
    """Under no_grad, or with no input requiring grad, the Triton forward writes y only (the chunks'
    entering states are for the backward): the same y bit for bit, no states; a forward that
    will be differentiated stores them, and an op call that stored none refuses a backward."""
    values, offsets = _inputs([9, 0, 17, 3], experts=2, dim=5, state=3)
    leaves = [v.clone().requires_grad_() for v in values]
    runs = {}
    for name, args, grad in (("train", leaves, True), ("no_grad", leaves, False), ("plain", values, True)):
        with torch.set_grad_enabled(grad), _StoreFlags() as seen:
            runs[name] = mk.selective_scan(*args, offsets, backend="triton")
        assert seen.flags == [name == "train"], name
    assert torch.equal(runs["no_grad"], runs["train"].detach()) and torch.equal(runs["plain"], runs["no_grad"])
    y, entering = torch.ops.mos.selective_scan(*leaves, offsets, False)
    assert entering.shape == (0, 5, 3) and torch.equal(y.detach(), runs["plain"])
    with pytest.raises(RuntimeError, match="store_entering=False"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_scans_in_fp32(dtype):
    values, offsets = _inputs(dtype=dtype)
    y = mk.selective_scan(*values, offsets)
    assert y.dtype == dtype
    assert_matches(y, mk.selective_scan(*(v.float() for v in values), offsets), "reduction")


@pytest.mark.parametrize("backend", backends("selective_scan"))
def test_flop_counters_see_the_scan_and_the_readout(backend):
    """4 FLOPs per state element forward (the scan's multiply-add, the contraction with C), 7
    backward, on both backends alike."""
    values, offsets = _inputs()
    leaves = [v.requires_grad_() for v in values]
    with FlopCounterMode(display=False) as forward:
        y = mk.selective_scan(*leaves, offsets, backend=backend)
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    elements = y.numel() * values[2].shape[2]
    assert forward.get_total_flops() == 4 * elements
    assert backward.get_total_flops() == 7 * elements


def test_every_launch_configuration_is_compiled():
    """Every state size the kernels take maps to blocks that tools/compile_check compiles for sm_90."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for state in range(1, MAX_STATE + 1):
            for kernel, backward in (("_selective_scan_fwd", False), ("_selective_scan_bwd", True)):
                block_d, block_s, num_warps = scan_blocks(state, backward)
                wanted = {"CHUNK": CHUNK, "BLOCK_D": block_d, "BLOCK_S": block_s, "num_warps": num_warps}
                assert is_compiled(kernel, "u_ptr", dtype, wanted), (kernel, dtype, state)


# ---- on a CUDA device ---------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_the_scan_at_scale_on_cuda_matches_float64_and_repeats_bitwise(dtype, backend):
    """The long setting's MoS shape on the card (9 experts x 64 histories of 0-565 rows, Mamba4Rec's
    D = 64 channels, S = 16, A random per expert and channel in Mamba's range): y and every
    gradient in dtype against the float64 reference of the same rounded inputs, and a second run
    bitwise equal to the first (no atomics)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts, dim, state = 9, 64, 16
    lengths = torch.randint(0, 566, (experts * 64,), device="cuda", generator=gen)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    num_rows = int(offsets[-1])
    inputs = [torch.randn(num_rows, dim, device="cuda", generator=gen),
              torch.rand(num_rows, dim, device="cuda", generator=gen).mul(0.1).add(1e-3),
              -torch.rand(experts, dim, state, device="cuda", generator=gen).mul(state).add(0.5),
              torch.randn(num_rows, state, device="cuda", generator=gen),
              torch.randn(num_rows, state, device="cuda", generator=gen)]
    g = cotangent((num_rows, dim), dtype, 1)
    runs = []
    for run_dtype, run_backend in ((dtype, backend), (dtype, backend), (torch.float64, "reference")):
        leaves = rounded_leaves(inputs, dtype, run_dtype)
        y = mk.selective_scan(*leaves, offsets, backend=run_backend)
        y.backward(g.to(run_dtype))
        runs.append([y, *(leaf.grad for leaf in leaves)])
    for name, first, again, want in zip(("y",) + NAMES, *runs):
        assert torch.equal(first, again), f"{name}: two runs differ"
        error = relative_error(first, want)
        assert error < RELATIVE_ERROR[dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dim", [5, 64])
@pytest.mark.parametrize("state", [1, 3, 16, 17, 64])
def test_every_compiled_tile_layout_matches_the_oracle_on_cuda(state, dim):
    """The compiled scans lay a chunk out over registers, lanes and warps by its tile shape, which
    the interpreter does not model: each state size's blocks (and padded channels and states)
    against the float64 row-by-row oracle, 3 experts, fp32, forward and every gradient."""
    lengths = [0, 1, 8, 9, 23, 0]
    values, offsets = _inputs(lengths, 3, dim, state, seed=state)
    leaves = [v.cuda().requires_grad_() for v in values]
    y = mk.selective_scan(*leaves, offsets.cuda(), backend="triton")
    exact = [v.double().requires_grad_() for v in values]
    expected = oracles.selective_scan(*exact, offsets)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, leaves, g.cuda())
    want = torch.autograd.grad(expected, exact, g.double())
    for name, x, w in zip(("y",) + NAMES, (y, *got), (expected, *want)):
        assert_matches(x, w, "reduction", msg=name)


# ---- the contract's tables (test_contract.py; tests/input_cases.py says how) --------------------

def _ok():
    values, offsets = _inputs([2, 0, 3, 1], experts=2, dim=3, state=2)
    return [*values, offsets]


def _with(position, value):
    args = _ok()
    args[position] = value(args[position])
    return lambda: mk.selective_scan(*args)


BAD_INPUT = {
    # name: (call, exception, argument named)
    "selective_scan_u_dims": (_with(0, lambda u: u[None]), ValueError, "u"),
    "selective_scan_u_int": (_with(0, lambda u: u.long()), TypeError, "u"),
    "selective_scan_delta_shape": (_with(1, lambda d: d[:, :2]), ValueError, "delta"),
    "selective_scan_delta_dtype": (_with(1, lambda d: d.double()), TypeError, "delta"),
    "selective_scan_a_channels": (_with(2, lambda a: a[:, :2]), ValueError, "A"),
    "selective_scan_a_dims": (_with(2, lambda a: a[0]), ValueError, "A"),
    "selective_scan_b_state": (_with(3, lambda b: b[:, :1]), ValueError, "B"),
    "selective_scan_c_rows": (_with(4, lambda c: c[1:]), ValueError, "C"),
    "selective_scan_nan": (_with(0, lambda u: u.index_fill(0, torch.tensor([3]), float("nan"))), ValueError, "u"),
    "selective_scan_inf_delta": (_with(1, lambda d: d.index_fill(0, torch.tensor([1]), float("inf"))), ValueError,
                                 "delta"),
    "selective_scan_offsets": (_with(5, lambda o: o.flip(0)), ValueError, "segment_offsets"),
    "selective_scan_offsets_total": (_with(5, lambda o: torch.tensor([0, 2, 4, 5, 5])), ValueError,
                                     "segment_offsets"),
    "selective_scan_segments_per_expert": (_with(5, lambda o: torch.tensor([0, 2, 5, 6])), ValueError,
                                           "segment_offsets"),
    "selective_scan_backend": (lambda: mk.selective_scan(*_ok(), backend="cuda"), NotImplementedError,
                               "selective_scan"),
    "selective_scan_state_triton": (lambda: mk.selective_scan(*_inputs([2], 1, 3, MAX_STATE + 1)[0],
                                                              torch.tensor([0, 2]), backend="triton"),
                                    ValueError, "A"),
    # exp(delta A) overflowing float32 at row 1 (A < 0; segment [0, 2): not its first row, which
    # reads none)
    "selective_scan_decay_overflows": (_with(1, lambda d: d.index_fill(0, torch.tensor([1]), -1e4)), ValueError,
                                       "delta"),
}


def _selective_scan_case(device):
    offsets, _, _, _, _ = strided_layout(device)
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    values, offsets = _inputs(lengths, experts=1, dim=6, state=4, device=device)

    def run(backend, u, delta, A, B, C, segment_offsets):
        return (mk.selective_scan(u, delta, A, B, C, segment_offsets, backend=backend),)
    return run, dict(zip(NAMES, values), segment_offsets=offsets)


STRIDED_CASES = {"selective_scan": _selective_scan_case}
