"""The layer and its reference ops run where triton is not installed: the op modules import
their `<op>_kernels` modules (the only ones that import triton) when a Triton launch needs them.

Each check runs in a fresh interpreter in which `import triton` fails, as it does where the
package is absent."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A None entry in sys.modules makes `import triton` raise ModuleNotFoundError.
_NO_TRITON = """
import sys
sys.modules["triton"] = None
sys.modules["triton.language"] = None
"""


def _run(body: str) -> str:
    code = _NO_TRITON + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_layer_runs_on_the_reference_without_triton():
    out = _run("""
        import torch
        import mos
        import mos_kernels as mk
        from mos_kernels.backend import triton_available

        assert not triton_available()
        for encoder in ("target_attention", "transformer"):
            torch.manual_seed(0)
            for backend in ("reference", "auto"):
                layer = mos.MoSLayer(mos.MoSConfig(dim=16, num_heads=2, num_themes=4, session_len=3,
                                                   encoder=encoder, backend=backend))
                lengths = torch.tensor([5, 0, 9])
                values = torch.randn(int(lengths.sum()), 16, requires_grad=True)
                target = torch.randn(3, 16, requires_grad=True)
                result = layer(values, target, mk.offsets_from_lengths(lengths))
                (result.output.square().sum() + result.aux_loss).backward()
                grads = [values.grad, target.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
                assert torch.isfinite(result.output).all() and torch.isfinite(result.aux_loss)
                assert all(torch.isfinite(g).all() for g in grads)
        print(sorted(m for m in sys.modules if m is not None and m.split(".")[0] == "triton"
                     and sys.modules[m] is not None))
    """)
    assert out.strip().splitlines()[-1] == "[]", out


def test_the_packages_import_no_kernel_module():
    """Neither triton nor a module of mos_kernels that imports it gets loaded by the packages."""
    out = _run("""
        import mos, mos_kernels, mos_kernels.cuda_registration
        triton_side = ("triton_helpers", "session_blocks")
        print(sorted(name for name, module in sys.modules.items() if module is not None and (
            name.split(".")[0] == "triton" or (name.startswith("mos_kernels.") and
                                               name.endswith(("_kernels",) + triton_side)))))
    """)
    assert out.strip() == "[]", out


def test_backend_triton_says_how_to_do_without_it():
    out = _run("""
        import torch
        import mos_kernels as mk

        x = torch.randn(4, 8)
        weight = torch.randn(2, 8, 8)
        offsets = torch.tensor([0, 3, 4])
        assert mk.grouped_linear(x, weight, None, offsets, backend="auto").shape == (4, 8)
        try:
            mk.grouped_linear(x, weight, None, offsets, backend="triton")
        except RuntimeError as error:
            print(error)
        else:
            raise AssertionError("backend='triton' ran without triton")
    """)
    message = out.strip()
    assert "backend" in message and "triton" in message and "not installed" in message, message
    assert "backend='reference'" in message, message


def test_the_lab_refuses_backend_triton_before_loading_data():
    """A run asking for backend=triton where triton is absent stops at the machine check, with
    one InputError, not at its first forward pass."""
    out = _run("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"      # past the device check: only the missing package is left
        from mos.lab.distributed import check_machine
        from mos.lab.errors import InputError
        try:
            check_machine("cpu", "triton")
        except InputError as err:
            print(err)
    """)
    assert out.startswith("model.mos.backend: 'triton' needs the triton package, which is not installed"), out
