"""The encoder protocol: what an expert of `MoSLayer` must be, so that any sequence model can serve
as its global, short-term and theme experts (`MoSLayer(encoder=...)`).

An encoder factory is a callable `factory(num_experts=E) -> nn.Module` (called with the keyword,
so that a one-expert module's class passed by mistake fails there, naming `encoder`, and does not
build a module of width E). The layer calls it once per expert kind that runs, in the order global (num_experts = 1), themes (K: one parameter set per
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
    returns          [E, B, d] on the rows' device, in their dtype (or autocast's, under autocast):
                     one vector per segment, finite

The module's forward must take `max_len` by keyword (or **kwargs): one that does not is refused
when the layer is built, naming `encoder`.

Empty segments are normal (a theme an example never visits, an empty history, B = 0): the layer
replaces what the module returns for one by zeros. That value must still be finite: a NaN made
inside the module (a mean over no rows, 0 / 0) would reach its parameters' gradients through its
own backward (0 * NaN), which no masking after it can stop. With the layer's `validate_inputs`
on, a non-finite output is refused, naming `encoder` (one pass over [E, B, d]). A module may hold
any parameters; they train with the layer.

A module that reads its rows from the token table itself (a fused gather, as the built-in
encoders' kernels do) sets the attribute `reads_gather_index = True` and is called instead as
`module(tokens, target, segment_offsets, *, gather_index, row_gate, inverse_index, max_len)`:
its rows are tokens[gather_index] * row_gate[:, None] (see `mos_kernels.theme_gather`; row_gate
and gather_index may be None). Every other module receives the rows gathered.

`per_expert(make_one)` turns a one-expert encoder (`[N, d], [B, d], [B+1] -> [B, d]`: a GRU
readout, say) into a factory: E independently built copies, each run on its expert's non-empty
segments only (so it never sees an empty one: packed sequences, say, refuse them).
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional

import torch
from torch import nn

import mos_kernels as mk
from mos_kernels.checks import NonFiniteError


class PerExpert(nn.Module):
    """E one-expert encoders side by side: expert e runs on the non-empty ones of segments e*B ..
    e*B + B - 1; the empty ones get zeros without a call.

    Each one-expert module is called as `module(rows [N_e, d], target [B_e, d], offsets [B_e+1], *,
    max_len)` over its B_e non-empty segments (their targets) and returns [B_e, d]. The segment
    lengths are read back once per call (the slicing needs them on the host): an E-expert module
    that runs all segments at once avoids it."""

    def __init__(self, experts):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, rows: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                max_len: Optional[int] = None) -> torch.Tensor:
        num_experts, num_examples, dim = len(self.experts), target.shape[0], rows.shape[1]
        out = rows.new_zeros((num_experts, num_examples, dim))
        if num_examples == 0:
            return out
        lengths = (segment_offsets[1:] - segment_offsets[:-1]).view(num_experts, num_examples)
        bounds = segment_offsets[::num_examples].tolist()          # E + 1 expert boundaries
        for e, module in enumerate(self.experts):
            examples = torch.nonzero(lengths[e]).flatten()
            if examples.numel() == 0:
                continue
            offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths[e, examples], 0)])
            got = module(rows[bounds[e]:bounds[e + 1]], target[examples], offsets, max_len=max_len)
            _check_output(got, (examples.numel(), dim), rows, f"encoder (expert {e} of per_expert)")
            out = out.index_put((torch.full_like(examples, e), examples), got.to(out.dtype))
        return out


def per_expert(make_one: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
    """The encoder factory that builds `num_experts` one-expert encoders with `make_one()` (each
    call a new module with its own initial weights) and runs them as a `PerExpert`."""
    if not callable(make_one):
        raise TypeError(f"make_one: expected a callable that builds a one-expert encoder, got {type(make_one).__name__}")

    def factory(num_experts: int) -> nn.Module:
        experts = []
        for _ in range(num_experts):
            module = make_one()
            if not isinstance(module, nn.Module):
                raise EncoderProtocolError(f"make_one: expected it to return an nn.Module, "
                                           f"got {type(module).__name__}")
            check_keywords(module, ("max_len",), "encoder (a one-expert module)")
            experts.append(module)
        return PerExpert(experts)

    return factory


def as_factory(encoder) -> Callable[..., nn.Module]:
    """`MoSLayer(encoder=...)`: a factory as given; an nn.Module instance is a one-expert encoder
    (`per_expert`) copied once per expert: every copy starts from its weights, as
    nn.TransformerEncoder's layers start from theirs (so a pretrained module starts every expert
    from what it learned; a factory draws each anew). Raises TypeError naming `encoder`."""
    if isinstance(encoder, nn.Module):
        return per_expert(lambda: copy.deepcopy(encoder))
    if not callable(encoder):
        raise TypeError(f"encoder: expected a factory num_experts -> nn.Module or a one-expert nn.Module, "
                        f"got {type(encoder).__name__}")
    return encoder


def build_encoder(factory: Callable[..., nn.Module], num_experts: int) -> nn.Module:
    """factory(num_experts=num_experts), checked to be a module. A TypeError from the call (a
    class whose constructor takes no num_experts, say) is raised again naming `encoder`, its
    message kept."""
    try:
        module = factory(num_experts=num_experts)
    except EncoderProtocolError:      # the protocol's own check of a module (per_expert's): its message says it all
        raise
    except TypeError as err:
        raise TypeError(f"encoder: factory(num_experts={num_experts}) raised TypeError: {err} (a factory is "
                        f"called with the keyword num_experts; per_expert(make_one) makes one of a one-expert "
                        f"module's constructor)") from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"encoder: expected the factory to return an nn.Module for num_experts={num_experts}, "
                        f"got {type(module).__name__}")
    keywords = GATHER_KEYWORDS if getattr(module, "reads_gather_index", False) else ("max_len",)
    check_keywords(module, keywords, "encoder")
    return module


class EncoderProtocolError(TypeError):
    """A module or factory that does not follow the protocol above (a TypeError: the wrong kind of
    object was passed)."""


# What a module that sets reads_gather_index is called with, besides its three tensors.
GATHER_KEYWORDS = ("gather_index", "row_gate", "inverse_index", "max_len")


def check_keywords(module: nn.Module, keywords, name: str) -> None:
    """module.forward must take `keywords` by name (the protocol's call): refused here, naming
    `name` and the forward it has, rather than as a bare TypeError inside the layer's first
    call. A forward whose signature cannot be read (a compiled one, say) is let through."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [k for k in keywords if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY]
    if missing:
        raise EncoderProtocolError(f"{name}: expected {type(module).__name__}.forward to take the keyword(s) "
                                   f"{missing} (mos.encoder_protocol: module(rows, target, segment_offsets, *, "
                                   f"max_len)), got forward{inspect.signature(module.forward)}")


def run_encoder(module: nn.Module, tokens: torch.Tensor, target: torch.Tensor, segment_offsets: torch.Tensor, *,
                gather_index: Optional[torch.Tensor] = None, row_gate: Optional[torch.Tensor] = None,
                inverse_index: Optional[torch.Tensor] = None, max_len: Optional[int] = None,
                gather_backend: str = "auto", validate: bool = False,
                num_experts: Optional[int] = None) -> torch.Tensor:
    """[E, B, d]: the module over its segments, by the protocol above; rows tokens[gather_index] *
    row_gate (or tokens without gather_index); zeros for empty segments. Raises ValueError /
    TypeError naming `encoder` when the module returns another shape, dtype or device, and with
    `validate` NonFiniteError (a ValueError) when it returns NaN or inf."""
    num_examples = target.shape[0]
    if num_experts is None:     # the layout's, or with no examples the module's (unchecked then)
        num_experts = (segment_offsets.numel() - 1) // num_examples if num_examples else None
    if getattr(module, "reads_gather_index", False):
        out = module(tokens, target, segment_offsets, gather_index=gather_index, row_gate=row_gate,
                     inverse_index=inverse_index, max_len=max_len)
    else:
        rows = tokens if gather_index is None else mk.theme_gather(
            tokens, gather_index, row_gate, inverse_index=inverse_index, backend=gather_backend)
        out = module(rows, target, segment_offsets, max_len=max_len)
    if num_experts is None:
        num_experts = out.shape[0] if isinstance(out, torch.Tensor) and out.dim() == 3 else 0
    _check_output(out, (num_experts, num_examples, tokens.shape[1]), tokens, "encoder")
    if validate and not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        raise NonFiniteError("encoder: expected finite vectors (empty segments included: a NaN there reaches "
                             "the gradients), got NaN or inf")
    lengths = segment_offsets[1:] - segment_offsets[:-1]
    return torch.where((lengths > 0).view(num_experts, num_examples, 1), out, torch.zeros((), dtype=out.dtype,
                                                                                         device=out.device))


def _check_output(out, shape, like: torch.Tensor, name: str) -> None:
    """out: a tensor of `shape` on like's device, in like's dtype (outside autocast) or a float one."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected it to return a tensor of shape {list(shape)}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: expected it to return shape {list(shape)} (one vector per segment), "
                         f"got {list(out.shape)}")
    if out.device != like.device:
        raise ValueError(f"{name}: expected it to return a tensor on {like.device}, got one on {out.device}")
    autocast = torch.is_autocast_enabled(like.device.type)
    if (out.dtype != like.dtype and not autocast) or not out.is_floating_point():
        expected = "a float dtype (autocast is on)" if autocast else str(like.dtype).replace("torch.", "")
        raise TypeError(f"{name}: expected it to return the rows' dtype, {expected}, "
                        f"got {str(out.dtype).replace('torch.', '')}")
