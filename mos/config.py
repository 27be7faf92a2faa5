"""`MoSConfig`: the options of `mos.MoSLayer`, and the checks every config section shares.

Values are checked in `__post_init__`, so a bad option fails at once with the field's name, what
was expected and what came (an int option given 2.5 included). A keyword of an earlier layout
(`capacity`, or an ablation option: the router, the routing unit and the expert set are parts
handed to `MoSLayer`) is refused naming where it lives now.
The CTR lab's configuration (model, training, data, profile) is `mos.lab.config`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Optional

from mos_kernels.backend import BACKENDS
from mos_kernels.checks import check_choice, check_flag, check_positive
from mos_kernels.routing import MIN_TEMPERATURE

from .sdim import MAX_BITS as MAX_SDIM_BITS


def config_section(name: str, value, cls):
    """`value` as the nested section `name` of a config: a `cls` as it is, a dict of its fields
    built into one (what YAML gives). Raises TypeError naming `name` for any other value and for
    a key `cls` has not, listing the keys it has."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known), key=repr)     # keys of mixed types (1 and "x") do not sort
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {unknown}; expected some of {known}")
        return cls(**value)
    raise TypeError(f"{name}: expected a {cls.__name__} or a dict of its fields, got {type(value).__name__} "
                    f"{value!r}")


def check_field_types(obj, prefix: str, tuples: tuple = ()) -> None:
    """Every field of the dataclass `obj` annotated `int` (or `Optional[int]`, when not None)
    holds an int, and so does every element of the tuple fields named in `tuples`: a float such
    as 2.5 or a bool is refused (TypeError) naming `prefix.field`, where it is built, not deep in
    a forward pass. Every field annotated `float` (or `Optional[float]`, when not None) holds a
    real number that is not a bool ("0.1" or True is refused; a numpy scalar such as
    np.float32(0.1) is stored as the Python float it equals). Every field annotated `bool` holds
    a bool: "False" or 0 would be taken for a truth value without a word."""
    hints = typing.get_type_hints(type(obj))
    for item in dataclasses.fields(obj):
        hint = hints[item.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(arg for arg in args if arg is not type(None)) if optional else hint
        value = getattr(obj, item.name)
        if base is int and not (optional and value is None):
            require_int(f"{prefix}.{item.name}", value)
        elif base is float and not (optional and value is None):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):     # np.bool_ is no Real
                raise TypeError(f"{prefix}.{item.name}: expected a number, got {value!r} ({type(value).__name__})")
            if not isinstance(value, (int, float)):         # numpy scalars: the rest of the checks read floats
                object.__setattr__(obj, item.name, float(value))
        elif hint is bool:
            check_flag(f"{prefix}.{item.name}", value)
    for name in tuples:
        for value in getattr(obj, name):
            require_int(f"{prefix}.{name}[]", value)


def require_int(name: str, value) -> None:
    """TypeError naming `name` unless `value` is an int (a bool is not), ValueError unless it fits
    in int64 (where every size ends up)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")
    if not -2 ** 63 <= value < 2 ** 63:
        raise ValueError(f"{name}: expected an int that fits in int64, got {value!r}")


# Keywords of an earlier layout of MoSConfig: renamed in place, or moved out of the config (the
# ablation options are parts the CTR lab hands `MoSLayer`, not options of the layer).
RENAMED = {"capacity": "max_theme_tokens"}
MOVED_OUT = {
    "router": "a MoSLayer keyword: MoSLayer(config, router=mos.routing.RandomRouter())",
    "routing_unit": "a MoSLayer keyword: MoSLayer(config, routing_unit=mos.routing.route_tokens)",
    "experts": "a MoSLayer keyword: MoSLayer(config, experts=('global', 'themes'))",
    "vq_detach_tokens": "an option of the router: MoSLayer(config, router=mos.routing.LearnedRouter("
                        "vq_detach_tokens=False))",
    "ablation": "the options it held are MoSLayer keywords (router, routing_unit, experts) and "
                "MoSConfig.extras_detach_inputs",
}
REMOVED = {"readout": "the transformer encoder always reads out by target attention"}


def _refuse_renamed(cls):
    """MoSConfig(capacity=...) or MoSConfig(router=...) raises a TypeError naming the new place."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for name in kwargs:
            if name in RENAMED:
                raise TypeError(f"{cls.__name__}.{name}: renamed {RENAMED[name]}")
            if name in MOVED_OUT:
                raise TypeError(f"{cls.__name__}.{name}: moved out of the config; it is {MOVED_OUT[name]}")
            if name in REMOVED:
                raise TypeError(f"{cls.__name__}.{name}: removed; {REMOVED[name]}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


# `theme_recency`: ranks 0 .. 15 of a session among its theme's sessions, counted from the latest.
THEME_RECENCY_BUCKETS = 16
EXPERT_KINDS = ("global", "short", "themes")   # the kinds of experts MoSLayer can run
FUSIONS = ("residual", "concat")


@_refuse_renamed
@dataclass(frozen=True)
class MoSConfig:
    """Options of `mos.MoSLayer`: sessions, routing, dispatch, the experts and their fusion.

    Every option is checked when the config is built: a bad one raises ValueError or TypeError
    naming `MoSConfig.<field>`, what was expected and what came. Frozen, since a layer reads its
    config on every forward: `dataclasses.replace(config, top_k=2)` makes a changed copy (checked
    too).

    Attributes:
        dim: width d of the history embeddings and of the target (32).
        num_heads: attention heads of every expert; must divide dim (2).
        session_mode: "fixed" (chunks of session_len, aligned to the newest event; needs no
            timestamps) or "gap" (a pause longer than gap_seconds starts a session).
        session_len: events per session in "fixed" mode (8).
        gap_seconds: "gap" mode: the pause, in the timestamps' unit (seconds), that cuts (1800).
        max_session_len: "gap" mode: longer sessions are split (64).
        num_themes: K, the learned themes, one expert each (8).
        temperature: tau of the routing scores cos(session, prototype) / tau (0.1).
        top_k: themes each session joins, <= num_themes (1).
        max_theme_tokens: keep at most this many newest tokens of each (example, theme)
            subsequence; None keeps all.
        encoder: every expert's encoder: "target_attention" (DIN/TWIN style), "transformer"
            (causal self-attention, then a target-attention readout: TransAct/BST style) or
            "sdim" (target attention approximated by SimHash sampling, `mos.sdim`) or "mamba4rec"
            (selective state-space layers, then a target-attention readout: `mos.mamba4rec`).
        num_layers: transformer or Mamba layers per expert (1).
        mamba_state: "mamba4rec": the state size S per channel (16).
        sdim_rounds, sdim_bits: SDIM's hashing rounds and signature bits per round (16, 3: the
            paper's 48 hash functions in groups of 3).
        global_scope: the global expert reads the "tokens" or the "sessions" vectors.
        short_sessions: the short-term expert reads the last this-many sessions (1).
        fusion: "residual" (output = global + W [short; themes], W zero at initialisation, so
            the layer starts as its backbone) or "concat" (output = W [global; short; themes]).
        commitment_weight, codebook_weight, load_balance_weight: weights of the auxiliary losses
            in `MoSOutput.aux_loss` (0.25, 1.0, 0.01).
        consistency_weight: weight of the router's session-consistency loss, where the router
            returns one (`LearnedRouter(session_consistency=True)`; 1.0).
        dropout: on the fused output ("residual": on the other experts' term) and in the
            transformer blocks (0.0).
        backend: kernels: "auto" (the measured-faster kernels on CUDA, the reference on a CPU),
            "reference" (pure PyTorch), "triton" or "cuda".
        validate_inputs: check the inputs' data (finite, monotone offsets, time order) on every
            forward, at the cost of one pass and a device sync (True).
        attention_mass: every target attention (every expert's, and so the backbone's) adds
            per head log(1 + sum of exp(scores)) over its segment, through a weight zero at
            initialisation (`mos.encoders.attention_mass`) (False).
        theme_mass: the theme summary also sees how much of each history every theme holds,
            log(1 + tokens), as a logit term and as a value term per theme (both zero at
            initialisation) (False).
        theme_recency: every token a theme expert reads also carries an embedding of how many
            of its example's later sessions (routing units: tokens under `route_tokens`) went
            to the same theme (0: that theme's latest session; clipped at
            THEME_RECENCY_BUCKETS - 1), zero at initialisation; needs top_k=1; ignored without
            theme experts (False).
        extras_detach_inputs: the short-term and theme experts and the router read the tokens
            and the target detached, so only the global expert's path trains the embeddings:
            boosted training (`mos.boosting`) sets it (False).
    """

    dim: int = 32                    # embedding width d of the tokens and of the target
    num_heads: int = 2               # attention heads of every expert
    # Step 1, sessions.
    session_mode: str = "fixed"      # "fixed": chunks of session_len aligned to the newest item; "gap": time gaps
    session_len: int = 8             # items per session in "fixed" mode
    gap_seconds: float = 1800.0      # "gap" mode: a gap longer than this starts a new session
    max_session_len: int = 64        # "gap" mode: longer sessions are split
    # Step 3, routing.
    num_themes: int = 8              # K, number of learned themes (theme experts)
    temperature: float = 0.1         # tau in z = cos(h, c) / tau
    top_k: int = 1                   # themes each session joins
    # Step 4, dispatch.
    # Keep at most this many most recent tokens per (example, theme) subsequence; None: all.
    max_theme_tokens: Optional[int] = None
    # Step 5, experts.
    encoder: str = "target_attention"  # "target_attention" | "transformer" | "sdim" | "mamba4rec"
    num_layers: int = 1              # transformer or Mamba layers per expert
    mamba_state: int = 16            # Mamba4Rec: state size per channel
    sdim_rounds: int = 16            # SDIM: hashing rounds (groups of hash functions)
    sdim_bits: int = 3               # SDIM: bits per round's signature
    global_scope: str = "tokens"     # global expert over "tokens" or over the "sessions" vectors
    short_sessions: int = 1          # short-term expert sees the last this-many sessions
    # Every target attention (the backbone's, each expert's, the MoE baselines') also outputs how
    # much of its segment matches the target, per head: the softmax alone cannot tell.
    attention_mass: bool = False
    # The theme summary's softmax average cannot tell a theme of one session from one of twenty;
    # the label of a CTR model often depends on that share. True adds log(1 + tokens) per theme.
    theme_mass: bool = False
    # A theme subsequence keeps time order, but a target attention over it is order-free: it cannot
    # find the theme's latest session when other themes' sessions came after it. True adds each
    # token's "sessions ago on this theme" embedding (the within-theme recency of docs/profile.md).
    theme_recency: bool = False
    # Step 6, fusion.
    # "residual": u = e_global + W_x [e_short; e_theta] with W_x zero at initialisation, so the layer
    # starts as its backbone (the global expert) and the other experts add what they learn;
    # "concat": u = W_o [e_global; e_short; e_theta].
    fusion: str = "residual"
    # Auxiliary losses (weights applied inside the layer's `aux_loss`).
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    load_balance_weight: float = 0.01
    consistency_weight: float = 1.0  # a router's session-consistency loss (mos.routing), where it has one
    dropout: float = 0.0             # on the fused output ("residual": on the other experts' term) and transformer blocks
    backend: str = "auto"            # kernel backend: "auto" | "reference" | "triton" | "cuda"
    # Check the inputs' data (finite values, monotone offsets, time order) on every forward:
    # one pass over the inputs and a device sync. Turn off in production once the pipeline is trusted.
    validate_inputs: bool = True
    # The other experts and the router read the inputs detached (boosted training sets it).
    extras_detach_inputs: bool = False

    def __post_init__(self):
        check_field_types(self, "MoSConfig")
        check_positive("MoSConfig.dim", self.dim)
        check_positive("MoSConfig.num_heads", self.num_heads)
        if self.dim % self.num_heads:
            raise ValueError(
                f"MoSConfig.dim: expected a multiple of num_heads={self.num_heads}, got {self.dim}")
        check_choice("MoSConfig.session_mode", self.session_mode, ("fixed", "gap"))
        check_positive("MoSConfig.session_len", self.session_len)
        check_positive("MoSConfig.gap_seconds", self.gap_seconds)
        check_positive("MoSConfig.max_session_len", self.max_session_len)
        check_positive("MoSConfig.num_themes", self.num_themes)
        if not MIN_TEMPERATURE <= self.temperature < math.inf:
            raise ValueError(f"MoSConfig.temperature: expected a finite number of at least {MIN_TEMPERATURE:g} "
                             f"(routing scores cos / temperature must stay finite, and an infinite one makes every "
                             f"score 0), got {self.temperature!r}")
        check_positive("MoSConfig.top_k", self.top_k)
        if self.top_k > self.num_themes:
            raise ValueError(
                f"MoSConfig.top_k: expected at most num_themes={self.num_themes}, got {self.top_k}")
        if self.theme_recency and self.top_k != 1:
            raise ValueError(f"MoSConfig.theme_recency: expected top_k=1 (a session's rank among its theme's "
                             f"sessions is one number only when it joins one theme), got top_k={self.top_k}")
        if self.max_theme_tokens is not None:
            check_positive("MoSConfig.max_theme_tokens", self.max_theme_tokens)
        check_choice("MoSConfig.encoder", self.encoder, ("target_attention", "transformer", "sdim", "mamba4rec"))
        check_positive("MoSConfig.mamba_state", self.mamba_state)
        check_positive("MoSConfig.sdim_rounds", self.sdim_rounds)
        if not 1 <= self.sdim_bits <= MAX_SDIM_BITS:
            raise ValueError(f"MoSConfig.sdim_bits: expected an int in [1, {MAX_SDIM_BITS}] (one signature per "
                             f"round in an int64), got {self.sdim_bits!r}")
        if self.attention_mass and self.encoder == "sdim":
            raise ValueError("MoSConfig.attention_mass: expected False with encoder='sdim' (it samples by hashing: "
                             "no softmax whose mass to add), got True")
        check_positive("MoSConfig.num_layers", self.num_layers)
        check_choice("MoSConfig.global_scope", self.global_scope, ("tokens", "sessions"))
        check_positive("MoSConfig.short_sessions", self.short_sessions)
        check_choice("MoSConfig.fusion", self.fusion, FUSIONS)
        for name in ("commitment_weight", "codebook_weight", "load_balance_weight", "consistency_weight", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"MoSConfig.{name}: expected a finite number >= 0, got {value!r}")
        if self.dropout > 1:
            raise ValueError(f"MoSConfig.dropout: expected a probability in [0, 1], got {self.dropout!r}")
        check_choice("MoSConfig.backend", self.backend, BACKENDS)
