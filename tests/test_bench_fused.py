"""The benchmarks' own baselines against the reference: `compiled_fused` (benchmarks/providers_fused.py)
for every case that has it, forward and every input gradient, within the tolerance table; the
choice of its grouped GEMM; the causal keyword of torch's varlen attention.

torch.compile runs with the "eager" backend here (inductor takes ~40 s a graph on this CPU): what
is checked is the algorithm the provider hands the compiler, traced by dynamo.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # `benchmarks` is not an installed package

from benchmarks import attention_baselines, attention_cases, bench_attention, harness, providers_fused  # noqa: E402
from tolerances import assert_close  # noqa: E402

# Tolerance kinds (tests/tolerances.py) of the outputs and of the input gradients.
KINDS = {
    "expert_target_attention": ("attention", "attention_grad"),      # folded scores: dot products re-associated
    "grouped_linear": ("attention", "attention_grad"),        # GEMM chains, another summation order
    "layer": ("layer", "layer"),                              # the whole layer: several chains in a row
}


@pytest.mark.parametrize("op", sorted(KINDS))
def test_compiled_fused_matches_the_reference(op, device):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        case = attention_cases.build_case(op, bench_attention.QUICK, torch.float32, device)
        run = {name: harness.mode_callable(case, harness.provider_callable(
            case, bench_attention.ALL_PROVIDERS[name], compile_backend="eager"), "fwd+bwd")()
               for name in ("reference", "compiled_fused")}
    finally:
        torch.set_num_threads(threads)
    (outputs, grads), (expected, expected_grads) = run["compiled_fused"], run["reference"]
    output_kind, grad_kind = KINDS[op]
    assert len(outputs) == len(expected) and len(grads) == len(expected_grads) == len(case.grad_inputs)
    for i, (a, e) in enumerate(zip(outputs, expected)):
        assert_close(a.detach(), e.detach(), output_kind, msg=f"{op} output {i}")
    for i, (a, e) in enumerate(zip(grads, expected_grads)):
        assert_close(a, e, grad_kind, msg=f"{op} gradient of input {case.grad_inputs[i]}")


def test_quick_batch_has_the_awkward_segments(device):
    """The comparison above must meet empty histories and empty theme segments."""
    batch = attention_cases.build_batch(bench_attention.QUICK, torch.float32, device)
    assert (batch.offsets[1:] == batch.offsets[:-1]).any(), "expected an empty history"
    assert (batch.dispatch.segment_lengths == 0).any(), "expected an empty theme segment"


def test_fused_layer_keeps_the_parameter_names():
    from mos import MoSConfig, MoSLayer
    layer = MoSLayer(MoSConfig(dim=16, num_heads=2, num_themes=4, backend="reference"))
    names = [n for n, _ in layer.named_parameters()]
    assert [n for n, _ in providers_fused.fuse_layer(layer).named_parameters()] == names
    with pytest.raises(ValueError, match="layer: expected a module with target-attention encoders"):
        providers_fused.fuse_layer(torch.nn.Linear(2, 2))


def test_grouped_gemm_path(monkeypatch):
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert providers_fused.grouped_gemm_path(cuda_bf16) == "grouped_mm"
    assert providers_fused.grouped_gemm_path(types.SimpleNamespace(is_cuda=True, dtype=torch.float32)) == "padded_bmm"
    assert providers_fused.grouped_gemm_path(torch.zeros(2, 2, dtype=torch.bfloat16)) == "padded_bmm"
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    assert providers_fused.grouped_gemm_path(cuda_bf16) == "grouped_mm", "torch._grouped_mm still serves"
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert providers_fused.grouped_gemm_path(cuda_bf16) == "padded_bmm", "a torch without either name"


def test_varlen_causal_keyword():
    def older(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    def newer(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1)):
        pass

    def neither(query, key, value):
        pass

    assert attention_baselines.causal_keywords(older) == {"is_causal": True}
    assert attention_baselines.causal_keywords(newer) == {"window_size": (-1, 0)}
    with pytest.raises(TypeError, match="varlen_attn: expected an is_causal or window_size parameter, got"):
        attention_baselines.causal_keywords(neither)
