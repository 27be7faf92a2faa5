"""Compile every Triton kernel to sm_90 machine code on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts code the real compiler rejects, so CI also
compiles each kernel for Hopper with `triton.compile` over a grid of the constexpr
configurations the wrappers can launch: every dtype, the power-of-two blocks that the
supported widths (d <= 256) and theme counts (K <= 64) map to, and every boolean switch.

    python -m mos_kernels.compile_check [--jobs N] [--list]

Must run with TRITON_INTERPRET unset (the tests start it in a subprocess).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
BLOCK_D = (16, 32, 64, 128, 256)       # next_power_of_2(d) for d in 9..256
THEME_BLOCKS = ((2, 1), (8, 1), (8, 2), (16, 4), (32, 2), (64, 8))   # (BLOCK_K, TOP_K)
POOL_BLOCK_D = (16, 32, 64, 128, 256)   # max(next_power_of_2(d), 16): tl.dot needs 16
POOL_THEME_BLOCKS = ((16, 1), (16, 2), (16, 4), (32, 2), (64, 8))   # max(next_power_of_2(K), 16)

KERNEL_MODULES = ("session_pool", "theme_dispatch", "theme_gather")
Config = Tuple[str, Dict[str, str], Dict[str, object]]   # kernel name, signature, constexprs


def _pool_route_configs() -> List[Config]:
    out = []
    for (dtype, ptr), block_d in itertools.product(DTYPES.items(), POOL_BLOCK_D):
        for route, (block_k, top_k) in [(False, (16, 1))] + [(True, tk) for tk in POOL_THEME_BLOCKS]:
            if route and dtype != "bf16" and (block_k, top_k) != (16, 1):
                continue   # the theme blocks do not interact with the value dtype
            blocks = {"BLOCK_S": 16, "BLOCK_T": 64, "BLOCK_D": block_d, "BLOCK_K": block_k}
            fwd_sig = {"values_ptr": ptr, "offsets_ptr": "*i64", "protos_ptr": "*fp32", "pooled_ptr": ptr,
                       "scores_ptr": "*fp32", "probs_ptr": "*fp32", "themes_ptr": "*i64", "num_sessions": "i32",
                       "dim": "i32", "num_themes": "i32", "inv_temperature": "fp32", "eps": "fp32"}
            out.append(("_pool_route_fwd", fwd_sig, {**blocks, "TOP_K": top_k, "ROUTE": route}))
            if top_k > 1 and (block_k, 1) in POOL_THEME_BLOCKS:
                continue   # the backward has no TOP_K: the (BLOCK_K, 1) entry covers it
            bwd_sig = {"g_pooled_ptr": ptr, "pooled_ptr": ptr, "g_scores_ptr": "*fp32", "g_probs_ptr": "*fp32",
                       "probs_ptr": "*fp32", "protos_ptr": "*fp32", "offsets_ptr": "*i64", "g_values_ptr": ptr,
                       "g_scores_total_ptr": "*fp32", "num_sessions": "i32", "dim": "i32", "num_themes": "i32",
                       "inv_temperature": "fp32", "eps": "fp32"}
            out.append(("_pool_route_bwd", bwd_sig, {**blocks, "ROUTE": route}))
    return out


def _dispatch_configs() -> List[Config]:
    out = []
    for block_k, top_k in THEME_BLOCKS:
        sig = {"themes_ptr": "*i64", "session_offsets_ptr": "*i64", "example_session_offsets_ptr": "*i64",
               "rank_ptr": "*i64", "counts_ptr": "*i64", "num_examples": "i32", "num_themes": "i32"}
        out.append(("_dispatch_count", sig, {"BLOCK_S": 64, "BLOCK_K": block_k, "TOP_K": top_k}))
    for top_k, capacity in itertools.product((1, 2, 4, 8), (False, True)):
        sig = {"themes_ptr": "*i64", "session_offsets_ptr": "*i64", "session_example_ptr": "*i64",
               "rank_ptr": "*i64", "counts_ptr": "*i64", "theme_offsets_ptr": "*i64", "gather_index_ptr": "*i64",
               "row_source_ptr": "*i64", "inverse_ptr": "*i64", "num_sessions": "i32", "num_examples": "i32",
               "capacity": "i32"}
        out.append(("_dispatch_fill", sig, {"BLOCK_S": 32, "BLOCK_T": 128, "TOP_K": top_k, "HAS_CAPACITY": capacity}))
    return out


def _gather_configs() -> List[Config]:
    out = []
    for (dtype, ptr), block_d, has_gate in itertools.product(DTYPES.items(), BLOCK_D, (False, True)):
        gate_sig = ptr if has_gate else "constexpr"
        gate_const = {} if has_gate else {"gate_ptr": None}
        sig = {"src_ptr": ptr, "index_ptr": "*i64", "gate_ptr": gate_sig, "out_ptr": ptr, "num_rows": "i32", "dim": "i32"}
        out.append(("_gather_rows", sig, {**gate_const, "HAS_GATE": has_gate, "BLOCK_R": 32, "BLOCK_D": block_d}))
        for slots in ((1, 2) if dtype == "bf16" else (1,)):
            sig = {"rows_ptr": ptr, "inverse_ptr": "*i64", "gate_ptr": gate_sig, "out_ptr": ptr, "num_tokens": "i32",
                   "dim": "i32"}
            out.append(("_scatter_rows", sig, {**gate_const, "SLOTS": slots, "HAS_GATE": has_gate, "BLOCK_R": 32,
                                               "BLOCK_D": block_d}))
        if has_gate:
            sig = {"a_ptr": ptr, "b_ptr": ptr, "b_index_ptr": "*i64", "out_ptr": ptr, "num_rows": "i32", "dim": "i32"}
            out.append(("_row_dot", sig, {"BLOCK_R": 32, "BLOCK_D": block_d}))
    return out


def all_configs() -> List[Config]:
    return _pool_route_configs() + _dispatch_configs() + _gather_configs()


def _kernels():
    # Modules by path: the package re-exports functions under the same names.
    modules = [importlib.import_module(f"mos_kernels.{name}") for name in KERNEL_MODULES]
    # A launched kernel reads its program id; @triton.jit helpers it calls are compiled inside it.
    return {name: fn for m in modules for name, fn in vars(m).items()
            if type(fn).__name__ == "JITFunction" and "program_id" in fn.src}


def compile_one(config: Config) -> Tuple[str, float, str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs = config
    fn = _kernels()[name]
    signature = dict(signature)
    for key in constexprs:
        signature[key] = "constexpr"
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        ok = "cubin" in compiled.asm
        return name, time.perf_counter() - start, "" if ok else "no cubin produced"
    except Exception as exc:  # report every failing configuration, not just the first
        return name, time.perf_counter() - start, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: TRITON_INTERPRET=1 is set; unset it to compile for the GPU", file=sys.stderr)
        return 2
    configs = all_configs()
    names = sorted({c[0] for c in configs})
    missing = sorted(set(_kernels()) - set(names))
    if missing:
        print(f"compile_check: kernels without a configuration: {missing}", file=sys.stderr)
        return 1
    if args.list:
        for name, _, constexprs in configs:
            print(name, constexprs)
        return 0
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(compile_one, configs))
    failures = [(cfg, err) for cfg, (_, _, err) in zip(configs, results) if err]
    for (name, _, constexprs), err in failures:
        print(f"FAIL {name} {constexprs}: {err}", file=sys.stderr)
    print(f"compile_check: {len(configs) - len(failures)}/{len(configs)} configurations of {len(names)} kernels "
          f"compiled to sm_90 in {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
