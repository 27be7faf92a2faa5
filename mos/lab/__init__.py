"""The CTR lab around the MoS layer: the CTR model and the baselines it is compared with
(`model`, `baselines`), data (`data`: the embedded synthetic generator, MovieLens-100k, logs),
training (`train`, `run_state`, `checkpoint`, `distributed`), evaluation and metrics, the
FLOPs-versus-accuracy profile (`profiling`), scoring (`predict`) and the `python -m mos` command
line (`cli`). The layer package (`mos`) never imports it."""
