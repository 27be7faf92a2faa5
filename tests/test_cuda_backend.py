"""The CUDA C++ extension (csrc/) beyond the kernel comparisons of tests/ops:
every .cu compiles for sm_90 with nvcc (against the CPU torch headers: nvcc needs no GPU), the
sources are all built, the constants agree with the Python side, errors name their argument,
and "auto" picks what the recorded benchmarks measured faster.

The nvcc check needs nvcc on PATH; it is skipped without one unless MOS_REQUIRE_CUDA_EXT=1
(CI sets it), which turns the skip into a failure.
"""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mos_kernels as mk
from mos_kernels import backend, cuda_ops
from mos_kernels.routing import NORM_EPS
from tests.conftest import require_cuda_ext, skip_unless_required
from tests.kernel_cases import make_sessions, random_values

CSRC = cuda_ops.CSRC
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        skip_unless_required("nvcc is not on PATH")
    return nvcc


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_file_compiles_for_sm90(source, tmp_path):
    """nvcc -c with the flags of the real build; no warning may come from our own files."""
    from torch.utils.cpp_extension import include_paths

    command = [_nvcc(), "-c", "-std=c++20", "-arch=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               *cuda_ops.nvcc_flags(), f"-I{CSRC}", *(arg for p in include_paths() for arg in ("-isystem", p)),
               str(CSRC / source), "-o", str(tmp_path / "out.o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"nvcc failed on {source}:\n{done.stderr[-4000:]}"
    ours = [line for line in done.stderr.splitlines() if "warning" in line and str(CSRC) in line]
    assert not ours, "warnings in csrc:\n" + "\n".join(ours)
    assert (tmp_path / "out.o").stat().st_size > 0


def test_python_module_entry_compiles(tmp_path):
    """setup.py builds schema.cpp with MOS_PYTHON_MODULE (the PyInit__C of mos_kernels._C)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        skip_unless_required("no host C++ compiler is on PATH")
    command = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-DMOS_PYTHON_MODULE",
               "-isystem", sysconfig.get_paths()["include"], *(a for p in include_paths() for a in ("-isystem", p)),
               str(CSRC / "schema.cpp")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr[-4000:]


def test_every_source_is_built():
    """A .cu or .cpp left out of the build lists would silently drop its operators."""
    on_disk = {p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")}
    assert on_disk == set(cuda_ops.CUDA_SOURCES) | set(cuda_ops.EMULATION_SOURCES)
    assert set(cuda_ops.CUDA_SOURCES) >= {p for p in on_disk if p.endswith(".cu")}


def test_schema_names_the_module_that_registers_the_fakes():
    """torch looks for the operators' fakes in the module schema.cpp names: it must be the one
    that registers them (an extension built from an older schema.cpp needs a rebuild)."""
    from mos_kernels import cuda_registration

    named = re.search(r'set_python_module\("([\w.]+)"\)', (CSRC / "schema.cpp").read_text()).group(1)
    assert named == cuda_registration.__name__


def test_python_side_registers_whatever_the_import_order():
    """Fakes and autograd register when the operators load, even if cuda_registration was imported
    before them (its import alone registers nothing then): a fresh process imports it first."""
    require_cuda_ext()
    code = ("import torch, mos_kernels.cuda_registration as registration\n"
            "from mos_kernels.backend import cuda_ext_reason\n"
            "before = registration._registered\n"
            "assert cuda_ext_reason() is None, cuda_ext_reason()\n"
            "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
            "print(before, registration._registered, has('mos_cuda::theme_gather', 'Autograd'),"
            " has('mos_cuda::theme_gather', 'Meta'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=CSRC.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-4:] == ["False", "True", "True", "True"], done.stdout


def test_norm_eps_matches_python():
    header = (CSRC / "mos" / "session_pool.h").read_text()
    value = float(re.search(r"kNormEps = ([0-9.e+-]+)f;", header).group(1))
    assert value == NORM_EPS


def test_operator_errors_name_the_argument(device):
    require_cuda_ext()
    ops = backend.kernel_ops("cuda")
    _, sessions = make_sessions([4, 3], 2, device)
    so = sessions.session_offsets
    values = random_values(7, 8, torch.float32, device)
    protos = torch.zeros(3, 8, device=device)
    index = torch.zeros(2, dtype=torch.int64, device=device)
    inverse = torch.zeros(7, 1, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match=r"prototypes: expected dtype Float, got Long"):
        ops.session_pool_route(values, so, protos.long(), 1.0, 1)
    with pytest.raises(RuntimeError, match=r"values: expected dtype float32, float16 or bfloat16, got Double"):
        ops.session_pool_route(values.double(), so, protos, 1.0, 1)
    with pytest.raises(RuntimeError, match=r"top_k: expected 0\.\.3"):
        ops.session_pool_route(values, so, protos, 1.0, 4)
    with pytest.raises(RuntimeError, match=r"session_offsets: expected S\+1 >= 1 entries, got 0"):
        ops.session_pool_route(values, so[:0], protos, 1.0, 1)
    with pytest.raises(RuntimeError, match=r"gather_index: expected dtype Long, got Int"):
        ops.theme_gather(values, index.int(), None, inverse)
    with pytest.raises(RuntimeError, match=r"row_gate: expected dtype float32, float16 or bfloat16, got Long"):
        ops.theme_gather(values, index, index, inverse)
    with pytest.raises(RuntimeError, match=r"row_gate: expected 2 elements, got 3"):
        ops.theme_gather(values, index, torch.ones(3, device=device), inverse)
    themes = torch.zeros(4, 1, dtype=torch.int64, device=device)
    eso = torch.tensor([0, 2, 4], device=device)
    with pytest.raises(RuntimeError, match=r"session_example: expected 4 elements, got 3"):
        ops.theme_dispatch(themes, torch.ones(4, 1, device=device), so, index[:1].repeat(3), eso, 7, 2, 0)
    with pytest.raises(RuntimeError, match=r"gate: expected 4 elements, got 3"):
        ops.theme_dispatch(themes, torch.ones(3, 1, device=device), so, index[:1].repeat(4), eso, 7, 2, 0)
    with pytest.raises(RuntimeError, match=r"gate: expected a floating dtype, got Long"):
        ops.theme_dispatch(themes, themes, so, index[:1].repeat(4), eso, 7, 2, 0)
    with pytest.raises(RuntimeError, match=r"num_tokens: expected num_tokens \* top_k < 2\^31"):
        ops.theme_dispatch(themes, torch.ones(4, 1, device=device), so, index[:1].repeat(4), eso, 2**31, 2, 0)


def test_backend_cuda_refuses_cpu_tensors_without_emulation(monkeypatch):
    monkeypatch.setenv("MOS_CUDA_EMULATE", "0")
    values = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"theme_gather: backend 'cuda' expected CUDA tensors \(or MOS_CUDA_EMULATE=1\), "
                                         r"got a tensor on cpu"):
        mk.theme_gather(values, torch.tensor([0, 1]), backend="cuda")


def test_backend_cuda_refuses_float64():
    with pytest.raises(TypeError, match=r"backend 'cuda' expected dtype in \(float32, float16, bfloat16\), got float64"):
        mk.session_pool(torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 5]), backend="cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: the extension can be built")
def test_without_cuda_torch_the_reason_says_so(monkeypatch):
    monkeypatch.setenv("MOS_CUDA_EMULATE", "0")
    reason = cuda_ops._load_library()
    assert reason is not None and "has no CUDA" in reason and "MOS_CUDA_EMULATE=1" in reason


def test_without_the_sources_the_reason_says_where_it_looked(monkeypatch, tmp_path):
    """An installed package whose wheel lost csrc/ cannot JIT-build: the reason names both places."""
    monkeypatch.setenv("MOS_CUDA_EMULATE", "1")   # past _C and torch's CUDA, straight to the build
    monkeypatch.setattr(cuda_ops, "CSRC", tmp_path)
    reason = cuda_ops._load_library()
    assert reason is not None and "schema.cpp, emulated.cpp" in reason
    assert str(cuda_ops.PACKAGED_CSRC) in reason and str(cuda_ops.CHECKOUT_CSRC) in reason


def _recorded_medians():
    """{(op, mode, provider): median ms} at the bf16 target point of the newest bench_kernels CSV
    that has cuda rows ({} when none has)."""
    from benchmarks.bench_kernels import TARGET

    point = {"L": TARGET.L, "d": TARGET.d, "K": TARGET.K, "top_k": TARGET.top_k}
    for path in sorted(RESULTS.glob("*bench_kernels*.csv"), reverse=True):   # names start with the date
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["dtype"] == "bf16" and r["median_ms"]
                    and all(r[k] == str(v) for k, v in point.items())]
        if any(r["provider"] == "cuda" for r in rows):
            return {(r["op"], r["mode"], r["provider"]): float(r["median_ms"]) for r in rows}
    return {}


# Benchmark op -> the mos_kernels ops whose "auto" choice it decides.
BENCH_OPS = {"session_pool_route": ("session_pool", "session_pool_route"), "theme_dispatch": ("theme_dispatch",),
             "theme_gather": ("theme_gather",), "theme_scatter": ("theme_scatter",)}


def test_auto_choice_follows_the_recorded_benchmarks():
    medians = _recorded_medians()
    for bench_op, ops in BENCH_OPS.items():
        mode = "fwd" if bench_op == "theme_dispatch" else "fwd+bwd"
        cuda, triton = medians.get((bench_op, mode, "cuda")), medians.get((bench_op, mode, "triton"))
        expected = "cuda" if cuda is not None and triton is not None and cuda < triton else "triton"
        for op in ops:
            assert backend.FASTEST_ON_GPU[op] == expected, (op, cuda, triton)


def test_setup_py_builds_what_the_jit_builds():
    """setup.py cannot import the package: its source list and flags are repeated there."""
    text = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert f"SOURCES = {list(cuda_ops.CUDA_SOURCES)!r}".replace("'", '"') in text
    assert f"NVCC_FLAGS = {cuda_ops.BUILD_NVCC_FLAGS!r}".replace("'", '"') in text
