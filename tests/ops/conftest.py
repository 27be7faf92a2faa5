"""Every op test runs with kernel outputs poisoned (NaN, or a huge negative integer) before the
kernel writes them, so an element a kernel forgets to write cannot pass."""
import pytest

from mos_kernels._alloc import poisoned_outputs


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    with poisoned_outputs():
        yield
