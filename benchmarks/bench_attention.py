"""Benchmarks of the attention and grouped-GEMM kernels and the fused MoS layer.

    python -m benchmarks.bench_attention --out DIR [--quick] [--ops layer,expert_target_attention,...]
                                         [--dtype bf16,fp16,fp32] [--device cuda]

Ops (rows of DIR/bench_attention.csv):
  expert_target_attention  the theme experts' target attention over the dispatch (gather fused)
  jagged_self_attention    causal attention inside every theme subsequence (the theme-major layout)
  dense_attention   causal SDPA over every whole sequence, padded to the longest: what MoS replaces
  dense_attention_varlen  the same attention without padding (torch's varlen flash attention)
  grouped_linear    the experts' grouped linear, d -> 3d, over the theme-major rows
  layer             MoSLayer (target-attention experts) forward + backward, parameters included
  mos_transformer   MoSLayer(encoder="transformer", global_scope="sessions"), Triton
  dense_transformer one pre-LN causal transformer layer (SDPA) over the padded whole sequences
Providers per op: OP_PROVIDERS (benchmarks/README.md says what each runs). The inputs and the
cases, with their floors: benchmarks/attention_cases.py.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import run, targets
from benchmarks.attention_cases import HEADS, Shape, build_case
from benchmarks.harness import DTYPES, PROVIDERS, Provider
from benchmarks.providers_fused import COMPILED_FUSED
from benchmarks.run import Bench
from benchmarks.tables import Target

TARGET = Shape(**targets.ATTENTION_POINT)
QUICK = Shape(L=64, d=32, K=4, B=4)
SWEEP_L = (1000, 2048, 4096, 8192)

EXTRA_PROVIDERS = {p.name: p for p in (COMPILED_FUSED, Provider("sdpa_padded", "sdpa_padded"),
                                       Provider("flex", "flex"), Provider("sdpa", "sdpa"),
                                       Provider("varlen_attn", "varlen_attn"))}
ALL_PROVIDERS = {**PROVIDERS, **EXTRA_PROVIDERS}
CUDA_ONLY = ("flex", "varlen_attn")
# Which providers time each op, in this order after the reference: torch.compile last, so that a
# run cut short has the kernels' rows.
COMPARED = ("reference", "triton", "compiled_fused", "compiled")
OP_PROVIDERS = {
    "layer": COMPARED,
    "expert_target_attention": COMPARED,
    "jagged_self_attention": ("reference", "triton", "sdpa_padded", "flex"),
    "dense_attention": ("sdpa",),
    "dense_attention_varlen": ("varlen_attn",),
    "grouped_linear": COMPARED,
    "mos_transformer": ("triton",),
    "dense_transformer": ("sdpa",),
}
OPS = tuple(OP_PROVIDERS)
# Swept over L (after the target point), as far as a time budget goes.
SWEPT = ("jagged_self_attention", "dense_attention", "dense_attention_varlen", "mos_transformer", "dense_transformer")
TRANSFORMERS = ("mos_transformer", "dense_transformer")

TARGETS = targets.ATTENTION_TARGETS


# ----------------------------------------------------------------------------- plan

def _target_cases(ops: Sequence[str], dtype: torch.dtype) -> List[Tuple[str, Shape, torch.dtype]]:
    """The target point of every op, the transformers at L = 4096 (their comparison)."""
    return ([(op, TARGET, dtype) for op in ops if op not in TRANSFORMERS]
            + [(op, Shape(L=4096), dtype) for op in TRANSFORMERS if op in ops])


def plan(ops: Sequence[str], dtypes: Sequence[str], quick: bool,
         targets_only: bool = False) -> List[Tuple[str, Shape, torch.dtype]]:
    """Quick: QUICK for every op and dtype; targets_only: the target cases in every dtype. Full,
    so that a run cut short keeps the targets: the target cases in bf16, the bf16 sweep of L for
    the attention and transformer ops, then fp16/fp32 at the target point."""
    if quick:
        return [(op, QUICK, DTYPES[dt]) for dt in dtypes for op in ops]
    if targets_only:
        return [case for dt in dtypes for case in _target_cases(ops, DTYPES[dt])]
    cases = []
    if "bf16" in dtypes:
        cases += _target_cases(ops, torch.bfloat16)
        cases += [(op, Shape(L=length), torch.bfloat16) for length in SWEEP_L for op in SWEPT if op in ops
                  and (op, length) not in {(o, 4096) for o in TRANSFORMERS}
                  and not (length == TARGET.L and op not in TRANSFORMERS)]
    cases += [(op, TARGET, DTYPES[dt]) for dt in dtypes if dt != "bf16" for op in ops]
    return cases


def providers_for(op: str, shape: Shape, names: Sequence[str], device: torch.device) -> List[Provider]:
    chosen = [ALL_PROVIDERS[n] for n in OP_PROVIDERS[op] if n in names]
    # FlexAttention has no CPU backward, varlen flash attention no CPU kernel. Flex compiles anew
    # for every shape (~20 s with its backward) and the padded reference is slow: in the sweep both
    # run at L = 1000 and 4096 only.
    swept = shape.L not in (TARGET.L, 4096, QUICK.L)
    return [p for p in chosen if not (p.name in CUDA_ONLY and device.type != "cuda")
            and not (swept and p.name in ("flex", "reference"))]


def targets_at(quick: bool, dtypes: Sequence[str]) -> Tuple[Sequence[Target], Dict[str, object], str]:
    """The targets at the target point (bf16) or, with --quick, at QUICK in the first dtype (and
    then those fixed at another point too: the quick run has only its own)."""
    shape, dtype = (QUICK, dtypes[0]) if quick else (TARGET, "bf16")
    where = dict(dtype=dtype, L=shape.L, d=shape.d, K=shape.K)
    chosen = TARGETS if not quick else tuple(replace(t, at=()) for t in TARGETS)
    title = f"Targets at {dtype}, B={shape.examples}, L={shape.L}, d={shape.d}, K={shape.K}, H={HEADS}"
    return chosen, where, title


def default_providers(requested: Optional[Sequence[str]], device: torch.device) -> List[str]:
    return list(requested) if requested is not None else list(ALL_PROVIDERS)


BENCH = Bench(
    name="bench_attention", description=__doc__.split("\n\n")[0], ops=OPS, providers=tuple(ALL_PROVIDERS),
    default_providers=default_providers, plan=plan, build_case=build_case, providers_for=providers_for,
    targets=targets_at,
    dtype_help="default: bf16 (the sweeps), fp16,fp32 at the target point; --quick: fp32 on CPU, bf16 on CUDA",
    plan_help="targets: the target point (transformers at L=4096) in every --dtype, no sweep")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
