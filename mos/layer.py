"""`MoSLayer`: the Mixture-of-Sequence layer on top of `mos_kernels`.

sessions -> pooled sessions -> theme routing -> theme-major dispatch -> experts (theme,
global, short-term) -> target-conditioned fusion. The kernels own the data movement; this
module owns the parameters and the wiring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.checks import check_finite, check_offsets, check_values
from mos_kernels.backend import op_backends
from mos_kernels.jagged import max_segment_length, offsets_from_lengths, positions_in_segment
from mos_kernels.theme_gather import inverse_of_unique

from .config import EXPERT_KINDS, MoSConfig
from .encoders import make_encoder
from .inputs import as_jagged
from .routing import LearnedRouter, no_aux, route_sessions


@dataclass
class RoutingInfo:
    """What the router did, for inspection and diagnostics (nothing here needs gradients).

    S sessions over the batch, K themes, B examples; int64 unless said.

    Attributes:
        session_offsets: [S+1] the token rows (of the jagged `values`) of each session.
        session_example: [S] the example each session belongs to.
        session_theme: [S] each session's top-1 theme.
        themes: [S, top_k] the themes each session joins, best first.
        probs: [S, K] float, the router's softmax over the themes.
        segment_lengths: [K, B] tokens of example b in theme k's subsequence (after
            `max_theme_tokens`).
        tokens_per_theme: [K] (property) tokens each theme expert read over the batch.
    """

    session_offsets: torch.Tensor   # [S+1] token rows of each session
    session_example: torch.Tensor   # [S]
    session_theme: torch.Tensor     # [S] top-1 theme
    themes: torch.Tensor            # [S, top_k]
    probs: torch.Tensor             # [S, K]
    segment_lengths: torch.Tensor   # [K, B] tokens of example b in theme k's subsequence

    @property
    def tokens_per_theme(self) -> torch.Tensor:
        return self.segment_lengths.sum(1)


@dataclass
class MoSOutput:
    """What `MoSLayer.forward` returns. B examples, d = `MoSConfig.dim`; the vectors in the inputs'
    dtype, the auxiliary losses in float32 (they are computed in float32 under any input dtype).

    Attributes:
        output: [B, d] the fused user-interest vector: feed it to the CTR head.
        aux_loss: scalar, the weighted sum of `aux`; add it to the training loss.
        aux: the unweighted auxiliary losses by name (commitment, codebook, load_balance), scalars.
        routing: `RoutingInfo`, or None when the layer runs no theme experts.
        global_output, extras_output: [B, d] with `fusion="residual"` (else None): the global
            expert's vector and the other experts' term, output = global_output + extras_output,
            for a model that trains the two with different losses (`mos.boosting`).
    """

    output: torch.Tensor             # [B, d] fused user-interest vector
    aux_loss: torch.Tensor           # scalar, the weighted sum of `aux`
    aux: Dict[str, torch.Tensor]     # unweighted auxiliary losses: commitment, codebook, load_balance
    routing: Optional[RoutingInfo]   # None when the layer runs no theme experts
    # fusion="residual": output = global_output + extras_output (the global expert's vector and the
    # other experts' term), for a model that trains the two parts with different losses.
    global_output: Optional[torch.Tensor] = None
    extras_output: Optional[torch.Tensor] = None


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

    The keyword-only parts replace pieces of the layer to measure what each adds (the CTR lab's
    ablations); the defaults are the layer:
        router: `mos.routing.LearnedRouter()`; `RandomRouter()` routes at random; any callable
            of the router protocol in `mos.routing`.
        routing_unit: `mos.routing.route_sessions`; `route_tokens` routes every item alone.
        experts: the expert kinds that run, a non-empty tuple of distinct names from
            EXPERT_KINDS ("global", "short", "themes"; all three).
    """

    def __init__(self, config: Optional[MoSConfig] = None, *, router: Optional[Callable] = None,
                 routing_unit: Optional[Callable] = None, experts: Sequence[str] = EXPERT_KINDS, **overrides):
        super().__init__()
        if config is None:
            config = MoSConfig(**overrides)
        elif overrides:
            raise ValueError(f"overrides: expected none when a config is given, got {sorted(overrides)}")
        self.config = cfg = config
        self.experts = _check_experts(experts)
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
        encoder = dict(num_layers=cfg.num_layers, dropout=cfg.dropout, backend=cfg.backend,
                       attention_mass=cfg.attention_mass)
        # Only the experts that run own parameters (DDP refuses parameters that get no gradient).
        # The global expert is built first: it then draws the same initial weights as a backbone
        # encoder built at the same point of the random stream (`CTRModel` relies on it).
        for kind in _BUILD_ORDER:
            if kind in self.experts:
                _BUILD[kind](self, cfg, encoder)
        extras = [kind for kind in self.experts if kind != "global"]
        if cfg.fusion == "concat":
            self.out = nn.Linear(len(self.experts) * d, d)
        elif extras:
            # Zero at initialisation: the layer's output is then exactly the global expert's.
            self.extras_out = nn.Linear(len(extras) * d, d)
            nn.init.zeros_(self.extras_out.weight)
            nn.init.zeros_(self.extras_out.bias)
        paths = {**_PATHS, "global": _GLOBAL_PATHS[cfg.global_scope]}
        self._paths = tuple((kind, paths[kind]) for kind in _RUN_ORDER if kind in self.experts)
        # Set after the experts, so that a router with parameters registers them last.
        self.router = router if router is not None else LearnedRouter()
        self.routing_unit = routing_unit if routing_unit is not None else route_sessions
        self._fuse = _fusion(cfg.fusion, self.experts)
        self._theme_mass = _with_theme_mass if cfg.theme_mass else _without_theme_mass
        # The router's parameters get the inputs' check: a NaN or inf prototype (after a diverged
        # step, say) makes every routing score and theme weight NaN.
        self._checked_parameters = ("prototypes",) if "themes" in self.experts else ()
        # Boosted training: the experts other than the global one read the inputs detached, so
        # only the global expert's path (as in the backbone) trains the embeddings.
        self._extras_inputs = torch.Tensor.detach if cfg.extras_detach_inputs else _as_given

    def forward(self, values: torch.Tensor, target: torch.Tensor, offsets: Optional[torch.Tensor] = None, *,
                lengths: Optional[torch.Tensor] = None, timestamps: Optional[torch.Tensor] = None,
                max_len: Optional[int] = None) -> MoSOutput:
        """Encode a batch of histories against their targets.

        Args:
            values: the item embeddings of every history event, oldest first, either jagged
                [T, d] (example b owns rows offsets[b]:offsets[b+1]) or padded [B, L, d] (example
                b owns rows 0:lengths[b]: padding on the right, never read). float32, float16
                or bfloat16, the dtype of the layer's parameters (outside torch.autocast).
            target: [B, d] the candidate item of each example, values' dtype.
            offsets: [B+1] int64 with jagged values: starts at 0, non-decreasing, ends at T.
            lengths: [B] int64 with padded values, 0 <= lengths[b] <= L.
            timestamps: event times, [T] (jagged) or [B, L] (padded), any real dtype that holds
                them (seconds; int64 for epoch seconds): needed for `session_mode="gap"`,
                non-decreasing inside each history and finite.
            max_len: the longest history in tokens, if the caller knows it: saves the device
                sync of computing it (torch.compile traces through either).

        Returns:
            `MoSOutput` (output [B, d], aux_loss, aux, routing, ...).

        Raises:
            ValueError / TypeError naming the argument, what was expected and what came: a
            wrong rank, shape, dtype or device; offsets not starting at 0, not monotone or not
            ending at T; timestamps going back in time, NaN or inf; NaN/inf values, target or
            prototypes (`mos_kernels.checks.NonFiniteError`). `MoSConfig.validate_inputs=False`
            skips the data checks (each costs a pass and a sync). Empty histories are valid and
            give finite outputs.
        """
        cfg = self.config
        with mk.data_checks(cfg.validate_inputs):
            values, offsets, timestamps = as_jagged(values, offsets, lengths, timestamps)
            check_values("values", values, dim=cfg.dim)
            check_values("target", target, dim=cfg.dim)
            self._check_dtypes(values, target)
            for name in self._checked_parameters:
                check_finite(name, getattr(self, name))
            check_offsets("offsets", offsets, total=values.shape[0], device=values.device)
            num_examples = offsets.numel() - 1
            if target.shape[0] != num_examples:
                raise ValueError(f"target: expected {num_examples} rows (one per example), got {target.shape[0]}")
            sessions = mk.sessionize(offsets, mode=cfg.session_mode, session_len=cfg.session_len,
                                     timestamps=timestamps, gap_seconds=cfg.gap_seconds,
                                     max_session_len=cfg.max_session_len, num_tokens=values.shape[0])
        if max_len is None:
            max_len = max_segment_length(offsets)
        # Everything below is built by this layer from checked inputs: no second data check.
        with mk.data_checks(False):
            batch = _Batch(values, target, self._extras_inputs(values), self._extras_inputs(target), offsets,
                           sessions, max_len, aux=no_aux(values))
            outputs = {kind: path(self, batch) for kind, path in self._paths}
            aux = batch.aux
            aux_loss = (cfg.commitment_weight * aux["commitment"] + cfg.codebook_weight * aux["codebook"]
                        + cfg.load_balance_weight * aux["load_balance"])
            aux = {k: v.detach() for k, v in aux.items()}
            return self._fuse(self, outputs, aux_loss, aux, batch.routing)

    def _check_dtypes(self, values: torch.Tensor, target: torch.Tensor) -> None:
        """Outside torch.autocast (which casts per op, and is supported) the inputs must have the
        parameters' dtype: a float64 or bfloat16 batch into a float32 layer would otherwise fail
        deep inside an einsum without naming anything."""
        if torch.is_autocast_enabled(values.device.type):
            return
        weights = next(self.parameters()).dtype
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


@dataclass
class _Batch:
    """One forward's checked inputs, and what the theme path leaves for the output."""

    values: torch.Tensor          # [T, d]
    target: torch.Tensor          # [B, d]
    extras_values: torch.Tensor   # values as the other experts read them (maybe detached)
    extras_target: torch.Tensor
    offsets: torch.Tensor         # [B+1]
    sessions: mk.Sessions
    max_len: int
    aux: Dict[str, torch.Tensor]
    routing: Optional[RoutingInfo] = None


def _check_experts(experts) -> tuple:
    """The expert kinds in EXPERT_KINDS order, whatever order they were named in (the fusion's
    weight columns follow it, so a state dict means one thing)."""
    kinds = tuple(experts) if isinstance(experts, (tuple, list)) else None
    if not kinds or len(set(kinds)) != len(kinds) or any(kind not in EXPERT_KINDS for kind in kinds):
        raise ValueError(f"experts: expected a non-empty list of distinct kinds from {list(EXPERT_KINDS)}, "
                         f"got {experts!r}")
    return tuple(kind for kind in EXPERT_KINDS if kind in kinds)


def _as_given(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# ---- the experts: what each kind builds, and its path in the forward ---------------------------

def _build_global(layer: MoSLayer, cfg: MoSConfig, encoder: dict) -> None:
    layer.global_expert = make_encoder(cfg.encoder, cfg.dim, cfg.num_heads, 1, **encoder)


def _build_themes(layer: MoSLayer, cfg: MoSConfig, encoder: dict) -> None:
    layer.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.num_themes, cfg.dim), dim=-1))
    layer.theme_experts = make_encoder(cfg.encoder, cfg.dim, cfg.num_heads, cfg.num_themes, **encoder)
    layer.theme_query = nn.Linear(cfg.dim, cfg.dim)
    if cfg.theme_mass:
        # Zero at initialisation: the layer starts as the one without theme mass.
        layer.mass_logit = nn.Parameter(torch.zeros(()))
        layer.mass_value = nn.Parameter(torch.zeros(cfg.num_themes, cfg.dim))


def _build_short(layer: MoSLayer, cfg: MoSConfig, encoder: dict) -> None:
    layer.short_expert = make_encoder(cfg.encoder, cfg.dim, cfg.num_heads, 1, **encoder)


def _global_path(layer: MoSLayer, batch: _Batch) -> torch.Tensor:
    """The global expert over the whole history's tokens."""
    return layer.global_expert(batch.values, batch.target, batch.offsets, max_len=batch.max_len)[0]


def _global_sessions_path(layer: MoSLayer, batch: _Batch) -> torch.Tensor:
    """`global_scope="sessions"`: the global expert over the history's session vectors."""
    sessions = batch.sessions
    pooled = mk.session_pool(batch.values, sessions.session_offsets, backend=layer.backends["session_pool"])
    return layer.global_expert(pooled, batch.target, sessions.example_session_offsets)[0]


def _short_path(layer: MoSLayer, batch: _Batch) -> torch.Tensor:
    """The short-term expert over the tokens of each example's last `short_sessions` sessions."""
    short_index, short_offsets = _recent_sessions(batch.offsets, batch.sessions, layer.config.short_sessions)
    num_tokens = batch.values.shape[0]
    return layer.short_expert(batch.extras_values, batch.extras_target, short_offsets, gather_index=short_index,
                              inverse_index=inverse_of_unique(short_index, num_tokens), max_len=batch.max_len)[0]


def _theme_path(layer: MoSLayer, batch: _Batch) -> torch.Tensor:
    """Steps 2-4 and the theme half of 5-6: route, dispatch, run the K experts, summarise. Leaves
    the router's auxiliary losses and the `RoutingInfo` on `batch`."""
    cfg = layer.config
    values, target, offsets = batch.extras_values, batch.extras_target, batch.offsets
    num_examples, num_tokens = offsets.numel() - 1, values.shape[0]
    units = layer.routing_unit(offsets, batch.sessions, num_tokens)
    _, routing, batch.aux = layer.router(values, units, layer.prototypes, temperature=cfg.temperature,
                                         top_k=cfg.top_k, backends=layer.backends, training=layer.training)
    dispatch = mk.theme_dispatch(routing.themes, routing.gate, units.session_offsets, units.session_example,
                                 num_examples=num_examples, num_themes=cfg.num_themes,
                                 max_theme_tokens=cfg.max_theme_tokens, num_tokens=num_tokens,
                                 example_session_offsets=units.example_session_offsets,
                                 backend=layer.backends["theme_dispatch"])
    # A theme subsequence is never longer than its example.
    theme_len = batch.max_len if cfg.max_theme_tokens is None else min(batch.max_len, cfg.max_theme_tokens)
    e_theme = layer.theme_experts(values, target, dispatch.theme_offsets, gather_index=dispatch.gather_index,
                                  row_gate=dispatch.row_gate, inverse_index=dispatch.inverse_index,
                                  max_len=theme_len)
    segment_lengths = dispatch.segment_lengths
    batch.routing = RoutingInfo(units.session_offsets, units.session_example, routing.themes[:, 0], routing.themes,
                                routing.probs.detach(), segment_lengths)
    return layer._theme_summary(e_theme, target, segment_lengths)


def _without_theme_mass(layer: MoSLayer, e_theme, logits, segment_lengths):
    return e_theme, logits


def _with_theme_mass(layer: MoSLayer, e_theme, logits, segment_lengths):
    """`theme_mass`: how much of the history a theme holds, m = log(1 + tokens of (theme, example)),
    enters the summary twice: as a logit term a * m (the heavier themes weigh more) and as a value
    term m * v_k added to each theme expert's vector (so the softmax average, scale-free by
    itself, carries the mass). a and v start at zero."""
    mass = torch.log1p(segment_lengths.to(e_theme.dtype))                 # [K, B]
    e_theme = e_theme + mass[:, :, None] * layer.mass_value[:, None, :].to(e_theme.dtype)
    return e_theme, logits + layer.mass_logit.to(logits.dtype) * mass.t()


_BUILD = {"global": _build_global, "short": _build_short, "themes": _build_themes}
_PATHS = {"global": _global_path, "short": _short_path, "themes": _theme_path}
_GLOBAL_PATHS = {"tokens": _global_path, "sessions": _global_sessions_path}
# Fixed orders, whatever order a caller names the experts in: parameters are drawn from the
# random stream in _BUILD_ORDER (the global expert first, as a backbone's encoder would be) and
# the paths run in _RUN_ORDER (the random router's draws come before any dropout's).
_BUILD_ORDER = ("global", "themes", "short")
_RUN_ORDER = ("themes", "global", "short")


# ---- fusion -------------------------------------------------------------------------------------

def _residual_fusion(layer: MoSLayer, outputs, aux_loss, aux, routing) -> MoSOutput:
    """output = e_global + dropout(W_x [e_short; e_themes]), W_x zero at initialisation."""
    base, extras = outputs["global"], _extras_term(layer, outputs)
    return MoSOutput(base + extras, aux_loss, aux, routing, base, extras)


def _global_only_fusion(layer: MoSLayer, outputs, aux_loss, aux, routing) -> MoSOutput:
    """The residual fusion with no other expert: the global expert's vector."""
    return MoSOutput(outputs["global"], aux_loss, aux, routing, outputs["global"], None)


def _extras_only_fusion(layer: MoSLayer, outputs, aux_loss, aux, routing) -> MoSOutput:
    """The residual fusion without a global expert: the other experts' term alone."""
    extras = _extras_term(layer, outputs)
    return MoSOutput(extras, aux_loss, aux, routing, None, extras)


def _extras_term(layer: MoSLayer, outputs) -> torch.Tensor:
    extras = torch.cat([outputs[kind] for kind in layer.experts if kind != "global"], dim=1)
    return F.dropout(layer.extras_out(extras), layer.config.dropout, layer.training)


def _concat_fusion(layer: MoSLayer, outputs, aux_loss, aux, routing) -> MoSOutput:
    """output = dropout(W_o [e_global; e_short; e_themes])."""
    fused = layer.out(torch.cat([outputs[kind] for kind in layer.experts], dim=1))
    return MoSOutput(F.dropout(fused, layer.config.dropout, layer.training), aux_loss, aux, routing)


def _fusion(fusion: str, experts: tuple):
    """The fusion function of `fusion` for this expert set (chosen once, at construction)."""
    if fusion == "concat":
        return _concat_fusion
    has_global, has_extras = "global" in experts, len(experts) > ("global" in experts)
    return {(True, True): _residual_fusion, (True, False): _global_only_fusion,
            (False, True): _extras_only_fusion}[has_global, has_extras]


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _recent_sessions(offsets: torch.Tensor, sessions: mk.Sessions, count: int):
    """Gather index and offsets of the tokens in each example's last `count` sessions."""
    eso = sessions.example_session_offsets
    first = torch.maximum(eso[1:] - count, eso[:-1])
    start = sessions.session_offsets[first]
    short_offsets = offsets_from_lengths(offsets[1:] - start)
    pos = positions_in_segment(short_offsets)
    index = torch.repeat_interleave(start, short_offsets[1:] - short_offsets[:-1], output_size=pos.numel()) + pos
    return index, short_offsets
