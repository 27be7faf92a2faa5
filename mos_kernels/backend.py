"""Backend selection shared by every op.

Each op is one public function with a `backend=` argument. "reference" is pure PyTorch (the
correctness oracle, runs anywhere), "triton" the fused kernels, "auto" the fastest available for
the tensor's device (CPU tensors always take the reference).
"""
from __future__ import annotations

import os

import torch

from ._checks import check_choice

BACKENDS = ("auto", "reference", "triton")
# The kernels compute in fp32 at most; float64 stays on the reference, which keeps it.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The concrete backends each op has. A layer asked for "triton" runs every op that has a
# Triton kernel on it and the rest on the reference (`op_backend`).
IMPLEMENTED = {
    "session_pool": ("reference", "triton"),
    "session_pool_route": ("reference", "triton"),
    "theme_route": ("reference",),
    "theme_dispatch": ("reference", "triton"),
    "theme_gather": ("reference", "triton"),
    "theme_scatter": ("reference", "triton"),
    "grouped_linear": ("reference", "triton"),
    "expert_target_attention": ("reference", "triton"),
    "jagged_self_attention": ("reference", "triton"),
}


def triton_available() -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_dtype(tensor: torch.Tensor) -> bool:
    """Integer ops (dispatch) take any index tensor; float ops need a kernel dtype."""
    return not tensor.is_floating_point() or tensor.dtype in TRITON_DTYPES


def op_backend(layer_backend: str, op: str) -> str:
    """The backend a layer built with `layer_backend` asks of `op`."""
    if layer_backend == "triton" and "triton" not in IMPLEMENTED[op]:
        return "reference"
    return layer_backend


def resolve_backend(backend: str, tensor: torch.Tensor, op: str) -> str:
    """Map `backend` to a concrete one for `op` on `tensor`'s device.

    Asking an op for a backend it lacks is an error, not a silent fallback: a benchmark must
    never time the wrong thing.
    """
    check_choice(f"{op}: backend", backend, BACKENDS)
    implemented = IMPLEMENTED[op]
    if backend == "auto":
        if tensor.is_cuda and "triton" in implemented and _triton_dtype(tensor) and triton_available():
            return "triton"
        return "reference"
    if backend not in implemented:
        raise NotImplementedError(f"{op}: backend {backend!r} is not implemented; available: {list(implemented)}")
    if backend == "triton":
        if not _triton_dtype(tensor):
            names = ", ".join(str(d).replace("torch.", "") for d in TRITON_DTYPES)
            raise TypeError(f"{op}: backend 'triton' expected dtype in ({names}), got "
                            f"{str(tensor.dtype).replace('torch.', '')} (backend='reference' computes in float64)")
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package, which is not importable")
        if not tensor.is_cuda and not interpreting():
            raise ValueError(
                f"{op}: backend 'triton' expected CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {tensor.device}")
    return backend
