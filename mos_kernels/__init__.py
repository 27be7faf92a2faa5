"""mos_kernels: the ops of the Mixture-of-Sequence layer, one public function each.

Every op takes `backend=`: "reference" (pure PyTorch, the correctness oracle), "triton",
"cuda" (the C++ extension, for pooling, dispatch, gather and scatter; cuda_ops.py) or "auto"
(fastest available for the tensors' device). Data layout: jagged values [N, ...]
with int64 offsets [G+1] (`jagged.py`: group g owns rows offsets[g] : offsets[g+1]).
"""
from .backend import on_cuda_load as _on_cuda_load
from .checks import data_checks
from .expert_target_attention import expert_target_attention
from .grouped_linear import grouped_linear
from .jagged import (jagged_to_padded, lengths_from_offsets, offsets_from_lengths, padded_to_jagged,
                     positions_in_segment, segment_ids)
from .jagged_self_attention import jagged_self_attention
from .linear_recurrence import linear_recurrence
from .selective_scan import selective_scan
from .session_pool import session_pool, session_pool_route
from .sessionize import Sessions, sessionize
from .theme_dispatch import Dispatch, theme_dispatch
from .theme_gather import theme_gather, theme_scatter
from .routing import Routing

__all__ = [
    "data_checks", "Dispatch", "Routing", "Sessions", "expert_target_attention", "grouped_linear", "jagged_self_attention",
    "jagged_to_padded", "lengths_from_offsets", "linear_recurrence", "offsets_from_lengths", "padded_to_jagged",
    "positions_in_segment", "segment_ids", "selective_scan", "session_pool", "session_pool_route", "sessionize", "theme_dispatch", "theme_gather",
    "theme_scatter",
]


def _register_cuda_python_side() -> None:
    # Imported only once the extension is loaded: registering needs its operators to exist. The
    # call, not the import, registers: the module may have been imported earlier, before them.
    from . import cuda_registration

    cuda_registration.register_python_side()


_on_cuda_load(_register_cuda_python_side)
