"""Inputs that are valid but unusual: strided views of any tensor argument, empty batches.

Strided views: every op, on every backend it has, gives for a strided view of any one of its
tensor arguments the answer it gives for a dense copy (which is the reference's:
test_kernel_backends.py): the kernel backends the same bits, since their entry makes every
input dense (mos_kernels/_layout.py); the reference the same up to rounding, since PyTorch may
multiply a strided operand in another order. Two layouts: every stride doubled, with poison (NaN, or
a huge negative integer) in the gaps, so that a kernel reading the view as if it were dense
reads the poison; and, for 2-D and 3-D arguments, the dimensions stored in reverse order
(column-major), which has no gaps but puts every element elsewhere. Forward outputs and the
gradients of every float argument are compared; and the gradient of a plain sum, which reaches
the backward ops as an expanded (stride 0) view, against that of a dense one.

Empty batches: every model (backbone, the MoE baselines, MoS) on every backend takes B = 0.
(Wide addresses: test_wide_addresses.py; non-finite parameters: test_bad_input.py.)
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos.config import ModelConfig, MoSConfig
from mos.data.batch import Batch
from mos.model import CTRModel
from mos_kernels._alloc import INT_POISON
from mos_kernels.backend import IMPLEMENTED
from tests.conftest import require_cuda_ext
from tests.kernel_cases import random_themes, random_values
from tests.tolerances import assert_close

DIM = 8
LENGTHS = [5, 0, 9, 6]     # an empty example among them
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


def _layout(device):
    """Jagged tokens cut into sessions and dispatched to themes: the index tensors of every op."""
    offsets = mk.offsets_from_lengths(torch.tensor(LENGTHS, device=device))
    sessions = mk.sessionize(offsets, session_len=3)
    themes = random_themes(sessions.num_sessions, NUM_THEMES, TOP_K, device)
    gate = torch.rand(themes.shape, device=device) + 0.5
    dispatch = mk.theme_dispatch(themes, gate, sessions.session_offsets, sessions.session_example,
                                 num_examples=len(LENGTHS), num_themes=NUM_THEMES, backend="reference")
    return offsets, sessions, themes, gate, dispatch


def _pool_case(device):
    _, sessions, _, _, _ = _layout(device)
    values = random_values(int(sessions.session_offsets[-1]), DIM, torch.float32, device)

    def run(backend, values, session_offsets):
        return (mk.session_pool(values, session_offsets, backend=backend),)
    return run, dict(values=values, session_offsets=sessions.session_offsets)


def _pool_route_case(device):
    _, sessions, _, _, _ = _layout(device)
    values = random_values(int(sessions.session_offsets[-1]), DIM, torch.float32, device)

    def run(backend, values, session_offsets, prototypes):
        pooled, r = mk.session_pool_route(values, session_offsets, prototypes, temperature=0.5, top_k=TOP_K,
                                          backend=backend)
        return pooled, r.scores, r.probs, r.themes, r.gate
    return run, dict(values=values, session_offsets=sessions.session_offsets,
                     prototypes=random_values(NUM_THEMES, DIM, torch.float32, device, seed=1))


def _route_case(device):
    def run(backend, pooled, prototypes):
        r = mk.theme_route(pooled, prototypes, temperature=0.5, top_k=TOP_K, backend=backend)
        return r.scores, r.probs, r.themes, r.gate
    return run, dict(pooled=random_values(6, DIM, torch.float32, device),
                     prototypes=random_values(NUM_THEMES, DIM, torch.float32, device, seed=1))


def _sessionize_case(device):
    offsets = mk.offsets_from_lengths(torch.tensor(LENGTHS, device=device))
    # A pause longer than gap_seconds before every third event.
    gaps = torch.where(torch.arange(int(offsets[-1]), device=device) % 3 == 0, 5000.0, 1.0)

    def run(backend, offsets, timestamps):
        s = mk.sessionize(offsets, mode="gap", timestamps=timestamps, gap_seconds=1800.0, max_session_len=4)
        return s.session_offsets, s.session_example, s.example_session_offsets
    return run, dict(offsets=offsets, timestamps=torch.cumsum(gaps, 0))


def _dispatch_case(device):
    _, sessions, themes, gate, _ = _layout(device)

    def run(backend, themes, gate, session_offsets, session_example):
        d = mk.theme_dispatch(themes, gate, session_offsets, session_example, num_examples=len(LENGTHS),
                              num_themes=NUM_THEMES, backend=backend)
        return d.gather_index, d.row_gate, d.inverse_index, d.theme_offsets
    return run, dict(themes=themes, gate=gate, session_offsets=sessions.session_offsets,
                     session_example=sessions.session_example)


def _gather_args(device, rows: bool):
    _, sessions, _, _, d = _layout(device)
    num_rows = d.gather_index.numel() if rows else int(sessions.session_offsets[-1])
    return (random_values(num_rows, DIM, torch.float32, device), d.gather_index, d.row_gate.detach(),
            d.inverse_index, int(sessions.session_offsets[-1]))


def _gather_case(device):
    values, gather_index, row_gate, inverse_index, _ = _gather_args(device, rows=False)

    def run(backend, values, gather_index, row_gate, inverse_index):
        return (mk.theme_gather(values, gather_index, row_gate, inverse_index=inverse_index, backend=backend),)
    return run, dict(values=values, gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index)


def _scatter_case(device):
    rows, gather_index, row_gate, inverse_index, num_tokens = _gather_args(device, rows=True)

    def run(backend, rows, gather_index, row_gate, inverse_index):
        return (mk.theme_scatter(rows, gather_index, row_gate, num_tokens=num_tokens, inverse_index=inverse_index,
                                 backend=backend),)
    return run, dict(rows=rows, gather_index=gather_index, row_gate=row_gate, inverse_index=inverse_index)


def _grouped_linear_case(device):
    tokens, gather_index, row_gate, _, _ = _gather_args(device, rows=False)
    _, _, _, _, d = _layout(device)

    def run(backend, x, weight, bias, expert_offsets):
        return (mk.grouped_linear(x, weight, bias, expert_offsets, backend=backend),)
    return run, dict(x=mk.theme_gather(tokens, gather_index, row_gate, backend="reference"),
                     weight=random_values(NUM_THEMES * DIM, 6, torch.float32, device, 2).view(NUM_THEMES, DIM, 6),
                     bias=random_values(NUM_THEMES, 6, torch.float32, device, 3), expert_offsets=d.expert_offsets)


def _target_attention_case(device):
    tokens, gather_index, row_gate, inverse_index, _ = _gather_args(device, rows=False)
    _, _, _, _, d = _layout(device)
    weights = {name: random_values(NUM_THEMES * DIM, DIM, torch.float32, device, seed).view(NUM_THEMES, DIM, DIM)
               for seed, name in enumerate(("w_key", "w_value"), start=2)}
    biases = {name: random_values(NUM_THEMES, DIM, torch.float32, device, seed)
              for seed, name in enumerate(("b_key", "b_value"), start=4)}

    def run(backend, tokens, query, w_key, b_key, w_value, b_value, segment_offsets, gather_index, row_gate,
            inverse_index):
        return (mk.expert_target_attention(tokens, query, w_key, b_key, w_value, b_value, segment_offsets,
                                           num_heads=2, gather_index=gather_index, row_gate=row_gate,
                                           inverse_index=inverse_index, backend=backend),)
    return run, dict(tokens=tokens, query=random_values(NUM_THEMES * len(LENGTHS), DIM, torch.float32, device, 6),
                     **weights, **biases, segment_offsets=d.theme_offsets, gather_index=gather_index,
                     row_gate=row_gate, inverse_index=inverse_index)


def _self_attention_case(device):
    offsets, _, _, _, _ = _layout(device)
    qkv = {name: random_values(int(offsets[-1]), DIM, torch.float32, device, seed)
           for seed, name in enumerate("qkv")}

    def run(backend, q, k, v, segment_offsets):
        return (mk.jagged_self_attention(q, k, v, segment_offsets, num_heads=2, backend=backend),)
    return run, dict(**qkv, segment_offsets=offsets)


CASES = {
    "session_pool": _pool_case,
    "session_pool_route": _pool_route_case,
    "theme_route": _route_case,
    "sessionize": _sessionize_case,
    "theme_dispatch": _dispatch_case,
    "theme_gather": _gather_case,
    "theme_scatter": _scatter_case,
    "grouped_linear": _grouped_linear_case,
    "expert_target_attention": _target_attention_case,
    "jagged_self_attention": _self_attention_case,
}


def _backends(op):
    return IMPLEMENTED.get(op, ("reference",))   # sessionize is integer-only, reference alone


def _run(run, backend, tensors, strided=None, loss="random"):
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


@pytest.mark.parametrize("op,backend", [(op, b) for op in CASES for b in _backends(op)])
def test_strided_views_give_the_dense_answer(op, backend, device):
    if backend == "cuda":
        require_cuda_ext()
    run, tensors = CASES[op](device)
    expected, expected_grads = _run(run, backend, tensors)
    for name, t in tensors.items():
        for layout, make in LAYOUTS.items():
            if layout == "column_major" and t.dim() < 2:
                continue
            view = make(t.detach())
            assert not view.is_contiguous()
            outputs, grads = _run(run, backend, {**tensors, name: view}, strided=name)
            for i, (got, want) in enumerate(zip(outputs, expected)):
                _assert_same(got, want, backend, f"{op}[{backend}] output {i} with {name} {layout}")
            for arg, want in expected_grads.items():
                _assert_same(grads[arg], want, backend, f"{op}[{backend}] grad of {arg} with {name} {layout}")
    # The backward ops' own tensor arguments: an expanded gradient gives the dense one's answer.
    _, expected_grads = _run(run, backend, tensors, loss="ones")
    _, grads = _run(run, backend, tensors, loss="sum")
    for arg, want in expected_grads.items():
        _assert_same(grads[arg], want, backend, f"{op}[{backend}] grad of {arg} from an expanded gradient")


# ----------------------------------------------------------------------------- empty batches

def _empty_batch(device):
    none = torch.zeros(0, dtype=torch.int64, device=device)
    return Batch(item_ids=none, category_ids=none, timestamps=none, offsets=torch.zeros(1, dtype=torch.int64,
                 device=device), max_len=0, target_item=none, target_category=none,
                 label=torch.zeros(0, device=device), user=none)


@pytest.mark.parametrize("encoder", ["target_attention", "transformer"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("kind", ["backbone", "gshard", "dselect_k", "expert_choice", "mos"])
def test_empty_batch_gives_finite_outputs_and_zero_loss(kind, backend, encoder, device):
    """B = 0: no logits, every auxiliary value finite, the auxiliary loss exactly 0 (an average over
    no examples is taken as 0, not torch's 0/0), and its backward finite."""
    if backend == "cuda":
        require_cuda_ext()
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, mos=MoSConfig(dim=16, num_heads=2, encoder=encoder, backend=backend))
    model = CTRModel(config, num_items=10, num_categories=5).to(device)
    out = model(_empty_batch(device))
    assert out.logits.shape == (0,)
    assert out.aux_loss.item() == 0.0, f"{kind}: auxiliary loss {out.aux_loss.item()} on an empty batch"
    for name, value in out.aux.items():
        assert torch.isfinite(value).all(), f"{kind}: aux {name} = {value} on an empty batch"
    loss = out.logits.sum() + out.aux_loss
    if loss.requires_grad:
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
