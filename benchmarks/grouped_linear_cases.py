"""`grouped_linear` benchmark cases: one linear map per theme expert over its block of rows.

Built on a bench_attention batch (its theme-major dispatch: T rows, K experts), at the shape of
the transformer experts' query-key-value projection, d -> 3d:
  grouped_linear         plain rows (the experts' rows already gathered)
  grouped_linear_gather  rows gathered from the tokens and gated inside the op (the first layer)
Differentiated: the rows (or tokens), the weight, the bias, and for the gather the gate.
Providers: reference, compiled (the reference under torch.compile; its grouped GEMM is an opaque
custom op), compiled_fused (one grouped GEMM, benchmarks/providers_fused.py: torch's grouped_mm
in bf16 on CUDA, the padded batched GEMM as plain ops otherwise), triton.
"""
from __future__ import annotations

import mos_kernels as mk
from benchmarks.harness import Case
from benchmarks.providers_fused import fused_grouped_linear

WIDTH = 3     # d_out = WIDTH * d: the query-key-value projection


def grouped_linear_case(batch, gather: bool = False) -> Case:
    """`batch`: a bench_attention Batch."""
    c, dispatch = batch.columns, batch.dispatch
    num_rows, d, num_themes = c["T"], c["d"], c["K"]
    d_out = WIDTH * d
    e = batch.values.element_size()
    expert_offsets = dispatch.theme_offsets[::c["B"]]
    max_rows = int((expert_offsets[1:] - expert_offsets[:-1]).max())     # the reference pads to it
    x = batch.values if gather else batch.randn(num_rows, d, seed=41)
    weight = batch.randn(num_themes, d, d_out, seed=42, scale=d ** -0.5)
    bias = batch.randn(num_themes, d_out, seed=43)
    inputs = (x, weight, bias) + ((dispatch.row_gate.detach().to(batch.dtype),) if gather else ())

    def run(backend, x, weight, bias, gate=None):
        index = dict(gather_index=dispatch.gather_index, row_gate=gate) if gather else {}
        if backend == "fused":
            return (fused_grouped_linear(x, weight, bias, expert_offsets, max_rows=max_rows, **index),)
        if gather:
            index["inverse_index"] = dispatch.inverse_index
        return (mk.grouped_linear(x, weight, bias, expert_offsets, max_rows=max_rows, backend=backend, **index),)

    weights = num_themes * d * d_out * e + num_themes * d_out * e
    # The gather reads an int64 index and a gate per row; its backward writes the gates' gradient
    # and sums the rows' gradients into the tokens (T·d·e more, top-1 routing: T' = T).
    gathered = (num_rows * (8 + e), num_rows * (e + d * e)) if gather else (0, 0)
    return Case(
        op="grouped_linear_gather" if gather else "grouped_linear", kernels=(), run=run, inputs=inputs,
        dtype=batch.dtype, shape=c,
        bytes={
            # read the rows N·d·e, the weight and bias, the offsets (K+1)·8; write N·d_out·e
            "fwd": num_rows * d * e + weights + (num_themes + 1) * 8 + num_rows * d_out * e + gathered[0],
            # read the output gradient N·d_out·e, the rows and the weight; write the rows' and the
            # weight's and bias's gradients
            "bwd": num_rows * d_out * e + 2 * num_rows * d * e + 2 * weights + (num_themes + 1) * 8 + sum(gathered),
        },
        flops={"fwd": 2 * num_rows * d * d_out, "bwd": 4 * num_rows * d * d_out},
        grad_inputs=tuple(range(len(inputs))), grad_outputs=(0,))


def grouped_linear_gather_case(batch) -> Case:
    return grouped_linear_case(batch, gather=True)
