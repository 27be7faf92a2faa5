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


def triton_available() -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor, op: str, implemented=("reference",)) -> str:
    """Map `backend` to a concrete one for `op` on `tensor`'s device.

    `implemented` lists the concrete backends that `op` has. Asking for one it lacks is an
    error, not a silent fallback: a benchmark must never time the wrong thing.
    """
    check_choice(f"{op}: backend", backend, BACKENDS)
    if backend == "auto":
        if tensor.is_cuda and "triton" in implemented and triton_available():
            return "triton"
        return "reference"
    if backend not in implemented:
        raise NotImplementedError(f"{op}: backend {backend!r} is not implemented; available: {list(implemented)}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package, which is not importable")
        if not tensor.is_cuda and not interpreting():
            raise ValueError(
                f"{op}: backend 'triton' expected CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {tensor.device}")
    return backend
