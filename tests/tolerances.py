"""The one table of test tolerances, with the reason for each.

Keys are (kind of computation, dtype). `assert_close(actual, expected, kind)` looks them up.
Never loosen an entry to turn a test green: find out why it differs.
"""
from __future__ import annotations

import torch

# (atol, rtol)
TOLERANCES = {
    # Data movement (gather, scatter with one source per row, dispatch): nothing is computed.
    ("exact", torch.float32): (0.0, 0.0),
    ("exact", torch.float16): (0.0, 0.0),
    ("exact", torch.bfloat16): (0.0, 0.0),
    # Sums/means in fp32 in a different order than the oracle: a few ulps of the sum's magnitude.
    ("reduction", torch.float32): (1e-5, 1e-5),
    # fp16 inputs are accumulated in fp32 and rounded once to fp16 (relative step 2^-11 ~ 4.9e-4).
    ("reduction", torch.float16): (1e-3, 1e-3),
    # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 3.9e-3); one rounding plus the input's.
    ("reduction", torch.bfloat16): (1e-2, 1e-2),
    # Attention/matmul chains: exp, division and dot products re-associated; fp32 exact-ish on CPU.
    ("attention", torch.float32): (1e-4, 1e-4),
    ("attention", torch.float16): (2e-3, 2e-3),
    ("attention", torch.bfloat16): (2e-2, 2e-2),
    # Whole layer / model: several attention chains and GEMMs in sequence.
    ("layer", torch.float32): (2e-4, 2e-4),
    # Gradients of attention in fp32 (softmax backward subtracts nearly equal terms).
    ("attention_grad", torch.float32): (2e-4, 2e-4),
    # Against a float64 oracle: double rounding only.
    ("float64", torch.float64): (1e-10, 1e-10),
}

# On the GPU fp32 tl.dot runs in TF32 (10 mantissa bits) unless asked otherwise.
GPU_TF32 = {("attention", torch.float32): (2e-3, 2e-3)}


def tolerance(kind: str, dtype: torch.dtype, *, gpu: bool = False):
    if gpu and (kind, dtype) in GPU_TF32:
        return GPU_TF32[(kind, dtype)]
    return TOLERANCES[(kind, dtype)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, *, dtype: torch.dtype = None,
                 msg: str = "") -> None:
    """`dtype`: the precision the computation ran in (default: expected's dtype), which sets the tolerance."""
    atol, rtol = tolerance(kind, dtype or expected.dtype, gpu=actual.is_cuda)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=(lambda m: f"{msg}: {m}") if msg else None)


# Statistical checks: a Monte Carlo estimate against the quantity it estimates, with the reason
# for each relative error allowed.
STATISTICAL = {
    # A standard error against the spread of the statistic over R simulated replications: the
    # sample SD of R draws has relative error ~1/sqrt(2R) (0.05 at R = 200); three of those.
    "se_calibration": 0.15,
    # An expected AUC by Monte Carlo over label redraws against its closed form: the redraws'
    # own standard error (~0.2/sqrt(R) absolute at R = 2000), four of those.
    "expected_auc": 0.02,
}
