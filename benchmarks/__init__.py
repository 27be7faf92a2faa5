"""Benchmarks of the mos_kernels ops: `harness` (shared timing, floors, CSV, tables) and one
module per group of kernels (`bench_kernels`: pooling + routing, dispatch, gather, scatter).
See benchmarks/README.md."""
