"""`MoSLayer`: the Mixture-of-Sequence layer on top of `mos_kernels`.

sessions -> pooled sessions -> theme routing -> theme-major dispatch -> experts (theme,
global, short-term) -> target-conditioned fusion. The kernels own the data movement; this
module owns the parameters and the wiring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.checks import check_finite, check_offsets, check_tensor, check_values
from mos_kernels.backend import op_backends
from mos_kernels.jagged import counts_of, max_segment_length, offsets_from_lengths, positions_in_segment
from mos_kernels.theme_gather import inverse_of_unique
from mos_kernels.theme_route import normalized

from .config import MoSConfig
from .encoders import make_encoder


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
    """

    def __init__(self, config: Optional[MoSConfig] = None, **overrides):
        super().__init__()
        if config is None:
            config = MoSConfig(**overrides)
        elif overrides:
            raise ValueError(f"overrides: expected none when a config is given, got {sorted(overrides)}")
        self.config = cfg = config
        self.backends = op_backends(cfg.backend)   # each op's backend, resolved once
        d = cfg.dim
        encoder = dict(num_layers=cfg.num_layers, readout=cfg.readout, dropout=cfg.dropout, backend=cfg.backend)
        # Only the experts that run own parameters (DDP refuses parameters that get no gradient).
        # The global expert is built first: it then draws the same initial weights as a backbone
        # encoder built at the same point of the random stream (`CTRModel` relies on it).
        if "global" in cfg.ablation.experts:
            self.global_expert = make_encoder(cfg.encoder, d, cfg.num_heads, 1, **encoder)
        if "themes" in cfg.ablation.experts:
            self.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.num_themes, d), dim=-1))
            self.theme_experts = make_encoder(cfg.encoder, d, cfg.num_heads, cfg.num_themes, **encoder)
            self.theme_query = nn.Linear(d, d)
        if "short" in cfg.ablation.experts:
            self.short_expert = make_encoder(cfg.encoder, d, cfg.num_heads, 1, **encoder)
        if cfg.fusion == "residual":
            extras = len([kind for kind in cfg.ablation.experts if kind != "global"])
            if extras:
                # Zero at initialisation: the layer's output is then exactly the global expert's.
                self.extras_out = nn.Linear(extras * d, d)
                nn.init.zeros_(self.extras_out.weight)
                nn.init.zeros_(self.extras_out.bias)
        elif cfg.fusion == "gate":
            self.fusion_gate = nn.Linear(d, len(cfg.ablation.experts))
            self.out = nn.Linear(d, d)
        else:
            self.out = nn.Linear(len(cfg.ablation.experts) * d, d)

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
            values, offsets, timestamps = _as_jagged(values, offsets, lengths, timestamps)
            check_values("values", values, dim=cfg.dim)
            check_values("target", target, dim=cfg.dim)
            self._check_dtypes(values, target)
            if "themes" in cfg.ablation.experts:
                # The router's parameters get the inputs' check: a NaN or inf prototype (after a
                # diverged step, say) makes every routing score and theme weight NaN.
                check_finite("prototypes", self.prototypes)
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
            return self._experts_and_fusion(values, target, offsets, sessions, max_len)

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

    def _experts_and_fusion(self, values, target, offsets, sessions, max_len) -> MoSOutput:
        cfg = self.config
        outputs = {}
        aux = _no_aux(values)
        info = None
        pooled = None
        # The other experts (and the router) may read the inputs detached: then the embeddings
        # are shaped by the global expert's path alone, as in the backbone.
        detach = cfg.ablation.extras_detach_inputs
        x_values, x_target = (values.detach(), target.detach()) if detach else (values, target)
        if "themes" in cfg.ablation.experts:
            pooled, outputs["themes"], aux, info = self._theme_experts(x_values, x_target, offsets, sessions, max_len)
        if "global" in cfg.ablation.experts:
            if cfg.global_scope == "tokens":
                outputs["global"] = self.global_expert(values, target, offsets, max_len=max_len)[0]
            else:
                if pooled is None or cfg.ablation.routing_unit != "session" or detach:
                    pooled = mk.session_pool(values, sessions.session_offsets,
                                             backend=self.backends["session_pool"])
                outputs["global"] = self.global_expert(pooled, target, sessions.example_session_offsets)[0]
        if "short" in cfg.ablation.experts:
            short_index, short_offsets = _recent_sessions(offsets, sessions, cfg.short_sessions)
            outputs["short"] = self.short_expert(x_values, x_target, short_offsets, gather_index=short_index,
                                                 inverse_index=inverse_of_unique(short_index, values.shape[0]),
                                                 max_len=max_len)[0]
        aux_loss = (cfg.commitment_weight * aux["commitment"] + cfg.codebook_weight * aux["codebook"]
                    + cfg.load_balance_weight * aux["load_balance"])
        aux = {k: v.detach() for k, v in aux.items()}
        if cfg.fusion != "residual":
            return MoSOutput(self._fuse(target, outputs), aux_loss, aux, info)
        base = outputs.get("global")
        extras = self._extras(outputs)
        output = base if extras is None else extras if base is None else base + extras
        return MoSOutput(output, aux_loss, aux, info, base, extras)

    def _theme_experts(self, values, target, offsets, sessions, max_len):
        """Steps 2-4 and the theme half of 5-6: route, dispatch, run the K experts, summarise."""
        cfg = self.config
        num_examples = offsets.numel() - 1
        units = sessions if cfg.ablation.routing_unit == "session" else _token_sessions(offsets, values.shape[0])
        if cfg.ablation.router == "learned":
            pooled, routing = mk.session_pool_route(values, units.session_offsets, self.prototypes,
                                                    temperature=cfg.temperature, top_k=cfg.top_k,
                                                    backend=self.backends["session_pool_route"])
            # The auxiliary losses only train: an evaluating layer does not spend work on them.
            aux = (_aux_losses(pooled, self.prototypes, routing, cfg.temperature, cfg.ablation.vq_detach_tokens)
                   if self.training else _no_aux(values))
        else:
            pooled, routing = None, _random_routing(units.num_sessions, cfg.num_themes, cfg.top_k, values)
            aux = _no_aux(values)
        dispatch = mk.theme_dispatch(routing.themes, routing.gate, units.session_offsets, units.session_example,
                                     num_examples=num_examples, num_themes=cfg.num_themes,
                                     max_theme_tokens=cfg.max_theme_tokens,
                                     num_tokens=values.shape[0], example_session_offsets=units.example_session_offsets,
                                     backend=self.backends["theme_dispatch"])
        # A theme subsequence is never longer than its example.
        theme_len = max_len if cfg.max_theme_tokens is None else min(max_len, cfg.max_theme_tokens)
        e_theme = self.theme_experts(values, target, dispatch.theme_offsets, gather_index=dispatch.gather_index,
                                     row_gate=dispatch.row_gate, inverse_index=dispatch.inverse_index,
                                     max_len=theme_len)
        segment_lengths = dispatch.segment_lengths
        summary = self._theme_summary(e_theme, target, segment_lengths > 0)
        info = RoutingInfo(units.session_offsets, units.session_example, routing.themes[:, 0], routing.themes,
                           routing.probs.detach(), segment_lengths)
        return pooled, summary, aux, info

    def _theme_summary(self, e_theme: torch.Tensor, target: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Target-conditioned softmax over each example's non-empty themes; zeros if it has none."""
        logits = self.theme_query(target) @ self.prototypes.t().to(target.dtype) / math.sqrt(self.config.dim)
        nonempty = nonempty.t()                                   # [B, K]
        has_any = nonempty.any(dim=1, keepdim=True)
        # Rows with no theme get finite logits (then zero weights), so no NaN reaches the gradient.
        logits = torch.where(nonempty | ~has_any, logits, torch.full_like(logits, -math.inf))
        weights = torch.softmax(logits.float(), dim=1).to(target.dtype) * nonempty
        return torch.einsum("bk,kbd->bd", weights, e_theme)

    def _extras(self, outputs: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The residual fusion's term of the experts other than the global one (None if none run)."""
        extras = [outputs[kind] for kind in self.config.ablation.experts if kind != "global"]
        if not extras:
            return None
        return F.dropout(self.extras_out(torch.cat(extras, dim=1)), self.config.dropout, self.training)

    def _fuse(self, target, outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The "concat" and "gate" fusions."""
        expert_outputs = [outputs[kind] for kind in self.config.ablation.experts]
        if self.config.fusion == "concat":
            fused = self.out(torch.cat(expert_outputs, dim=1))
        else:
            gate = torch.softmax(self.fusion_gate(target), dim=1)
            fused = self.out(sum(gate[:, i:i + 1] * e for i, e in enumerate(expert_outputs)))
        return F.dropout(fused, self.config.dropout, self.training)


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_jagged(values, offsets, lengths, timestamps):
    """Accept jagged [T, d] + offsets or padded [B, L, d] + lengths; return the jagged form."""
    check_tensor("values", values)
    if values.dim() == 3:
        if offsets is not None:
            raise ValueError("offsets: expected None for padded values [B, L, d] (pass lengths), got a tensor")
        if lengths is None:
            raise ValueError("lengths: expected a [B] tensor with padded values [B, L, d], got None")
        if timestamps is not None:
            check_tensor("timestamps", timestamps, ndim=2)
            if timestamps.shape != values.shape[:2]:
                raise ValueError(f"timestamps: expected shape {tuple(values.shape[:2])} like padded values, "
                                 f"got {tuple(timestamps.shape)}")
            timestamps = mk.padded_to_jagged(timestamps[..., None], lengths)[0][:, 0]
        values, offsets = mk.padded_to_jagged(values, lengths)
        return values, offsets, timestamps
    if values.dim() != 2:
        raise ValueError(f"values: expected jagged [T, d] or padded [B, L, d], got shape {tuple(values.shape)}")
    if offsets is None:
        raise ValueError("offsets: expected a [B+1] int64 tensor with jagged values [T, d], got None")
    if lengths is not None:
        raise ValueError("lengths: expected None with jagged values (offsets say the lengths), got a tensor")
    return values, offsets, timestamps


def _recent_sessions(offsets: torch.Tensor, sessions: mk.Sessions, count: int):
    """Gather index and offsets of the tokens in each example's last `count` sessions."""
    eso = sessions.example_session_offsets
    first = torch.maximum(eso[1:] - count, eso[:-1])
    start = sessions.session_offsets[first]
    short_offsets = offsets_from_lengths(offsets[1:] - start)
    pos = positions_in_segment(short_offsets)
    index = torch.repeat_interleave(start, short_offsets[1:] - short_offsets[:-1], output_size=pos.numel()) + pos
    return index, short_offsets


def _token_sessions(offsets: torch.Tensor, num_tokens: int) -> mk.Sessions:
    """Every token its own session: the token-level routing ablation."""
    example = mk.segment_ids(offsets, num_tokens)
    return mk.Sessions(torch.arange(num_tokens + 1, device=offsets.device), example, offsets)


def _random_routing(num_sessions: int, num_themes: int, top_k: int, like: torch.Tensor) -> mk.Routing:
    """Uniformly random distinct themes per session, drawn anew every call (the random-routing
    ablation): no learned router, so a constant gate of 1 and uniform probabilities."""
    themes = torch.rand(num_sessions, num_themes, device=like.device).argsort(dim=1)[:, :top_k]
    probs = torch.full((num_sessions, num_themes), 1.0 / num_themes, device=like.device)
    gate = torch.ones((num_sessions, top_k), dtype=like.dtype, device=like.device)
    return mk.Routing(themes=themes, gate=gate, probs=probs, scores=torch.zeros_like(probs))


AUX_LOSSES = ("commitment", "codebook", "load_balance")


def _no_aux(like: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {name: like.new_zeros((), dtype=torch.float32) for name in AUX_LOSSES}


def _aux_losses(pooled, prototypes, routing, temperature: float, detach_tokens: bool) -> Dict[str, torch.Tensor]:
    """VQ commitment and codebook losses on the unit sphere (routing is cosine), Switch load balance.

    `detach_tokens`: the pooled sessions enter detached, so the losses move the prototypes only
    (the load balance then reads probabilities recomputed from the detached sessions)."""
    num_sessions, num_themes = routing.probs.shape
    h = normalized(pooled.detach() if detach_tokens else pooled)
    units = normalized(prototypes)
    c = units[routing.themes[:, 0]]
    denom = max(num_sessions, 1)
    commitment = ((h - c.detach()) ** 2).sum() / denom
    codebook = ((h.detach() - c) ** 2).sum() / denom
    chosen = counts_of(routing.themes.reshape(-1), num_themes).float()
    fraction = chosen / max(routing.themes.numel(), 1)
    probs = torch.softmax((h @ units.t()).float() / temperature, dim=1) if detach_tokens else routing.probs
    load_balance = num_themes * (fraction * probs.sum(0) / denom).sum()
    return {"commitment": commitment, "codebook": codebook, "load_balance": load_balance}
