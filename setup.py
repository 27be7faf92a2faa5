"""Build entry point; all metadata lives in pyproject.toml.

The optional CUDA C++ extension (csrc/ -> mos_kernels._C, backend="cuda") is built
only where torch has CUDA and nvcc is found; anywhere else, or when its build fails, it is
skipped with a message (pip shows it with -v; `python -m mos_kernels.cuda_ops` says what is
there) and the package installs as before (backend "cuda" then builds itself with ninja on first use where it
can, see mos_kernels/cuda_ops.py). On a GPU machine without network:
    pip install --no-build-isolation -e .
(--no-build-isolation: the build needs the installed torch, not a fresh download).
MOS_BUILD_CUDA=0 skips the extension; MOS_BUILD_CUDA=1 makes a failure to build it an error.
"""
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path("csrc")
SOURCES = ["schema.cpp", "session_pool.cu", "theme_dispatch.cu", "theme_gather.cu"]   # = cuda_ops.CUDA_SOURCES
NVCC_FLAGS = ["-O3", "-lineinfo"]                                                      # = cuda_ops.BUILD_NVCC_FLAGS


def _skip(reason: str) -> dict:
    if os.environ.get("MOS_BUILD_CUDA") == "1":
        sys.exit(f"mos: MOS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"mos: CUDA extension skipped: {reason}", file=sys.stderr)
    return {}


def cuda_extension() -> dict:
    if os.environ.get("MOS_BUILD_CUDA") == "0":
        return _skip("MOS_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip("torch is not importable at build time (install with --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} has no CUDA (backend 'cuda' is unavailable; "
                     "'triton' and 'reference' are not affected)")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    class OptionalBuild(BuildExtension):
        """A failed build leaves the package installed without the extension (said on stderr),
        unless MOS_BUILD_CUDA=1."""

        def run(self):
            try:
                super().run()
            except Exception as error:   # compiler and linker failures surface as various errors
                if os.environ.get("MOS_BUILD_CUDA") == "1":
                    raise
                print(f"mos: CUDA extension skipped: building it failed ({type(error).__name__}: {error}); "
                      "backend 'cuda' will try a JIT build on first use", file=sys.stderr)

    extension = CUDAExtension(
        "mos_kernels._C", [str(CSRC / s) for s in SOURCES], include_dirs=[str(CSRC.resolve())],
        define_macros=[("MOS_PYTHON_MODULE", None)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS})
    print("mos: building the CUDA extension mos_kernels._C", file=sys.stderr)
    return dict(ext_modules=[extension], cmdclass={"build_ext": OptionalBuild})


class BuildPyWithShippedFiles(build_py):
    """Ships configs/*.yaml inside the package, as mos/lab/configs/: they live at the top of the
    repository (where `make run` and the README name them), and `--config default` must find them
    after a `pip install` too (mos/lab/config_io.py: shipped_configs). Ships csrc/ as mos_kernels/csrc/
    for the same reason: backend "cuda" builds it on first use where the wheel has no _C
    (mos_kernels/cuda_ops.py: CSRC)."""

    def run(self):
        super().run()
        self._ship_configs()
        self._ship_cuda_sources()

    def _ship_configs(self):
        configs = sorted(Path("configs").glob("*.yaml"))
        if not configs:
            raise FileNotFoundError(f"mos: expected the shipped configs in {Path('configs').resolve()}, found none")
        target = Path(self.build_lib) / "mos" / "lab" / "configs"
        self.mkpath(str(target))
        for config in configs:
            self.copy_file(str(config), str(target / config.name))

    def _ship_cuda_sources(self):
        sources = sorted(path for path in CSRC.rglob("*") if path.suffix in (".cpp", ".cu", ".h", ".cuh"))
        if not sources:
            raise FileNotFoundError(f"mos: expected the CUDA sources in {CSRC.resolve()}, found none")
        for source in sources:
            target = Path(self.build_lib) / "mos_kernels" / source
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


options = cuda_extension()
options.setdefault("cmdclass", {})["build_py"] = BuildPyWithShippedFiles
setup(**options)
