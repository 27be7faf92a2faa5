"""Benchmarks of the mos_kernels ops and the layer: `harness` (cases, providers, timing, floors),
`tables` and `targets` (CSV, tables, targets: standard library only), `run` (the command line
they share), one module per group of kernels (`bench_kernels`: pooling + routing, dispatch,
gather, scatter; `bench_attention`: the attention kernels, grouped linear, the layer) and
`summarize`. See benchmarks/README.md."""
