"""The machine a benchmark run is on: `python -m benchmarks.ceilings`.

Prints the card, the versions, which optional torch features the benchmarks' baselines need are
here (a baseline whose feature is missing becomes an error row saying so), and on CUDA the two
ceilings measured on this card: a 1 GiB device-to-device copy (bytes read + written per second)
and an 8192^3 bf16 matrix product on random data (zeros run faster than real data), both timed
with do_bench. The floors in the CSVs use the table `machine.PEAK_BANDWIDTH`; these say whether
the card matches it today.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

GEMM_SIZE = 8192


def features() -> dict:
    """Optional torch features, each True or False: probed with hasattr / import, never assumed."""
    found = {"torch.nn.functional.grouped_mm": hasattr(F, "grouped_mm"), "torch._grouped_mm": hasattr(torch, "_grouped_mm")}
    for module, name in (("torch.nn.attention.varlen", "varlen_attn"), ("torch.nn.attention.flex_attention", "flex_attention")):
        try:
            found[f"{module}.{name}"] = hasattr(__import__(module, fromlist=[name]), name)
        except ImportError:
            found[f"{module}.{name}"] = False
    return found


def measure(device: torch.device) -> dict:
    """{copy_tbps, gemm_tflops}: the two ceilings, medians of do_bench."""
    import triton.testing
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=torch.bfloat16)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, dtype=torch.bfloat16)
    gemm_ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return {"copy_tbps": 2 * 2 ** 30 / (copy_ms * 1e-3) / 1e12, "gemm_tflops": 2 * GEMM_SIZE ** 3 / (gemm_ms * 1e-3) / 1e12}


def main() -> int:
    print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        print("nvidia-smi", (smi.stdout or smi.stderr).strip())
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"nvidia-smi: not run ({type(exc).__name__}: {exc})")
    import triton
    print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
          "cuda", torch.version.cuda)
    for name, present in features().items():
        print(f"has {name}: {present}")
    if not torch.cuda.is_available():
        print("ceilings: not measured (no CUDA device)")
        return 0
    device = torch.device("cuda")
    print("card", torch.cuda.get_device_name(device), "capability", torch.cuda.get_device_capability(device))
    ceilings = measure(device)
    print(f"ceilings: copy {ceilings['copy_tbps']:.2f} TB/s (1 GiB, read + write), "
          f"bf16 GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s ({GEMM_SIZE}^3, random data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
