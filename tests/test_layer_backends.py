"""The layer on each kernel backend (Triton, CUDA C++) against the layer on the reference,
forward and backward; each op's own comparisons are in tests/ops/.

test_layer_equals_reference is the one comparison of the whole layer with its reference, over
three kinds of case: the small configurations (each built-in encoder, top-k, max_theme_tokens) on
both kernel backends; every option of the layer (global scope, fusion, two layers) on Triton; and,
on a CUDA device only, the layer at B = 64, L = 256 in fp32 / fp16 / bf16 with each built-in
encoder on both kernel backends. test_layer_all_empty_batch_is_finite runs a batch without
history with each encoder. On the CPU Triton runs under
TRITON_INTERPRET=1 and the CUDA extension's kernel code under its emulation (MOS_CUDA_EMULATE=1);
the GPU check script runs the same file with MOS_TEST_DEVICE=cuda. Outputs are poisoned with NaN /
a sentinel before every kernel, so an element a kernel fails to write cannot pass.
"""
from __future__ import annotations

import pytest
import torch

import mos_kernels as mk
from mos_kernels._alloc import poisoned_outputs
from tests.conftest import require_cuda_ext
from tests.gpu_cases import relative_error
from tests.layer_cases import compare_with_reference
from tests.kernel_cases import random_values
from tests.oracles import live_extras
from tests.tolerances import assert_close


ENCODERS = ["target_attention", "transformer", "sdim", "mamba4rec"]


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_outputs():
        yield


@pytest.mark.parametrize("encoder", ENCODERS)
def test_layer_all_empty_batch_is_finite(encoder, device):
    """No history at all: every segment of every expert is empty; zeros flow, no NaN, and every
    parameter the batch reaches gets a finite gradient."""
    from mos import MoSConfig, MoSLayer

    torch.manual_seed(0)
    layer = MoSLayer(MoSConfig(dim=16, num_heads=2, num_themes=4, encoder=encoder, backend="triton")).to(device)
    target = random_values(3, 16, torch.float32, device).requires_grad_()
    out = layer(torch.zeros(0, 16, device=device, requires_grad=True), target, torch.zeros(4, dtype=torch.int64,
                                                                                            device=device))
    (out.output.square().sum() + out.aux_loss).backward()
    assert torch.isfinite(out.output).all() and torch.isfinite(target.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


LAYER_OPTIONS = [
    dict(encoder="target_attention"),
    dict(encoder="target_attention", top_k=2, max_theme_tokens=3, global_scope="sessions", fusion="concat"),
    dict(encoder="target_attention", attention_mass=True, theme_mass=True),
    dict(encoder="target_attention", theme_recency=True, max_theme_tokens=3),
    dict(encoder="transformer"),
    dict(encoder="transformer", top_k=2, max_theme_tokens=3, fusion="concat", theme_mass=True),
    dict(encoder="transformer", num_layers=2, global_scope="sessions"),
]


def _small(options, lengths, backend):
    name = "-".join(f"{k}={v}" for k, v in options.items())
    return pytest.param(dict(options=options, lengths=lengths), backend, id=f"{name}-{len(lengths)}-{backend}")


def _gpu_scale(dtype, encoder, backend):
    marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    return pytest.param(dict(dtype=dtype, encoder=encoder), backend, marks=marks,
                        id=f"gpu_scale-{encoder}-{str(dtype).removeprefix('torch.')}-{backend}")


CASES = (
    [_small(dict(encoder=encoder, top_k=top_k, max_theme_tokens=max_theme_tokens), [0, 9, 1, 14, 0], backend)
     for encoder in ("target_attention", "transformer") for top_k, max_theme_tokens in ((1, None), (2, 3))
     for backend in ("triton", "cuda")]
    # SDIM and Mamba4Rec call the kernels for their projections, and the layer's own steps
    # (pooling, routing, dispatch, gather) run on the backend around them.
    + [_small(dict(encoder=encoder, top_k=2, max_theme_tokens=3), [0, 9, 1, 14, 0], backend)
       for encoder in ("sdim", "mamba4rec") for backend in ("triton", "cuda")]
    + [_small(options, [0, 9, 1, 14, 0, 30], "triton") for options in LAYER_OPTIONS]
    # Found by tests/test_layer_fuzz.py: one example without history (no gradient reaches the
    # values on either backend; the comparison once required one).
    + [_small(dict(encoder="transformer", num_themes=1, session_len=1), [0], "triton")]
    + [_gpu_scale(dtype, encoder, backend) for dtype in (torch.float32, torch.float16, torch.bfloat16)
       for encoder in ENCODERS for backend in ("triton", "cuda")]
)


@pytest.mark.parametrize("case,backend", CASES)
def test_layer_equals_reference(case, backend, device):
    """MoSLayer on a kernel backend runs every step on the kernels and equals backend="reference"."""
    if backend == "cuda":
        require_cuda_ext()
    if "dtype" in case:
        _check_at_gpu_scale(case["dtype"], case["encoder"], backend)
    else:
        compare_with_reference(case["options"], case["lengths"], backend, device)


def _check_at_gpu_scale(dtype, encoder, backend):
    """The whole layer at B = 64, L = 256: fp32 within the layer tolerance of the reference; in
    fp16/bf16 both backends are measured against the fp32 reference and the kernels (fp32 sums
    inside every kernel) are at least as accurate as the reference run in the same dtype, up to
    a factor 2 for the different rounding points."""
    from mos import MoSConfig, MoSLayer
    from mos.routing import LearnedRouter, RandomRouter

    # Half precision: random routing drawn from the same seed in every run, so that no session
    # flips theme on a near-tie between runs (that would compare different computations).
    half = dtype != torch.float32
    config = dict(dim=64, num_heads=2, num_themes=8, encoder=encoder)
    router = RandomRouter() if half else LearnedRouter()
    torch.manual_seed(0)
    exact = live_extras(MoSLayer(MoSConfig(backend="reference", **config), router=router)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(7)
    lengths = torch.randint(128, 385, (64,), device="cuda", generator=gen)
    offsets = mk.offsets_from_lengths(lengths)
    values = torch.randn(int(offsets[-1]), 64, device="cuda", generator=gen)
    target = torch.randn(64, 64, device="cuda", generator=gen)

    def run(backend, run_dtype):
        layer = MoSLayer(MoSConfig(backend=backend, **config), router=router).cuda()
        layer.load_state_dict(exact.state_dict())
        layer.to(run_dtype)
        x = values.to(dtype).to(run_dtype).requires_grad_()
        torch.manual_seed(8)
        out = layer(x, target.to(dtype).to(run_dtype), offsets)
        (out.output.float().square().sum() + out.aux_loss.float()).backward()
        return out.output, x.grad

    want = run("reference", torch.float32)
    got = run(backend, dtype)
    if not half:
        assert_close(got[0], want[0], "layer")
        assert_close(got[1], want[1], "layer")
        return
    same_dtype = run("reference", dtype)
    for name, g, s, w in zip(("output", "input gradient"), got, same_dtype, want):
        err, ref_err = relative_error(g, w), relative_error(s, w)
        assert err <= 2 * ref_err + 1e-4, \
            f"{name}: {backend} {err:.2e}, reference in the same dtype {ref_err:.2e}"
