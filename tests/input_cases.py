"""Inputs and checks shared by the bad- and unusual-input tests (the ops': the tables of
tests/ops/test_<op>.py, run by tests/ops/test_contract.py; the layer's in tests/test_layer_inputs.py,
the config's in tests/test_config.py): bad arguments, strided views of every tensor argument, rows
past 2^31 elements read through an index.

Bad input fails at once, naming the argument the caller passed. Messages start with the
argument's name ("offsets: expected ..."), so every match is anchored at the start: an error
about an internal tensor (say "session_offsets" when the caller passed "offsets") does not count.
"""
from __future__ import annotations

import torch

import mos_kernels as mk
from mos_kernels._alloc import INT_POISON
from mos_kernels.backend import IMPLEMENTED
from tests.conftest import require_cuda_ext
from tests.kernel_cases import random_themes, random_values
from tests.tolerances import assert_close

DIM = 4     # the width of the bad-input cases


def named(name: str) -> str:
    """A match pattern: the message starts with `name`, as a whole word."""
    return rf"^{name}(?![\w.])"


def with_value_at(t, index, value):
    """A copy of t with t[index] = value."""
    t = t.clone()
    t[index] = value
    return t


# ---- the routing op on good small arguments, any of them replaced ----------------------------

def call_session_pool_route(values=None, session_offsets=None, prototypes=None, **kw):
    values = torch.randn(5, DIM) if values is None else values
    session_offsets = torch.tensor([0, 2, 5]) if session_offsets is None else session_offsets
    prototypes = torch.randn(3, DIM) if prototypes is None else prototypes
    return mk.session_pool_route(values, session_offsets, prototypes, **kw)


# ---- strided views ------------------------------------------------------------------------------
# Every op, on every backend it has, gives for a strided view of any one of its tensor arguments
# the answer it gives for a dense copy (which is the reference's: tests/ops/test_<op>.py): the
# kernel backends the same bits, since their entry makes every input dense
# (mos_kernels/_layout.py); the reference the same up to rounding, since PyTorch may multiply a
# strided operand in another order. Two layouts: every stride doubled, with poison (NaN, or a
# huge negative integer) in the gaps, so that a kernel reading the view as if it were dense reads
# the poison; and, for 2-D and 3-D arguments, the dimensions stored in reverse order
# (column-major), which has no gaps but puts every element elsewhere. Forward outputs and the
# gradients of every float argument are compared; and the gradient of a plain sum, which reaches
# the backward ops as an expanded (stride 0) view, against that of a dense one.

STRIDED_DIM = 8
STRIDED_LENGTHS = [5, 0, 9, 6]     # an empty example among them
NUM_THEMES, TOP_K = 3, 2


def interleaved(t: torch.Tensor) -> torch.Tensor:
    """A view of t's values with every stride doubled; the gaps hold poison."""
    poison = torch.full_like(t, float("nan") if t.is_floating_point() else INT_POISON)
    return torch.stack([t, poison], dim=-1)[..., 0]


def column_major(t: torch.Tensor) -> torch.Tensor:
    """A view of t's values with its dimensions stored in reverse order."""
    order = tuple(reversed(range(t.dim())))
    return t.permute(order).contiguous().permute(order)


LAYOUTS = {"interleaved": interleaved, "column_major": column_major}


def strided_layout(device):
    """Jagged tokens cut into sessions and dispatched to themes: the index tensors of every op."""
    offsets = mk.offsets_from_lengths(torch.tensor(STRIDED_LENGTHS, device=device))
    sessions = mk.sessionize(offsets, session_len=3)
    themes = random_themes(sessions.num_sessions, NUM_THEMES, TOP_K, device)
    gate = torch.rand(themes.shape, device=device) + 0.5
    dispatch = mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                                 num_examples=len(STRIDED_LENGTHS), num_themes=NUM_THEMES, backend="reference")
    return offsets, sessions, themes, gate, dispatch


def strided_gather_args(device, rows: bool):
    _, sessions, _, _, d = strided_layout(device)
    num_rows = d.gather_index.numel() if rows else int(sessions.session_offsets[-1])
    return (random_values(num_rows, STRIDED_DIM, torch.float32, device), d.gather_index, d.row_gate.detach(),
            d.inverse_index, int(sessions.session_offsets[-1]))


def strided_params(cases):
    """(op, backend) for every op of `cases` and every backend it has (sessionize: the reference)."""
    return [(op, backend) for op in cases for backend in IMPLEMENTED.get(op, ("reference",))]


def _outputs_and_grads(run, backend, tensors, strided=None, loss="random"):
    """(forward outputs, gradient of each float argument) of a linear function of the outputs:
    `random` weights, all `ones`, or the plain `sum`, whose gradient reaches the backward ops as
    an expanded view (stride 0). `strided` names the argument passed as the view it is (every
    other one is copied)."""
    leaves = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            leaves[name] = (t if name == strided else t.detach().clone()).requires_grad_()
    tensors = {**tensors, **leaves}
    outputs = run(backend, **tensors)
    gen = torch.Generator().manual_seed(9)

    def term(o):
        if loss == "sum":
            return o.sum()
        weight = torch.ones_like(o) if loss == "ones" else torch.randn(o.shape, generator=gen).to(o.device)
        return (o * weight).sum()
    total = sum(term(o) for o in outputs if o.requires_grad)
    if torch.is_tensor(total):
        total.backward()
    return [o.detach() for o in outputs], {name: t.grad for name, t in leaves.items()}


def _assert_same(actual, expected, backend, what):
    if expected is None:
        assert actual is None, what
    elif backend == "reference" and expected.is_floating_point():
        assert_close(actual, expected, "reduction", msg=what)
    else:
        assert torch.equal(actual, expected), \
            f"{what}: differs (max |diff| {(actual.double() - expected.double()).abs().max().item()})"


def check_strided_views(op, make_case, backend, device):
    """`op` on `backend` gives for a strided view of each tensor argument of make_case(device) the
    answer it gives for a dense copy (forward outputs, gradients of every float argument), and
    the gradient of a plain sum (an expanded view) that of a dense one."""
    if backend == "cuda":
        require_cuda_ext()
    run, tensors = make_case(device)
    expected, expected_grads = _outputs_and_grads(run, backend, tensors)
    for name, t in tensors.items():
        for layout, make in LAYOUTS.items():
            if layout == "column_major" and t.dim() < 2:
                continue
            view = make(t.detach())
            assert not view.is_contiguous()
            outputs, grads = _outputs_and_grads(run, backend, {**tensors, name: view}, strided=name)
            for i, (got, want) in enumerate(zip(outputs, expected)):
                _assert_same(got, want, backend, f"{op}[{backend}] output {i} with {name} {layout}")
            for arg, want in expected_grads.items():
                _assert_same(grads[arg], want, backend, f"{op}[{backend}] grad of {arg} with {name} {layout}")
    # The backward ops' own tensor arguments: an expanded gradient gives the dense one's answer.
    _, expected_grads = _outputs_and_grads(run, backend, tensors, loss="ones")
    _, grads = _outputs_and_grads(run, backend, tensors, loss="sum")
    for arg, want in expected_grads.items():
        _assert_same(grads[arg], want, backend, f"{op}[{backend}] grad of {arg} from an expanded gradient")


# ---- rows past 2^31 elements --------------------------------------------------------------------
# The ops read rows past 2^31 elements of an input that is only reserved: the OS maps a page on
# first touch, so a 4.3 GB tensor of which a few rows are written costs a few pages. That covers
# every op that reads token rows through an index (gather, the gate's gradient, the gathered GEMM
# and attention), on every backend, on the CPU. (The kernels' compiled address arithmetic:
# tests/test_wide_addresses.py; at full size on the GPU:
# test_gather_scatter_past_2_to_31_elements in tests/ops/test_theme_gather.py.)

# Rows of a reserved fp16 input: WIDE_ROWS x WIDE_DIM = 2^31 + 8,192 elements, so its last rows
# start past 2^31 (the widest row the attention kernels take is 256).
WIDE_ROWS, WIDE_DIM = 8_388_640, 256
TOUCHED = [0, 5, WIDE_ROWS - 40, WIDE_ROWS - 1]     # the last two past 2^31 elements


def reserved_tokens():
    """[WIDE_ROWS, WIDE_DIM] fp16 of which only the TOUCHED rows are written (random values)."""
    tokens = torch.empty(WIDE_ROWS, WIDE_DIM, dtype=torch.float16)
    tokens[TOUCHED] = random_values(len(TOUCHED), WIDE_DIM, torch.float16, "cpu")
    return tokens


def index_and_gate():
    index = torch.tensor(TOUCHED[::-1] + TOUCHED[2:])
    # Gates exact in fp16: the reference rounds the gate to the rows' dtype, the kernels do not.
    gate = torch.tensor([0.5, 1.25, -2.0, 0.75, 1.5, -0.25]).requires_grad_()
    return index, gate


def two_experts(index):
    """fp16 weights of two experts over the gathered rows, and the experts' row offsets; small
    weights keep fp16 attention scores moderate."""
    weights = random_values(2 * WIDE_DIM, WIDE_DIM, torch.float16, "cpu", seed=3).view(2, WIDE_DIM, WIDE_DIM) * 0.05
    return weights, torch.tensor([0, 2, index.numel()])


def check_rows_past_2_to_31(op, read_rows, backend):
    """read_rows(tokens, index, gate, backend) on the gathered rows of a reserved 4.3 GB input equals
    it on a dense copy of those rows (forward, and the gate's gradient, which reads the rows again)."""
    if backend == "cuda":
        require_cuda_ext()
    tokens = reserved_tokens()
    index, gate = index_and_gate()
    small = tokens[index].clone()
    small_index = torch.arange(index.numel())
    small_gate = gate.detach().clone().requires_grad_()
    # The reserved rows were never written: a data check would read all 4.3 GB of them.
    with mk.data_checks(False):
        out = read_rows(tokens, index, gate, backend)
        expected = read_rows(small, small_index, small_gate, backend)
    assert torch.equal(out, expected), f"{op}[{backend}]: rows past 2^31 elements read wrong"
    weight = random_values(out.shape[0], out.shape[1], torch.float32, "cpu", seed=4)
    (out.float() * weight).sum().backward()
    (expected.float() * weight).sum().backward()
    assert_close(gate.grad, small_gate.grad, "reduction", msg=f"{op}[{backend}] gate gradient")
