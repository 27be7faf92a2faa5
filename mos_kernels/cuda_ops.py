"""The CUDA C++ backend (`backend="cuda"`): loading the extension.

The kernels live in `csrc/` at the top of the repository and register the operators
`torch.ops.mos_cuda.*`, the same schemas as the Triton custom ops `torch.ops.mos.*` except
session_pool_route(_backward), which keep an earlier one (no gate output; the prototypes' gradient is a GEMM
there). Their Python side (fake tensors, autograd, FLOP formulas) is `cuda_registration`, run
once `backend.cuda_ext_reason` has loaded them: this module imports nothing of the package but
`_jit_build` (which imports none of it), so the imports go one way.

Where the operators come from, first found wins:
  1. `mos_kernels._C`, built by `pip install --no-build-isolation -e .` where torch has CUDA;
  2. a JIT build with ninja (`torch.utils.cpp_extension.load`) of the sources in CSRC, cached on
     disk in `build_directory` (TORCH_EXTENSIONS_DIR/mos/, default ~/.cache/torch_extensions/
     py<version>_<cpu|cuXYZ>/mos/), rebuilt when a source changes, one process at a time;
  3. with MOS_CUDA_EMULATE=1: the CPU emulation (csrc/emulated.cpp): the same work items run
     by a host loop on CPU tensors. It is how CI tests the kernel code without a GPU, as
     TRITON_INTERPRET=1 does for Triton; it says nothing about speed.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from . import _jit_build
from ._jit_build import build_directory  # noqa: F401  (where the JIT build lives; public here)

# The sources: the copy a wheel carries (setup.py puts csrc/ into mos_kernels/csrc/ when it builds
# one), else the checkout's csrc/ (a source tree or an editable install).
PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"
CHECKOUT_CSRC = Path(__file__).resolve().parent.parent / "csrc"
CSRC = PACKAGED_CSRC if (PACKAGED_CSRC / "schema.cpp").is_file() else CHECKOUT_CSRC
CUDA_SOURCES = ("schema.cpp", "session_pool.cu", "theme_dispatch.cu", "theme_gather.cu")
EMULATION_SOURCES = ("schema.cpp", "emulated.cpp")


def emulating() -> bool:
    """MOS_CUDA_EMULATE=1: backend "cuda" runs the CPU emulation of the kernels."""
    return os.environ.get("MOS_CUDA_EMULATE", "0") == "1"


# Our device flags; setup.py repeats them (it cannot import the package), a test keeps them equal.
BUILD_NVCC_FLAGS = ["-O3", "-lineinfo"]


def nvcc_flags() -> list:
    """Every device flag of a build: torch's own (half/bf16 operator macros, relaxed constexpr)
    and ours. The CI compile check uses exactly these."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return list(COMMON_NVCC_FLAGS) + BUILD_NVCC_FLAGS


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _build(emulate: bool, verbose: bool) -> None:
    """Builds (or finds built) and loads the extension, one process at a time
    (`_jit_build.exclusive_build`: an interrupted build's lock never leaves us waiting forever)."""
    from torch.utils.cpp_extension import load

    name = "mos_cuda_emulated" if emulate else "mos_cuda"
    directory = build_directory(name)
    with _jit_build.exclusive_build(directory, _say):
        # Building takes seconds (emulation) to minutes (CUDA) the first time; say so, once.
        _say(f"mos: loading the {'emulated ' if emulate else ''}CUDA extension (a first use or a changed source "
             f"builds it with ninja{'' if emulate else ': minutes'})")
        sources = EMULATION_SOURCES if emulate else CUDA_SOURCES
        load(name=name, sources=[str(CSRC / s) for s in sources], extra_include_paths=[str(CSRC)],
             extra_cflags=["-O3"], extra_cuda_cflags=BUILD_NVCC_FLAGS, build_directory=str(directory),
             with_cuda=not emulate, is_python_module=False, verbose=verbose)


class _Retry(str):
    """A reason that may not hold later (another process's build was still running)."""


@functools.lru_cache(maxsize=None)
def _load_once() -> Optional[str]:
    return _load_library()


def _load() -> Optional[str]:
    """Loads the operators once; returns None, or why they cannot be had here (asked again next
    time where the reason was a wait for another process's build)."""
    reason = _load_once()
    if isinstance(reason, _Retry):
        _load_once.cache_clear()
    return reason


def _load_library() -> Optional[str]:
    if not emulating():
        try:
            from . import _C  # noqa: F401  (built by setup.py; importing it registers the ops)
            return None
        except ImportError:
            pass
        if torch.version.cuda is None:
            return (f"this torch ({torch.__version__}) has no CUDA, so the extension is not built here; "
                    "use backend='triton' or 'reference' (MOS_CUDA_EMULATE=1 runs the kernel code on the CPU)")
    reason = _missing_sources(EMULATION_SOURCES if emulating() else CUDA_SOURCES)
    if reason is not None:
        return reason
    try:
        _build(emulating(), verbose=os.environ.get("MOS_CUDA_VERBOSE", "0") == "1")
    except _jit_build.BuildWaitTimeout as error:
        return _Retry(f"the extension is not loaded: {error}")
    except Exception as error:  # a compiler's message is long: keep its end, which names the problem
        return f"building the extension failed ({type(error).__name__}: {str(error)[-2000:]})"
    return None


def _missing_sources(sources) -> Optional[str]:
    """None when CSRC holds every source of the build, else which are missing and where we looked
    (a package installed without its sources cannot build the extension)."""
    missing = [name for name in sources if not (CSRC / name).is_file()]
    if not missing:
        return None
    return (f"the CUDA sources {', '.join(missing)} are in neither {PACKAGED_CSRC} (a wheel's copy) nor "
            f"{CHECKOUT_CSRC} (a checkout's csrc/); install from the repository or an sdist, which carry them")


def unavailable_reason() -> Optional[str]:
    """None when backend "cuda" can run here, else why not (building the extension if needed)."""
    return _load()


def main(argv=None) -> int:
    """`python -m mos_kernels.cuda_ops [--build]`: says whether backend "cuda" is available here."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mos_kernels.cuda_ops", description=main.__doc__)
    parser.add_argument("--build", action="store_true",
                        help="build the extension with ninja now if it is not prebuilt (minutes, once)")
    args = parser.parse_args(argv)
    if not emulating():   # the emulation and _C both define mos_cuda: never load both
        try:
            from . import _C  # noqa: F401
            print(f"CUDA extension: prebuilt ({_C.__file__})")
            return 0
        except ImportError:
            pass
    if not args.build:
        if torch.version.cuda is None and not emulating():
            print(f"CUDA extension: not built (torch {torch.__version__} has no CUDA); backend 'cuda' is unavailable, "
                  "'triton' and 'reference' work")
        else:
            print("CUDA extension: not prebuilt; backend 'cuda' builds it with ninja on first use "
                  "(or now: python -m mos_kernels.cuda_ops --build)")
        return 0
    reason = unavailable_reason()
    print("CUDA extension: " + ("built and loaded" + (" (CPU emulation)" if emulating() else "")
                                if reason is None else f"unavailable: {reason}"))
    return 0 if reason is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
