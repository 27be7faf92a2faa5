"""Backend selection shared by every op.

Each op is one public function with a `backend=` argument. "reference" is pure PyTorch (the
correctness oracle, runs anywhere), "triton" the fused kernels, "cuda" the C++ extension
(`cuda_ops`, csrc/), "auto" the fastest available for the tensor's device (CPU tensors always
take the reference; CUDA tensors the backend `FASTEST_ON_GPU` names, as measured).
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from .checks import check_choice

BACKENDS = ("auto", "reference", "triton", "cuda")
# The kernels compute in fp32 at most; float64 stays on the reference, which keeps it. The
# CUDA extension takes the same dtypes.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The concrete backends each op has. A layer asked for "triton" runs every op that has a
# Triton kernel on it and the rest on the reference; one asked for "cuda" runs the ops of the
# extension on it and the rest as "triton" would (`op_backends`).
IMPLEMENTED = {
    "session_pool": ("reference", "triton", "cuda"),
    "session_pool_route": ("reference", "triton", "cuda"),
    "theme_dispatch": ("reference", "triton", "cuda"),
    "theme_gather": ("reference", "triton", "cuda"),
    "theme_scatter": ("reference", "triton", "cuda"),
    "grouped_linear": ("reference", "triton"),
    "expert_target_attention": ("reference", "triton"),
    "jagged_self_attention": ("reference", "triton"),
    "linear_recurrence": ("reference", "triton"),
    "selective_scan": ("reference", "triton"),
}


# What "auto" runs on CUDA tensors, per op: the faster of "triton" and "cuda" in the harness
# (benchmarks/bench_kernels.py). No run has measured the CUDA extension on a GPU yet
# (benchmarks/results/README.md), so Triton stays the choice everywhere; tests/test_cuda_backend.py
# checks this table against the newest recorded results.
FASTEST_ON_GPU = {op: "triton" for op, backends in IMPLEMENTED.items() if "triton" in backends}


def kernel_ops(backend: str):
    """The operator namespace of a kernel backend: torch.ops.mos (Triton) or torch.ops.mos_cuda."""
    if backend == "cuda":
        reason = cuda_ext_reason()
        if reason is not None:
            raise RuntimeError(f"backend 'cuda': {reason}")
        return torch.ops.mos_cuda
    return torch.ops.mos


# What runs once the extension's operators are loaded: the package adds their Python side
# (cuda_registration), which imports the op modules, so neither this module nor cuda_ops imports it.
_on_cuda_load = []


def on_cuda_load(hook) -> None:
    """Runs `hook` (once) when `cuda_ext_reason` has loaded the operators."""
    _on_cuda_load.append(hook)


# cuda_ops is imported inside the functions: `python -m mos_kernels.cuda_ops` runs it as a script,
# which must not find it imported already by the package.
# Evaluated once, eagerly, when torch.compile traces a call: loading (or building) a library is
# nothing to trace, and its answer does not change within a process.
@torch.compiler.assume_constant_result
def cuda_ext_reason() -> str | None:
    """None when backend "cuda" can run here, else why not (builds the extension on first use)."""
    from .cuda_ops import unavailable_reason

    reason = unavailable_reason()
    while reason is None and _on_cuda_load:
        _on_cuda_load[0]()          # a hook that raises stays, to run again on the next call
        _on_cuda_load.pop(0)
    return reason


def cuda_emulating() -> bool:
    """MOS_CUDA_EMULATE=1: backend "cuda" runs the CPU emulation of the kernels."""
    from .cuda_ops import emulating

    return emulating()


def triton_available() -> bool:
    """Whether the triton package can be imported. Triton runs on CUDA tensors, or on CPU tensors
    under TRITON_INTERPRET=1 (tests); without it the ops run the reference ("auto")."""
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


def op_backends(layer_backend: str) -> Dict[str, str]:
    """{op: the backend it runs under} for a layer built with `layer_backend`, resolved once when
    the layer is built: "cuda" runs the ops the extension has and the others as "triton" would,
    "triton" falls back to "reference" for an op without a kernel, "auto" and "reference" pass
    through (each op call maps "auto" to its tensors' device)."""
    check_choice("backend", layer_backend, BACKENDS)
    chosen = {}
    for op, implemented in IMPLEMENTED.items():
        backend = "triton" if layer_backend == "cuda" and "cuda" not in implemented else layer_backend
        chosen[op] = "reference" if backend == "triton" and "triton" not in implemented else backend
    return chosen


def resolve_backend(backend: str, tensor: torch.Tensor, op: str) -> str:
    """Map `backend` to a concrete one for `op` on `tensor`'s device.

    Asking an op for a backend it lacks is an error, not a silent fallback: a benchmark must
    never time the wrong thing.
    """
    check_choice(f"{op}: backend", backend, BACKENDS)
    implemented = IMPLEMENTED[op]
    if backend == "auto":
        if tensor.is_cuda and "triton" in implemented and _triton_dtype(tensor) and triton_available():
            if FASTEST_ON_GPU.get(op) == "cuda" and cuda_ext_reason() is None:
                return "cuda"
            return "triton"
        return "reference"
    if backend not in implemented:
        raise NotImplementedError(f"{op}: backend {backend!r} is not implemented; available: {list(implemented)}")
    if backend in ("triton", "cuda"):
        if not _triton_dtype(tensor):
            names = ", ".join(str(d).replace("torch.", "") for d in TRITON_DTYPES)
            raise TypeError(f"{op}: backend {backend!r} expected dtype in ({names}), got "
                            f"{str(tensor.dtype).replace('torch.', '')} (backend='reference' computes in float64)")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed "
                               f"(not importable); pass backend='reference' (pure PyTorch) or 'auto', or install triton")
        if not tensor.is_cuda and not interpreting():
            raise ValueError(
                f"{op}: backend 'triton' expected CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {tensor.device}")
    if backend == "cuda":
        if not tensor.is_cuda and not cuda_emulating():
            raise ValueError(
                f"{op}: backend 'cuda' expected CUDA tensors (or MOS_CUDA_EMULATE=1), got a tensor on {tensor.device}")
        if tensor.is_cuda and cuda_emulating():
            raise ValueError(f"{op}: backend 'cuda' expected CPU tensors under MOS_CUDA_EMULATE=1 (the emulation "
                             f"runs on the CPU), got a tensor on {tensor.device}")
        reason = cuda_ext_reason()
        if reason is not None:
            raise RuntimeError(f"{op}: backend 'cuda' is unavailable: {reason}")
    return backend
