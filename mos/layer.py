"""`MoSLayer`: the Mixture-of-Sequence layer on top of `mos_kernels`.

sessions -> pooled sessions -> theme routing -> theme-major dispatch -> experts (theme,
global, short-term) -> target-conditioned fusion. The kernels own the data movement; this
module owns the parameters and the wiring.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import mos_kernels as mk
from mos_kernels.checks import check_count, check_finite, check_offsets, check_tensor, check_values, reads_data
from mos_kernels.backend import cuda_emulating, interpreting, op_backends
from mos_kernels.jagged import max_segment_length

from .config import EXPERT_KINDS, MoSConfig
from .encoder_protocol import as_factory
from .encoders import check_built_in_options_unset, encoder_options, make_encoder
from .experts import (BUILD, BUILD_ORDER, GLOBAL_PATHS, PATHS, RUN_ORDER, Batch, as_given, check_experts, fusion_for,
                      with_theme_mass, with_theme_recency, without_theme_mass, without_theme_recency)
from .inputs import as_jagged, routing_inputs
from .outputs import MoSOutput, RoutingInfo  # noqa: F401  (RoutingInfo: re-exported, mos.RoutingInfo)
from .routing import LearnedRouter, RandomRouter, no_aux, route_sessions, route_tokens


class MoSLayer(nn.Module):
    """The Mixture-of-Sequence layer (Lin et al., WWW 2026; docs/design.md says what is the
    paper's and what is our reconstruction): a drop-in sequence encoder, (history, target) ->
    one user-interest vector per example.

    It cuts each history into sessions, routes every session to one of K learned themes, runs
    one expert per theme over that theme's sessions in time order, a global expert over the
    whole history and a short-term expert over the last sessions, and fuses them. With the
    default `fusion="residual"` it starts as exactly its global expert (the backbone).

    Build it from a `MoSConfig` or from its fields as keywords (`MoSLayer(dim=64,
    num_themes=8)`); a bad option raises ValueError/TypeError naming the field.

    `encoder`: the experts' sequence model. None (default): the built-in encoder that
    `config.encoder` names (`mos.encoders`). Else a factory `num_experts -> nn.Module` or a
    one-expert `nn.Module` (copied once per expert) of the protocol in `mos.encoder_protocol`,
    used for the global, the short-term and every theme expert. `config.encoder` and the built-in
    encoders' options (`mos.encoders.BUILT_IN_ONLY`: num_heads, num_layers, attention_mass, sdim_*,
    mamba_state) do not apply to it: set away from their defaults they raise ValueError naming
    `encoder` (`config.dropout` still applies to the fused output).

    The other keyword-only parts replace pieces of the layer to measure what each adds (the CTR
    lab's ablations); the defaults are the layer:
        router: `mos.routing.LearnedRouter()`; `RandomRouter()` routes at random; any callable
            of the router protocol in `mos.routing`.
        routing_unit: `mos.routing.route_sessions`; `route_tokens` routes every item alone.
        experts: the expert kinds that run, a non-empty tuple of distinct names from
            EXPERT_KINDS ("global", "short", "themes"; all three).
    """

    def __init__(self, config: Optional[MoSConfig] = None, *, encoder=None, router: Optional[Callable] = None,
                 routing_unit: Optional[Callable] = None, experts: Sequence[str] = EXPERT_KINDS, **overrides):
        super().__init__()
        if config is None:
            config = MoSConfig(**overrides)
        elif not isinstance(config, MoSConfig):
            hint = " (MoSLayer(**options) or MoSLayer(MoSConfig(**options)) takes a dict's options)" if isinstance(
                config, dict) else ""
            raise TypeError(f"config: expected a MoSConfig, got {type(config).__name__}{hint}")
        elif overrides:
            raise ValueError(f"overrides: expected none when a config is given, got {sorted(overrides)}")
        self.config = cfg = config
        self.experts = check_experts(experts)
        for name, part in (("router", router), ("routing_unit", routing_unit)):
            if part is None:
                continue
            if isinstance(part, type) or not callable(part):
                what = f"the class {part.__name__} (pass an instance)" if isinstance(part, type) else type(part).__name__
                raise TypeError(f"{name}: expected a callable (see mos.routing), got {what}")
            if "themes" not in self.experts:
                raise ValueError(f"{name}: expected none when no theme experts run (experts={list(self.experts)}), "
                                 f"got {type(part).__name__}: nothing would route")
        self.backends = op_backends(cfg.backend)   # each op's backend, resolved once
        d = cfg.dim
        if encoder is None:
            encoder = functools.partial(make_encoder, cfg.encoder, d, cfg.num_heads, **encoder_options(cfg))
        else:
            encoder = as_factory(encoder)
            check_built_in_options_unset(cfg)
        # Only the experts that run own parameters (DDP refuses parameters that get no gradient).
        # The global expert is built first: it then draws the same initial weights as a backbone
        # encoder built at the same point of the random stream (`CTRModel` relies on it).
        for kind in BUILD_ORDER:
            if kind in self.experts:
                BUILD[kind](self, cfg, encoder)
        extras = [kind for kind in self.experts if kind != "global"]
        if cfg.fusion == "concat":
            self.out = nn.Linear(len(self.experts) * d, d)
        elif extras:
            # Zero at initialisation: the layer's output is then exactly the global expert's.
            self.extras_out = nn.Linear(len(extras) * d, d)
            nn.init.zeros_(self.extras_out.weight)
            nn.init.zeros_(self.extras_out.bias)
        paths = {**PATHS, "global": GLOBAL_PATHS[cfg.global_scope]}
        self._paths = tuple((kind, paths[kind]) for kind in RUN_ORDER if kind in self.experts)
        # Set after the experts, so that a router with parameters registers them last.
        self.router = router if router is not None else LearnedRouter()
        self.routing_unit = routing_unit if routing_unit is not None else route_sessions
        self._fuse = fusion_for(cfg.fusion, self.experts)
        self._theme_mass = with_theme_mass if cfg.theme_mass else without_theme_mass
        self._theme_recency = with_theme_recency if cfg.theme_recency else without_theme_recency
        # The router's parameters get the inputs' check: a NaN or inf prototype (after a diverged
        # step, say) makes every routing score and theme weight NaN.
        self._checked_parameters = ("prototypes",) if "themes" in self.experts else ()
        # Boosted training: the experts other than the global one read the inputs detached, so
        # only the global expert's path (as in the backbone) trains the embeddings.
        self._extras_inputs = torch.Tensor.detach if cfg.extras_detach_inputs else as_given

    def forward(self, values: torch.Tensor, target: torch.Tensor, offsets: Optional[torch.Tensor] = None, *,
                lengths: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                max_len: Optional[int] = None, routing_values: Optional[torch.Tensor] = None,
                routing_target: Optional[torch.Tensor] = None) -> MoSOutput:
        """Encode a batch of histories against their targets.

        Args:
            values: the item embeddings of every history event, oldest first, either jagged
                [T, d] (example b owns rows offsets[b]:offsets[b+1]) or padded [B, L, d] (example
                b owns rows 0:lengths[b]: padding on the right, never read). float32, float16
                or bfloat16, the dtype of the layer's parameters (outside torch.autocast).
            target: [B, d] the candidate item of each example, values' dtype.
            offsets: [B+1] int64 (or int32) with jagged values: starts at 0, non-decreasing, ends
                at T.
            lengths: [B] int64 (or int32) with padded values, 0 <= lengths[b] <= L; or with
                jagged values in place of offsets (what torchrec's jagged tensors carry).
            timestamps: event times, [T] (jagged) or [B, L] (padded), any real dtype that holds
                them (seconds; int64 for epoch seconds): needed for `session_mode="gap"`,
                non-decreasing inside each history and finite.
            max_len: the longest history in tokens (an int, at least that long), if the caller
                knows it: saves the device sync of computing it (torch.compile traces through
                either). The data check compares it with the offsets: a bound too small would
                cut histories where attention pads to it.
            routing_values, routing_target: what the router reads instead of the tokens, and the
                theme summary's query instead of the target: a representation of their own (an
                item embedding that only the router's losses and the gate train, say), in the
                form and dtype of values [T, d] or [B, L, d] and of target [B, d]; both or
                neither. The theme experts still read values. Default: values and target.

        Returns:
            `MoSOutput` (output [B, d], aux_loss, aux, routing, ...).

        Raises:
            ValueError / TypeError naming the argument, what was expected and what came: a
            wrong rank, shape, dtype or device; offsets not starting at 0, not monotone or not
            ending at T; timestamps going back in time, NaN or inf, or too coarse for gap_seconds
            (bfloat16 epoch seconds) or too far apart for int64; a max_len that is no int or is
            below the longest history; NaN/inf values, target or
            prototypes (`mos_kernels.checks.NonFiniteError`); float64 inputs under autocast; a
            caller's router or routing unit returning what the dispatch cannot use (themes out of
            range or repeated, a NaN gate, wrong shapes, inconsistent units), named `router` or
            `routing_unit` (mos.routing.check_router_result). `MoSConfig.validate_inputs=False`
            skips the data checks (each costs a pass and a sync). Empty histories are valid and
            give finite outputs.
        """
        cfg = self.config
        with mk.data_checks(cfg.validate_inputs):
            given = values
            values, offsets, timestamps = as_jagged(values, offsets, lengths, timestamps)
            check_values("values", values, dim=cfg.dim)
            check_tensor("target", target, device=values.device)
            check_values("target", target, dim=cfg.dim)
            self._check_dtypes(values, target)
            self._check_backend(values)
            routing_values, routing_target = routing_inputs(routing_values, routing_target, given, target, lengths,
                                                            routes="themes" in self.experts)
            for name in self._checked_parameters:
                check_finite(name, getattr(self, name))
            check_offsets("offsets", offsets, total=values.shape[0], device=values.device)
            num_examples = offsets.numel() - 1
            if target.shape[0] != num_examples:
                raise ValueError(f"target: expected {num_examples} rows (one per example), got {target.shape[0]}")
            sessions = mk.sessionize(offsets, mode=cfg.session_mode, session_len=cfg.session_len,
                                     timestamps=timestamps, gap_seconds=cfg.gap_seconds,
                                     max_session_len=cfg.max_session_len, num_tokens=values.shape[0])
            if max_len is not None:
                check_count("max_len", max_len, minimum=0)
                if reads_data() and max_len < max_segment_length(offsets):
                    raise ValueError(f"max_len: expected at least the longest history "
                                     f"({max_segment_length(offsets)} tokens), got {max_len}")
        if max_len is None:
            max_len = max_segment_length(offsets)
        # Everything below is built by this layer from checked inputs: no second data check.
        with mk.data_checks(False):
            extras_values, extras_target = self._extras_inputs(values), self._extras_inputs(target)
            batch = Batch(values, target, extras_values, extras_target,
                          extras_values if routing_values is None else routing_values,
                          extras_target if routing_target is None else routing_target,
                          offsets, sessions, max_len, aux=no_aux(values))
            outputs = {kind: path(self, batch) for kind, path in self._paths}
            aux = {**no_aux(values), **batch.aux}     # a router that returns fewer losses: the rest are zero
            aux_loss = (cfg.commitment_weight * aux["commitment"] + cfg.codebook_weight * aux["codebook"]
                        + cfg.load_balance_weight * aux["load_balance"])
            if "consistency" in aux:      # only a router with the loss reports it (logs stay as they were)
                aux_loss = aux_loss + cfg.consistency_weight * aux["consistency"]
            aux = {k: v.detach() for k, v in aux.items()}
            return self._fuse(self, outputs, aux_loss, aux, batch.routing)

    @property
    def custom_routing(self) -> bool:
        """Whether a caller's router or routing unit routes (its results get the data checks; the
        built-in ones make valid results by construction). Read at every call: parts may be
        swapped after construction."""
        return not (type(self.router) in (LearnedRouter, RandomRouter)
                    and self.routing_unit in (route_sessions, route_tokens))

    def _check_backend(self, values: torch.Tensor) -> None:
        """A kernel backend the inputs' device cannot run, named as the layer's option (each op
        would name itself, which a layer's user never called)."""
        backend = self.config.backend
        if backend == "triton" and not (values.is_cuda or interpreting()):
            wanted = "CUDA tensors (or TRITON_INTERPRET=1)"
        elif backend == "cuda" and values.is_cuda == cuda_emulating():
            wanted = "CPU tensors under MOS_CUDA_EMULATE=1" if values.is_cuda else "CUDA tensors"
        else:
            return
        raise ValueError(f"MoSConfig.backend: {backend!r} runs on {wanted}, got values on {values.device}; build "
                         f"the layer with backend='auto' (the kernels on CUDA, the reference on a CPU) or 'reference'")

    def _check_dtypes(self, values: torch.Tensor, target: torch.Tensor) -> None:
        """Outside torch.autocast (which casts per op, and is supported) the inputs must have the
        parameters' dtype: a float64 or bfloat16 batch into a float32 layer would otherwise fail
        deep inside an einsum without naming anything. Under autocast, which casts float32 but
        leaves float64 alone, float64 inputs fail alike: they are refused by name."""
        weights = next(self.parameters()).dtype
        if torch.is_autocast_enabled(values.device.type):
            for name, tensor in (("values", values), ("target", target)):
                if tensor.dtype == torch.float64 and weights != torch.float64:
                    raise TypeError(f"{name}: expected float32, float16 or bfloat16 under torch.autocast (it does "
                                    f"not cast float64), got float64")
            return
        if values.dtype != weights:
            raise TypeError(f"values: expected dtype {_dtype(weights)} (the layer's parameters'; cast the inputs, "
                            f"or the layer with .to(), or run under torch.autocast), got {_dtype(values.dtype)}")
        if target.dtype != values.dtype:
            raise TypeError(f"target: expected dtype {_dtype(values.dtype)} (that of values), got {_dtype(target.dtype)}")

    def _theme_summary(self, e_theme: torch.Tensor, target: torch.Tensor, segment_lengths: torch.Tensor) -> torch.Tensor:
        """Target-conditioned softmax over each example's non-empty themes; zeros if it has none.
        e_theme [K, B, d]; segment_lengths [K, B] tokens of each (theme, example)."""
        logits = self.theme_query(target) @ self.prototypes.t().to(target.dtype) / math.sqrt(self.config.dim)
        e_theme, logits = self._theme_mass(self, e_theme, logits, segment_lengths)
        nonempty = (segment_lengths > 0).t()                      # [B, K]
        has_any = nonempty.any(dim=1, keepdim=True)
        # Rows with no theme get finite logits (then zero weights), so no NaN reaches the gradient.
        logits = torch.where(nonempty | ~has_any, logits, torch.full_like(logits, -math.inf))
        weights = torch.softmax(logits.float(), dim=1).to(target.dtype) * nonempty
        return torch.einsum("bk,kbd->bd", weights, e_theme)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
