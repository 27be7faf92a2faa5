"""CI step: every Triton kernel compiles to sm_90 machine code (the interpreter is lenient), with no
32-bit multiplication in its address arithmetic (compile_check.narrow_address_products)."""
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.environ.get("MOS_TEST_DEVICE") == "cuda", reason="the GPU run compiles the kernels for real")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "mos_kernels.compile_check", "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configurations of 14 kernels compiled to sm_90" in done.stdout
