"""The input forms `MoSLayer.forward` accepts: jagged rows with offsets, or padded rows with lengths."""
from __future__ import annotations

from typing import Optional

import torch

import mos_kernels as mk
from mos_kernels.checks import check_finite, check_tensor, reads_data


def as_jagged(values: torch.Tensor, offsets: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
              timestamps: Optional[torch.Tensor]):
    """`MoSLayer.forward`'s two input forms as one: jagged values [T, d] with offsets [B+1] (int64
    or int32) or with lengths [B] (as torchrec's jagged tensors give them), or padded values
    [B, L, d] with lengths [B] (and timestamps [B, L]); returns (values [T, d], offsets [B+1]
    int64, timestamps [T] or None). Raises ValueError naming the argument that does not fit the
    form values has."""
    check_tensor("values", values)
    if values.dim() == 3:
        if offsets is not None:
            raise ValueError("offsets: expected None for padded values [B, L, d] (pass lengths), got a tensor")
        if lengths is None:
            raise ValueError("lengths: expected a [B] tensor with padded values [B, L, d], got None")
        if timestamps is not None:
            check_tensor("timestamps", timestamps, ndim=2, device=values.device)
            if timestamps.shape != values.shape[:2]:
                raise ValueError(f"timestamps: expected shape {tuple(values.shape[:2])} like padded values, "
                                 f"got {tuple(timestamps.shape)}")
            timestamps = mk.padded_to_jagged(timestamps[..., None], lengths)[0][:, 0]
        values, offsets = mk.padded_to_jagged(values, lengths)
        return values, offsets, timestamps
    if values.dim() != 2:
        raise ValueError(f"values: expected jagged [T, d] or padded [B, L, d], got shape {tuple(values.shape)}")
    if offsets is None and lengths is None:
        raise ValueError("offsets: expected a [B+1] int64 tensor (or lengths [B]) with jagged values [T, d], got None")
    if offsets is not None and lengths is not None:
        raise ValueError("lengths: expected None with jagged values and offsets (both say the lengths: pass one), "
                         "got a tensor")
    if lengths is not None:
        check_tensor("lengths", lengths, ndim=1, device=values.device)
        offsets = mk.offsets_from_lengths(lengths)
        if reads_data() and int(offsets[-1]) != values.shape[0]:
            raise ValueError(f"lengths: expected them to sum to {values.shape[0]} (the rows of jagged values), "
                             f"got {int(offsets[-1])}")
    elif isinstance(offsets, torch.Tensor) and offsets.dtype == torch.int32:
        offsets = offsets.long()           # the ops index in int64 (tensors may pass 2^31 rows)
    if timestamps is not None:
        # Checked in every session mode (the padded form's shape check is too): wrong timestamps
        # are a caller's bug even where mode="fixed" reads none of them.
        check_tensor("timestamps", timestamps, ndim=1, device=values.device)
        if timestamps.shape[0] != values.shape[0]:
            raise ValueError(f"timestamps: expected {values.shape[0]} entries (one per row of values), "
                             f"got {timestamps.shape[0]}")
    return values, offsets, timestamps


def routing_inputs(routing_values: Optional[torch.Tensor], routing_target: Optional[torch.Tensor],
                   values: torch.Tensor, target: torch.Tensor, lengths: Optional[torch.Tensor], *, routes: bool):
    """`MoSLayer.forward`'s routing_values and routing_target, checked against values and target
    as they were given (before values is made jagged) and made jagged like them: (None, None) or
    ([T, d], [B, d]). Raises ValueError/TypeError naming the argument: only one of the two, a
    layer without theme experts (nothing would read them), another shape, dtype or device than
    values'/target's, NaN or inf (the data check)."""
    if routing_values is None and routing_target is None:
        return None, None
    given, missing = ("routing_values", "routing_target") if routing_target is None else ("routing_target",
                                                                                         "routing_values")
    if routing_values is None or routing_target is None:
        raise ValueError(f"{missing}: expected a tensor with {given} (both or neither), got None")
    if not routes:
        raise ValueError("routing_values: expected None in a layer without theme experts (nothing routes), got a tensor")
    for name, tensor, like, what in (("routing_values", routing_values, values, "values"),
                                     ("routing_target", routing_target, target, "target")):
        check_tensor(name, tensor, device=like.device)
        if tensor.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {str(like.dtype).replace('torch.', '')} (that of {what}), "
                            f"got {str(tensor.dtype).replace('torch.', '')}")
        if tensor.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)} (that of {what}), got {tuple(tensor.shape)}")
    if routing_values.dim() == 3:
        routing_values = mk.padded_to_jagged(routing_values, lengths)[0]
    # After the padding is dropped: like values, padding rows are never read, NaN there included.
    check_finite("routing_values", routing_values)
    check_finite("routing_target", routing_target)
    return routing_values, routing_target
