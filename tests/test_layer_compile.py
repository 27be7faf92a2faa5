"""torch.compile over the whole MoSLayer: one graph (fullgraph=True, so a graph break is an
error), no recompilation when the sequence lengths or the batch size change (dynamic=True),
and the same output and gradients as the eager layer, on every backend.

The graph goes to the "aot_eager" backend: it traces forward and backward through dynamo and
AOTAutograd exactly as inductor would (a graph break or a data-dependent guard fails the same
way) without generating code, which takes minutes per case on a CPU (where the Triton ops run
under the interpreter) and most of the GPU check's budget on a GPU. Inductor itself compiles the
reference layer in the benchmarks (benchmarks/bench_attention.py, provider "compiled").
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mos_kernels as mk
from mos import MoSConfig, MoSLayer
from tests.conftest import require_cuda_ext
from tests.kernel_cases import random_values
from tests.oracles import live_extras
from tests.tolerances import assert_close

# Two batches whose token counts, lengths and example counts all differ (none of them 0 or 1,
# which torch.compile specialises on).
BATCHES = ([0, 9, 2, 14, 0], [5, 30, 2, 7, 11, 3, 0])
# Tracing the layer takes tens of seconds on a CPU: two configurations between them take every
# data-dependent path (gap sessions, top-2 routing, max_theme_tokens, session-scope global expert; the
# transformer's grouped projections and self-attention, and the theme-recency ranks).
OPTIONS = [
    dict(encoder="target_attention", session_mode="gap", top_k=2, max_theme_tokens=3, global_scope="sessions"),
    dict(encoder="transformer", theme_recency=True),
]


def _batch(lengths, device, seed):
    offsets = mk.offsets_from_lengths(torch.tensor(lengths, device=device))
    num_tokens = sum(lengths)
    values = random_values(num_tokens, 16, torch.float32, device, seed=seed)
    target = random_values(len(lengths), 16, torch.float32, device, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.where(torch.rand(num_tokens, generator=gen) < 0.3, 4000.0, 60.0).double()
    return values, target, offsets, torch.cumsum(gaps, 0).to(device)


# SDIM calls no kernel beyond the grouped projections the transformer's case compiles on every
# backend (its hashing is backend-free); Mamba4Rec adds its scan, which has a Triton kernel.
CASES = ([(backend, options) for options in OPTIONS for backend in ("reference", "triton", "cuda")]
         + [("reference", dict(encoder=encoder)) for encoder in ("sdim", "mamba4rec")]
         + [("triton", dict(encoder="mamba4rec"))])


@pytest.mark.parametrize("backend, options", CASES,
                         ids=lambda case: case if isinstance(case, str) else "-".join(f"{k}={v}" for k, v in case.items()))
def test_layer_compiles_once_for_every_length(backend, options, device):
    if backend == "cuda":
        require_cuda_ext()
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = live_extras(MoSLayer(MoSConfig(dim=16, num_heads=2, num_themes=4, session_len=3, backend=backend,
                                           **options))).to(device)

    def step(values, target, offsets, timestamps):
        out = layer(values, target, offsets, timestamps=timestamps)
        return out.output, out.aux_loss

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for seed, lengths in enumerate(BATCHES):
        values, target, offsets, timestamps = _batch(lengths, device, 10 * seed)
        results = []
        for fn in (step, compiled):
            layer.zero_grad(set_to_none=True)
            x = values.clone().requires_grad_()
            # After the first batch a recompilation is an error, not a silent slowdown.
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                output, aux_loss = fn(x, target, offsets, timestamps)
            (output.square().sum() + aux_loss).backward()
            results.append((output, aux_loss, x.grad, {n: p.grad for n, p in layer.named_parameters()}))
        (eager, eager_aux, eager_x, eager_params), (got, got_aux, got_x, got_params) = results
        assert_close(got, eager, "layer")
        assert_close(got_aux, eager_aux, "layer")
        assert_close(got_x, eager_x, "layer")
        for name, grad in eager_params.items():
            assert_close(got_params[name], grad, "layer", msg=name)
        if seed == 0:
            # One frame; dynamo may hand the backend more than one graph while tracing it once.
            first = counter.frame_count
            assert first >= 1
    assert counter.frame_count == first, f"{counter.frame_count - first} more graphs compiled after the first batch"
