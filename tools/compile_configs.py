"""Every configuration the kernels' launch code can produce, for the sm_90 compile check.

The block sizes, warps and pipeline depths come from each op's launch rules (the same
functions its launch calls: `pool_route_blocks`, `count_blocks`, `fill_blocks`, `row_blocks`,
`recurrence_blocks`, `attention_blocks`, `attention_tiles`, grouped_linear's `_block`), evaluated over what the
ops accept: every dtype, widths d <= 256, theme counts K <= 64, top_k <= 64 and every boolean
switch. A configuration is (kernel name, signature, constexprs); `num_warps` / `num_stages`
among the constexprs are launch options (`LAUNCH_OPTIONS`), not arguments.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
POOL_BLOCK_D = (16, 32, 64, 128, 256)   # max(next_power_of_2(d), 16)
POOL_THEME_BLOCKS = ((2, 1), (8, 2), (16, 4), (32, 2), (64, 8))   # max(next_power_of_2(K), 2)

# The modules that define the @triton.jit kernels (and their MIN_WARPS_PER_SM / SPILLS_ALLOWED).
KERNEL_MODULES = ("session_pool_kernels", "theme_dispatch_kernels", "theme_gather_kernels", "grouped_linear_kernels",
                  "expert_target_attention_kernels", "jagged_self_attention_kernels", "linear_recurrence_kernels",
                  "selective_scan_kernels")
Config = Tuple[str, Dict[str, str], Dict[str, object]]   # kernel name, signature, constexprs
LAUNCH_OPTIONS = ("num_warps", "num_stages")   # may appear among a configuration's constexprs


def _torch_dtype(name: str):
    """The torch dtype of a DTYPES key: the wrappers' block choices take torch dtypes."""
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _pool_route_configs() -> List[Config]:
    from mos_kernels.session_pool import NUM_STAGES, NUM_WARPS, pool_route_blocks   # what a launch uses

    out = []
    for (dtype, ptr), block_d in itertools.product(DTYPES.items(), POOL_BLOCK_D):
        themes = POOL_THEME_BLOCKS if dtype == "bf16" else POOL_THEME_BLOCKS[-1:]   # the largest: most registers
        for route, (block_k, top_k) in [(False, (2, 1))] + [(True, tk) for tk in themes]:
            blocks = {**pool_route_blocks(block_d, block_k if route else 0), "TOP_K": top_k, "ROUTE": route,
                      "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}
            fwd_sig = {"values_ptr": ptr, "offsets_ptr": "*i64", "protos_ptr": "*fp32", "pooled_ptr": ptr,
                       "scores_ptr": "*fp32", "probs_ptr": "*fp32", "themes_ptr": "*i64", "gate_ptr": ptr,
                       "num_sessions": "i32", "dim": "i32", "num_themes": "i32", "inv_temperature": "fp32",
                       "eps": "fp32"}
            out.append(("_pool_route_fwd", fwd_sig, {**blocks, "STAGES": NUM_STAGES}))
            unaligned = pool_route_blocks(block_d - 1, block_k if route else 0)   # a width not a multiple of 16
            out.append(("_pool_route_fwd", fwd_sig, {**blocks, **unaligned, "STAGES": NUM_STAGES}))
            bwd_sig = {"g_pooled_ptr": ptr, "pooled_ptr": ptr, "g_scores_ptr": "*fp32", "g_probs_ptr": "*fp32",
                       "g_gate_ptr": ptr, "probs_ptr": "*fp32", "themes_ptr": "*i64", "protos_ptr": "*fp32",
                       "offsets_ptr": "*i64", "g_values_ptr": ptr, "g_protos_ptr": "*fp32", "num_sessions": "i32",
                       "dim": "i32", "num_themes": "i32", "inv_temperature": "fp32", "eps": "fp32"}
            out.append(("_pool_route_bwd", bwd_sig, {**blocks, **pool_route_blocks(block_d, block_k if route else 0,
                                                                                 backward=True)}))
    return out


def _dispatch_configs() -> List[Config]:
    from mos_kernels.theme_dispatch import count_blocks, fill_blocks

    out = []
    count_sig = {"themes_ptr": "*i64", "session_offsets_ptr": "*i64", "example_session_offsets_ptr": "*i64",
                 "rank_ptr": "*i32", "counts_ptr": "*i32", "num_examples": "i32", "num_themes": "i32", "top_k": "i32"}
    for num_themes in (2, 4, 8, 16, 32, 64):   # every BLOCK_K of K <= 64
        block_s, block_k = count_blocks(num_themes)
        out.append(("_dispatch_count", count_sig, {"BLOCK_S": block_s, "BLOCK_K": block_k}))
    # The fill copies the gate's bits: one kernel per width (bf16/fp16, fp32, fp64).
    for gate, top_k, capped in itertools.product(("*i16", "*i32", "*i64"), (1, 2, 4, 8, 16, 32, 64), (False, True)):
        block_s, block_t, block_j = fill_blocks(top_k)   # any other top_k <= 64 launches one of these
        sig = {"themes_ptr": "*i64", "gate_ptr": gate, "session_offsets_ptr": "*i64", "session_example_ptr": "*i64",
               "rank_ptr": "*i32", "counts_ptr": "*i32", "theme_offsets_ptr": "*i64", "gather_index_ptr": "*i64",
               "row_gate_ptr": gate, "inverse_ptr": "*i64", "num_sessions": "i32", "num_examples": "i32",
               "top_k": "i32", "max_theme_tokens": "i32"}
        out.append(("_dispatch_fill", sig, {"BLOCK_S": block_s, "BLOCK_T": block_t, "BLOCK_J": block_j,
                                            "HAS_MAX_THEME_TOKENS": capped}))
    return out


def _gather_configs() -> List[Config]:
    from mos_kernels.theme_gather import row_blocks

    out = []
    # Every width the rows can have maps to one of these row blocks (next_power_of_2(d), d >= 1).
    for (dtype, ptr), block_d, has_gate in itertools.product(DTYPES.items(), [2 ** i for i in range(9)],
                                                             (False, True)):
        gate_sig = ptr if has_gate else "constexpr"
        block_r, _, num_warps = row_blocks(block_d, _torch_dtype(dtype))   # the rows per program the wrapper picks
        gate_const = {"num_warps": num_warps} if has_gate else {"gate_ptr": None, "num_warps": num_warps}
        sig = {"src_ptr": ptr, "index_ptr": "*i64", "gate_ptr": gate_sig, "out_ptr": ptr, "num_rows": "i32", "dim": "i32"}
        out.append(("_gather_rows", sig, {**gate_const, "HAS_GATE": has_gate, "BLOCK_R": block_r, "BLOCK_D": block_d}))
        for slots in ((1, 2) if dtype == "bf16" else (1,)):
            sig = {"rows_ptr": ptr, "inverse_ptr": "*i64", "gate_ptr": gate_sig, "out_ptr": ptr, "num_tokens": "i32",
                   "dim": "i32"}
            out.append(("_scatter_rows", sig, {**gate_const, "SLOTS": slots, "HAS_GATE": has_gate, "BLOCK_R": block_r,
                                               "BLOCK_D": block_d}))
        if has_gate:
            sig = {"a_ptr": ptr, "b_ptr": ptr, "b_index_ptr": "*i64", "out_ptr": ptr, "num_rows": "i32", "dim": "i32"}
            out.append(("_row_dot", sig, {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": num_warps}))
    return out


# The tensor-core kernels. The dtype decides the tl.dot path (fp32: three TF32 products, the costly one to
# compile; bf16/fp16: one), the blocks decide the tiles, the switches only add index
# loads and epilogue terms. So: every block shape in bf16 and fp32 with every switch on, every
# launchable combination of switches in bf16 at the blocks of the target width (d = 64), and
# fp16 (lowered like bf16) at those blocks with every switch on.
PRECISION = {"fp32": "tf32x3", "fp16": "tf32", "bf16": "tf32"}   # mos_kernels._launch.dot_precision
ATTENTION_BLOCK_D = (16, 32, 64, 128, 256)   # max(next_power_of_2(d), 16); 32-row tiles above 128
HEAD_BLOCKS = (16, 32, 64, 128, 256)         # max(next_power_of_2(head_dim), 16)


def _optional(name: str, present: bool, ptr: str, sig: Dict[str, str], const: Dict[str, object]) -> None:
    """An optional pointer argument: typed when passed, a None constexpr when not."""
    if present:
        sig[name] = ptr
    else:
        sig[name] = "constexpr"
        const[name] = None


def _grouped_mm_config(dtype: str, blocks, transpose_w: bool, bias: bool) -> Config:
    """One `_grouped_mm` launch: value dtype, (BLOCK_N, BLOCK_K), W read transposed or not, a bias
    or not."""
    ptr = DTYPES[dtype]
    sig = {"a_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, "tile_expert_ptr": "*i64", "tile_start_ptr": "*i64",
           "offsets_ptr": "*i64", "num_experts": "i32", "k_dim": "i32", "n_dim": "i32", "stride_a": "i32",
           "stride_out": "i32"}
    const = {"TRANSPOSE_W": transpose_w, "HAS_BIAS": bias, "PRECISION": PRECISION[dtype], "BLOCK_M": 64,
             "BLOCK_N": blocks[0], "BLOCK_K": blocks[1]}
    _optional("bias_ptr", bias, ptr, sig, const)
    return "_grouped_mm", sig, const


def _grouped_mm_configs() -> List[Config]:
    from mos_kernels.grouped_linear import _block

    mm_blocks = sorted({_block(2 ** i) for i in range(16)})   # the block of every width the op takes
    every_block = list(itertools.product(mm_blocks, mm_blocks))
    # The forward: without a bias in bf16 at the target width's blocks, with one everywhere.
    plans = [("bf16", (64, 64), False)] + [(dtype, blocks, True) for dtype in ("bf16", "fp32")
                                           for blocks in every_block] + [("fp16", (64, 64), True)]
    out = [_grouped_mm_config(dtype, blocks, False, bias) for dtype, blocks, bias in plans]
    # The input gradient: W[e] read transposed, no bias.
    for dtype, blocks in itertools.product(("bf16", "fp16", "fp32"), every_block):
        if dtype != "fp16" or blocks == (64, 64):
            out.append(_grouped_mm_config(dtype, blocks, True, False))
    plans = [(dtype, blocks) for dtype in ("bf16", "fp32") for blocks in every_block] + [("fp16", (64, 64))]
    for dtype, (block_n, block_k) in plans:
        ptr = DTYPES[dtype]
        sig = {"a_ptr": ptr, "g_ptr": ptr, "offsets_ptr": "*i64", "dw_ptr": "*fp32", "db_ptr": "*fp32",
               "k_dim": "i32", "n_dim": "i32", "stride_a": "i32", "stride_g": "i32", "splits": "i32"}
        const = {"PRECISION": PRECISION[dtype], "BLOCK_M": 64, "BLOCK_N": block_n, "BLOCK_K": block_k}
        out.append(("_grouped_mm_weight_grad", sig, const))
    return out


def _target_attention_configs() -> List[Config]:
    from mos_kernels.expert_target_attention_kernels import attention_blocks

    out = []
    switches = ((False, False), (True, False), (True, True))    # (HAS_INDEX, HAS_GATE)
    for kernel in ("_target_attention_fwd", "_target_attention_bwd"):
        biases = (False, True) if kernel == "_target_attention_fwd" else (False,)
        every = [(i, g, b) for i, g in switches for b in biases]
        plans = [("bf16", 64, on) for on in every[:-1]]
        plans += [(dtype, block_d, every[-1]) for dtype in ("bf16", "fp32") for block_d in ATTENTION_BLOCK_D]
        plans += [("fp16", 64, every[-1])]
        for dtype, block_d, (has_index, has_gate, has_bias) in plans:
            ptr = DTYPES[dtype]
            sig = {"tokens_ptr": ptr, "query_ptr": ptr, "w_key_ptr": ptr, "w_value_ptr": ptr, "offsets_ptr": "*i64",
                   "num_examples": "i32", "dim": "i32", "num_heads": "i32", "head_dim": "i32", "scale": "fp32"}
            # the blocks, warps and pipeline depth the wrapper picks for this dtype and width
            block_t, _, num_warps, num_stages = attention_blocks(block_d, _torch_dtype(dtype),
                                                                 kernel == "_target_attention_bwd")
            const = {"HAS_INDEX": has_index, "HAS_GATE": has_gate, "PRECISION": PRECISION[dtype], "BLOCK_T": block_t,
                     "BLOCK_D": block_d, "BLOCK_H": 16, "NUM_STAGES": num_stages, "num_warps": num_warps,
                     "num_stages": num_stages}
            _optional("index_ptr", has_index, "*i64", sig, const)
            _optional("gate_ptr", has_gate, ptr, sig, const)
            if kernel == "_target_attention_fwd":
                _optional("b_value_ptr", has_bias, ptr, sig, const)
                const["HAS_BIAS"] = has_bias
                sig.update({"out_ptr": ptr, "pooled_ptr": "*fp32", "lse_ptr": "*fp32"})
            else:
                sig.update({"g_out_ptr": ptr, "pooled_ptr": "*fp32", "lse_ptr": "*fp32", "g_rows_ptr": ptr,
                            "g_gate_ptr": ptr, "g_query_ptr": ptr, "g_qf_ptr": "*fp32"})
            out.append((kernel, sig, const))
    return out


def _self_attention_configs() -> List[Config]:
    from mos_kernels.jagged_self_attention_kernels import LONGEST_BUCKETS, attention_tiles

    out = []
    plans = [(dtype, block_dh, True) for dtype in ("bf16", "fp32") for block_dh in HEAD_BLOCKS]
    plans += [("bf16", 64, False), ("fp16", 64, True)]
    for dtype, block_dh, causal in plans:
        ptr = DTYPES[dtype]
        # every tile the wrapper picks at this width: one per bucket of the longest segment
        tiles = sorted({attention_tiles(longest, block_dh, _torch_dtype(dtype)) for longest in (0,) + LONGEST_BUCKETS})
        for block_m, block_n, _, num_warps, num_stages in tiles:
            const = {"CAUSAL": causal, "PRECISION": PRECISION[dtype], "BLOCK_M": block_m, "BLOCK_N": block_n,
                     "BLOCK_DH": block_dh, "num_warps": num_warps, "num_stages": num_stages}
            out += _self_attention_kernels(ptr, const)
    return out


def _self_attention_kernels(ptr: str, const: Dict[str, object]) -> List[Config]:
    tiles = {"tile_segment_ptr": "*i64", "tile_start_ptr": "*i64", "offsets_ptr": "*i64", "num_segments": "i32",
             "num_heads": "i32", "head_dim": "i32", "stride_q": "i32", "stride_k": "i32", "stride_v": "i32"}
    qkv = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr}
    grads = {"g_out_ptr": ptr, "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    return [("_self_attention_fwd", {**qkv, "out_ptr": ptr, "lse_ptr": "*fp32", **tiles, "stride_out": "i32",
                                     "scale": "fp32"}, const),
            ("_self_attention_bwd_kv", {**qkv, **grads, "g_k_ptr": ptr, "g_v_ptr": ptr, **tiles, "scale": "fp32"},
             const),
            ("_self_attention_bwd_q", {**qkv, **grads, "g_q_ptr": ptr, **tiles, "scale": "fp32"}, const)]


def _recurrence_configs() -> List[Config]:
    from mos_kernels.linear_recurrence import recurrence_blocks

    out = []
    # Every width maps to one of these blocks (next_power_of_2(width), at most 128).
    for (dtype, ptr), block_c in itertools.product(DTYPES.items(), [2 ** i for i in range(8)]):
        _, num_warps = recurrence_blocks(block_c)
        const = {"BLOCK_C": block_c, "num_warps": num_warps}
        out.append(("_recurrence_fwd", {"a_ptr": ptr, "b_ptr": ptr, "offsets_ptr": "*i64", "h_ptr": ptr,
                                        "width": "i32"}, const))
        out.append(("_recurrence_bwd", {"g_ptr": ptr, "a_ptr": ptr, "h_ptr": ptr, "offsets_ptr": "*i64",
                                        "g_a_ptr": ptr, "g_b_ptr": ptr, "width": "i32"}, const))
    return out


def _selective_scan_configs() -> List[Config]:
    from mos_kernels.selective_scan import CHUNK, MAX_STATE, scan_blocks

    out = []
    # The blocks depend on the state size only: one configuration per power of two up to MAX_STATE.
    for (dtype, ptr), block_s in itertools.product(DTYPES.items(), [2 ** i for i in range(MAX_STATE.bit_length())]):
        rows = {"u_ptr": ptr, "delta_ptr": ptr, "a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "offsets_ptr": "*i64",
                "first_chunk_ptr": "*i64"}
        sizes = {"dim": "i32", "state": "i32", "segments_per_expert": "i32"}
        for kernel, backward in (("_selective_scan_fwd", False), ("_selective_scan_bwd", True)):
            block_d, _, num_warps = scan_blocks(block_s, backward)
            const = {"CHUNK": CHUNK, "BLOCK_D": block_d, "BLOCK_S": block_s, "num_warps": num_warps}
            if backward:
                sig = {"g_y_ptr": ptr, **rows, "entering_ptr": "*fp32", "g_u_ptr": ptr, "g_delta_ptr": ptr,
                       "g_a_ptr": "*fp32", "g_b_ptr": "*fp32", "g_c_ptr": "*fp32", "num_rows": "i32", **sizes}
                out.append((kernel, sig, const))
            else:
                sig = {**rows, "y_ptr": ptr, "entering_ptr": "*fp32", **sizes}
                # Training stores the chunks' entering states, inference does not.
                out += [(kernel, sig, {**const, "STORE_ENTERING": store}) for store in (True, False)]
    return out


def all_configs() -> List[Config]:
    """Every launchable configuration once (two rules can produce the same one), in listing order."""
    found = {}
    for config in (_pool_route_configs() + _dispatch_configs() + _gather_configs() + _grouped_mm_configs()
                   + _target_attention_configs() + _self_attention_configs() + _recurrence_configs()
                   + _selective_scan_configs()):
        found.setdefault(repr(config), config)
    return list(found.values())
