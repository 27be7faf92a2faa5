"""The benchmarks' targets and target points, where summarize.py reads them without torch.

The GPU check prints its summary from an EXIT trap under a short timeout; importing torch there
(seconds on an idle machine, far more on a loaded one) could cost the summary itself. The
benchmark modules build their target shapes from these points.
"""
from __future__ import annotations

from benchmarks.tables import Target

# bench_kernels: bf16, B = 2^21 // L examples (T ~ 2M tokens).
KERNELS_POINT = dict(L=1024, d=128, K=8, top_k=1)
KERNELS_TARGETS = (
    Target("session_pool_route fwd: % of bandwidth floor", "session_pool_route", "fwd", "triton", "pct_floor", 70.0,
           " %"),
    Target("theme_gather fwd: % of bandwidth floor", "theme_gather", "fwd", "triton", "pct_floor", 70.0, " %"),
    Target("theme_scatter fwd: % of bandwidth floor", "theme_scatter", "fwd", "triton", "pct_floor", 70.0, " %"),
    Target("theme_dispatch (+ gather): speedup over reference", "theme_dispatch", "fwd", "triton", "speedup_vs_eager",
           5.0, "x"),
    # One warp per (segment, 128 channels) walking its rows serially: the loads of a row do not
    # wait on the state, but nothing is measured yet; half the copy rate is the first goal.
    Target("linear_recurrence fwd+bwd: % of bandwidth floor", "linear_recurrence", "fwd+bwd", "triton", "pct_floor",
           50.0, " %"),
    # The fused scan never writes the [T, d, S] states the reference materialises several times.
    Target("selective_scan fwd+bwd: speedup over reference compiled", "selective_scan", "fwd+bwd", "triton",
           "speedup_vs_compiled", 4.0, "x"),
    Target("session_pool_route fwd+bwd: speedup over eager", "session_pool_route", "fwd+bwd", "triton",
           "speedup_vs_eager", 5.0, "x"),
    Target("session_pool_route fwd+bwd: speedup over compiled", "session_pool_route", "fwd+bwd", "triton",
           "speedup_vs_compiled", 2.0, "x"),
    # The CUDA extension must at least match Triton: Triton's time over CUDA's.
    *(Target(f"{op} {mode}: cuda vs triton", op, mode, "cuda", "median_ms", 1.0, "x", versus=(op, "triton"))
      for op, mode in (("session_pool_route", "fwd"), ("session_pool_route", "fwd+bwd"), ("theme_dispatch", "fwd"),
                       ("theme_gather", "fwd"), ("theme_gather", "fwd+bwd"), ("theme_scatter", "fwd"),
                       ("theme_scatter", "fwd+bwd"))),
)


# bench_attention: bf16, H = 2 heads.
ATTENTION_POINT = dict(L=1000, d=64, K=8, B=256)
ATTENTION_TARGETS = (
    Target("layer fwd+bwd: speedup over reference eager", "layer", "fwd+bwd", "triton", "speedup_vs_eager", 4.0, "x"),
    Target("layer fwd+bwd: speedup over reference compiled", "layer", "fwd+bwd", "triton", "speedup_vs_compiled",
           2.0, "x"),
    Target("layer fwd+bwd: speedup over compiled_fused", "layer", "fwd+bwd", "triton", "speedup_vs_compiled_fused",
           2.0, "x"),
    Target("expert_target_attention fwd: % of bandwidth floor", "expert_target_attention", "fwd", "triton",
           "pct_floor", 60.0, " %"),
    Target("jagged_self_attention fwd+bwd: speedup over FlexAttention", "jagged_self_attention", "fwd+bwd", "triton",
           "speedup", 1.2, "x", versus=("jagged_self_attention", "flex")),
    Target("L=4096: MoS transformer layer fwd+bwd speedup over one dense SDPA layer", "mos_transformer", "fwd+bwd",
           "triton", "speedup", 1.0, "x", versus=("dense_transformer", "sdpa"), at=(("L", 4096),)),
)


def where(point: dict, dtype: str = "bf16") -> dict:
    """The row columns a target point fixes (the benchmarks' B follows from L)."""
    return dict(dtype=dtype, **{k: v for k, v in point.items() if k != "B"})
