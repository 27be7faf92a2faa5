"""The encoder protocol: what an expert of `MoSLayer` must be, so that any sequence model can serve
as its global, short-term and theme experts (`MoSLayer(encoder=...)`).

An encoder factory is a callable `factory(num_experts) -> nn.Module`. The layer calls it once per
expert kind that runs, in the order global (num_experts = 1), themes (K: one parameter set per
theme), short-term (1), so that the built-in encoders draw their initial weights in a fixed order.
The module it returns is called as

    module(rows, target, segment_offsets, *, max_len) -> [E, B, d]

    rows             [N, d] float, the dtype of the layer's values: the segments' rows, segment
                     after segment, each segment's rows in time order (oldest first)
    target           [B, d] the candidate item of each example (every expert sees all of them)
    segment_offsets  [E*B + 1] int64, non-decreasing, expert-major: segment e*B + b is example
                     b's sequence for expert e (the theme experts: the sessions of example b
                     routed to theme e; the global expert: the whole history, or its session
                     vectors under `global_scope="sessions"`; the short-term expert: the last
                     `short_sessions` sessions)
    max_len          int, a bound on the longest segment, or None where the layer does not know
                     one without reading the offsets back
    returns          [E, B, d] float (the rows' dtype, or what autocast makes it): one vector per
                     segment

Empty segments are normal (a theme an example never visits, an empty history, B = 0): whatever
the module returns for one (a mean over no rows is NaN) the layer replaces by zeros, so no NaN
reaches the output or the gradients. A module may hold any parameters; they train with the layer.

A module that reads its rows from the token table itself (a fused gather, as the built-in
encoders' kernels do) sets the attribute `reads_gather_index = True` and is called instead as
`module(tokens, target, segment_offsets, *, gather_index, row_gate, inverse_index, max_len)`:
its rows are tokens[gather_index] * row_gate[:, None] (see `mos_kernels.theme_gather`; row_gate
and gather_index may be None). Every other module receives the rows gathered.

`per_expert(make_one)` turns a one-expert encoder (`[N, d], [B, d], [B+1] -> [B, d]`: a GRU
readout, say) into a factory: E independently built copies, each run on its expert's segments.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

import mos_kernels as mk


class PerExpert(nn.Module):
    """E one-expert encoders side by side: expert e runs on segments e*B .. e*B + B - 1.

    Each one-expert module is called as `module(rows [N_e, d], target [B, d], offsets [B+1], *,
    max_len)` and returns [B, d]. One read-back of E+1 offsets per call (the slicing needs them
    on the host): an E-expert module that runs all segments at once avoids it."""

    def __init__(self, experts):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, rows: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                max_len: Optional[int] = None) -> torch.Tensor:
        num_experts, num_examples = len(self.experts), target.shape[0]
        if num_examples == 0:
            return rows.new_zeros((num_experts, 0, rows.shape[1]))
        bounds = segment_offsets[::num_examples].tolist()          # E + 1 expert boundaries
        outputs = []
        for e, module in enumerate(self.experts):
            first = e * num_examples
            offsets = segment_offsets[first:first + num_examples + 1] - bounds[e]
            out = module(rows[bounds[e]:bounds[e + 1]], target, offsets, max_len=max_len)
            _check_output(out, (num_examples, rows.shape[1]), f"encoder (expert {e} of per_expert)")
            outputs.append(out)
        return torch.stack(outputs)


def per_expert(make_one: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    """The encoder factory that builds `num_experts` one-expert encoders with `make_one()` (each
    call a new module with its own initial weights) and runs them as a `PerExpert`."""
    if not callable(make_one):
        raise TypeError(f"make_one: expected a callable that builds a one-expert encoder, got {type(make_one).__name__}")

    def factory(num_experts: int) -> nn.Module:
        experts = []
        for _ in range(num_experts):
            module = make_one()
            if not isinstance(module, nn.Module):
                raise TypeError(f"make_one: expected it to return an nn.Module, got {type(module).__name__}")
            experts.append(module)
        return PerExpert(experts)

    return factory


def as_factory(encoder) -> Callable[[int], nn.Module]:
    """`MoSLayer(encoder=...)`: a factory as given; an nn.Module instance is a one-expert encoder
    (`per_expert`) copied once per expert (each copy starts from its weights, as
    nn.TransformerEncoder's layers start from theirs). Raises TypeError naming `encoder`."""
    if isinstance(encoder, nn.Module):
        return per_expert(lambda: copy.deepcopy(encoder))
    if not callable(encoder):
        raise TypeError(f"encoder: expected a factory num_experts -> nn.Module or a one-expert nn.Module, "
                        f"got {type(encoder).__name__}")
    return encoder


def build_encoder(factory: Callable[[int], nn.Module], num_experts: int) -> nn.Module:
    """factory(num_experts), checked to be a module. A TypeError from the call (a class whose
    constructor takes no num_experts, say) is raised again naming `encoder`, its message kept."""
    try:
        module = factory(num_experts)
    except TypeError as err:
        raise TypeError(f"encoder: calling the factory as factory({num_experts}) (num_experts) failed: {err}; "
                        f"per_expert(make_one) makes a factory of a one-expert module's constructor") from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"encoder: expected the factory to return an nn.Module for num_experts={num_experts}, "
                        f"got {type(module).__name__}")
    return module


def run_encoder(module: nn.Module, tokens: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                gather_index: Optional[torch.Tensor] = None, row_gate: Optional[torch.Tensor] = None,
                inverse_index: Optional[torch.Tensor] = None, max_len: Optional[int] = None,
                gather_backend: str = "auto") -> torch.Tensor:
    """[E, B, d]: the module over its segments, by the protocol above; rows tokens[gather_index] *
    row_gate (or tokens without gather_index); zeros for empty segments. Raises ValueError /
    TypeError naming `encoder` when the module returns another shape or no float tensor."""
    num_examples = target.shape[0]
    num_experts = (segment_offsets.numel() - 1) // num_examples if num_examples else 0
    if getattr(module, "reads_gather_index", False):
        out = module(tokens, target, segment_offsets, gather_index=gather_index, row_gate=row_gate,
                     inverse_index=inverse_index, max_len=max_len)
    else:
        rows = tokens if gather_index is None else mk.theme_gather(
            tokens, gather_index, row_gate, inverse_index=inverse_index, backend=gather_backend)
        out = module(rows, target, segment_offsets, max_len=max_len)
    if num_examples == 0:
        num_experts = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() == 3 else 0
    _check_output(out, (num_experts, num_examples, tokens.shape[1]), "encoder")
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    return torch.where((lengths > 0).view(num_experts, num_examples, 1), out, torch.zeros((), dtype=out.dtype,
                                                                                         device=out.device))


def _check_output(out, shape, name: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected it to return a tensor of shape {list(shape)}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected it to return shape {list(shape)} (one vector per segment), "
                         f"got {list(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"{name}: expected it to return a float tensor (the rows' dtype, or autocast's), "
                        f"got {str(out.dtype).replace('torch.', '')}")
