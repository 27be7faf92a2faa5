"""Configuration dataclasses for the MoS layer, the CTR model, training and the whole run (the
data's, `DataConfig`, live in mos/data/config.py).

Defaults live here; a YAML file overrides them and `--set key=value` overrides the file
(`load_run_config`). Every choice the README marks [ours] is an option here, documented in the
README's option table. Values are checked in `__post_init__` so a bad option fails at once with
the field's name, what was expected and what came.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mos_kernels.checks import check_choice, check_positive
from mos_kernels.backend import BACKENDS

from mos.data.config import DataConfig, check_int_fields, config_section
from mos.moved_options import refuse_moved
from mos.variants import VARIANTS


EXPERT_KINDS = ("global", "short", "themes")
FUSIONS = ("residual", "concat", "gate")


@dataclass
class MoSAblation:
    """Options that exist to take the layer apart (the ablations of mos/variants.py): the defaults
    are the layer; every other value removes or weakens one of its parts."""

    router: str = "learned"          # "learned" prototypes, or "random" themes
    routing_unit: str = "session"    # route whole "session"s, or every "token" alone
    experts: tuple = EXPERT_KINDS    # which kinds run; drop one to measure what it adds
    # The VQ and load-balance losses see the pooled sessions detached: they move the prototypes,
    # never the item embeddings that the target, the global expert and the head share. The task
    # loss still reaches the embeddings through the routing gate. False undoes that choice.
    vq_detach_tokens: bool = True
    # The short-term and theme experts and the router read the tokens and the target detached:
    # only the global expert's path (as in the backbone) trains the embeddings. Boosted training
    # (`model.training`) sets it itself; true under joint training is an ablation.
    extras_detach_inputs: bool = False

    def __post_init__(self):
        check_choice("MoSConfig.ablation.router", self.router, ("learned", "random"))
        check_choice("MoSConfig.ablation.routing_unit", self.routing_unit, ("session", "token"))
        self.experts = tuple(self.experts)
        for kind in self.experts:
            check_choice("MoSConfig.ablation.experts[]", kind, EXPERT_KINDS)
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"MoSConfig.ablation.experts: expected a non-empty list of distinct kinds from "
                             f"{list(EXPERT_KINDS)}, got {list(self.experts)}")


@refuse_moved("model.mos")
@dataclass
class MoSConfig:
    """Options of `mos.MoSLayer`: sessions, routing, dispatch, the experts and their fusion."""

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
    encoder: str = "target_attention"  # "target_attention" | "transformer"
    num_layers: int = 1              # transformer layers per expert
    readout: str = "target"          # transformer readout: "target" attention | "last" token | "mean"
    global_scope: str = "tokens"     # global expert over "tokens" or over the "sessions" vectors
    short_sessions: int = 1          # short-term expert sees the last this-many sessions
    # Step 6, fusion.
    # "residual": u = e_global + W_x [e_short; e_theta] with W_x zero at initialisation, so the layer
    # starts as its backbone (the global expert) and the other experts add what they learn;
    # "concat": u = W_o [e_global; e_short; e_theta]; "gate": a softmax gate over the three.
    fusion: str = "residual"
    # Auxiliary losses (weights applied inside the layer's `aux_loss`).
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    load_balance_weight: float = 0.01
    dropout: float = 0.0             # on the fused output ("residual": on the other experts' term) and transformer blocks
    backend: str = "auto"            # kernel backend: "auto" | "reference" | "triton" | "cuda"
    # Check the inputs' data (finite values, monotone offsets, time order) on every forward:
    # one pass over the inputs and a device sync. Turn off in production once the pipeline is trusted.
    validate_inputs: bool = True
    # Options for ablations only, apart so that the layer's own options come first.
    ablation: MoSAblation = field(default_factory=MoSAblation)

    def __post_init__(self):
        self.ablation = config_section("MoSConfig.ablation", self.ablation, MoSAblation)
        check_int_fields(self, "MoSConfig")
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
        check_positive("MoSConfig.temperature", self.temperature)
        check_positive("MoSConfig.top_k", self.top_k)
        if self.top_k > self.num_themes:
            raise ValueError(
                f"MoSConfig.top_k: expected at most num_themes={self.num_themes}, got {self.top_k}")
        if self.max_theme_tokens is not None:
            check_positive("MoSConfig.max_theme_tokens", self.max_theme_tokens)
        check_choice("MoSConfig.encoder", self.encoder, ("target_attention", "transformer"))
        check_positive("MoSConfig.num_layers", self.num_layers)
        check_choice("MoSConfig.readout", self.readout, ("target", "last", "mean"))
        check_choice("MoSConfig.global_scope", self.global_scope, ("tokens", "sessions"))
        check_positive("MoSConfig.short_sessions", self.short_sessions)
        check_choice("MoSConfig.fusion", self.fusion, FUSIONS)
        for name in ("commitment_weight", "codebook_weight", "load_balance_weight", "dropout"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"MoSConfig.{name}: expected a number >= 0, got {value!r}")
        check_choice("MoSConfig.backend", self.backend, BACKENDS)


@dataclass
class MoEConfig:
    """The sample-level MoE baselines (gshard, dselect_k, expert_choice) around the same encoder.

    Their experts are instances of `MoSConfig.encoder` with `MoSConfig.dim` and `num_heads`, each
    over the whole sequence, so they differ from the backbone only in gating."""

    num_experts: int = 4             # E; dselect_k needs a power of two
    top_k: int = 2                   # gshard: experts per example; dselect_k: selectors; expert_choice: k in C
    capacity_factor: float = 1.0     # expert_choice: each expert takes C = capacity_factor * B * top_k / E examples
    load_balance_weight: float = 0.01  # gshard's auxiliary balance loss
    smooth_step_gamma: float = 1.0   # dselect_k: width of the smooth step
    entropy_weight: float = 1e-3     # dselect_k: pushes each selector towards one expert

    def __post_init__(self):
        check_int_fields(self, "model.moe")
        check_positive("model.moe.num_experts", self.num_experts)
        check_positive("model.moe.top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        check_positive("model.moe.capacity_factor", self.capacity_factor)
        check_positive("model.moe.smooth_step_gamma", self.smooth_step_gamma)
        for name in ("load_balance_weight", "entropy_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"model.moe.{name}: expected a number >= 0, got {getattr(self, name)!r}")


MODEL_KINDS = ("mos", "backbone", "gshard", "dselect_k", "expert_choice", "stacked_backbone")
# Kinds built as the backbone plus a correction: MoS (its global expert is the backbone), the
# sample-level MoE baselines and the stacking control (a second plain encoder as the correction).
STACKED_KINDS = ("mos", "gshard", "dselect_k", "expert_choice", "stacked_backbone")
TRAININGS = ("boosted", "joint")
RECENCIES = ("sessions", "none")


@refuse_moved("model")
@dataclass
class ModelConfig:
    """The CTR model around the sequence encoder: embeddings, encoder, MLP head.

    Every kind but "backbone" is the backbone encoder plus a correction: MoS's other experts,
    a sample-level MoE over copies of the encoder (gshard, dselect_k, expert_choice: the backbone
    is their shared expert) or a second plain encoder ("stacked_backbone", the control that shows
    what stacking alone gives). Each correction enters as a zero-initialised term added to the
    backbone's user vector, so every kind starts as the backbone."""

    kind: str = "mos"                # one of MODEL_KINDS; "backbone" = one encoder over the whole sequence
    mos: MoSConfig = field(default_factory=MoSConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    use_category: bool = True        # add a category embedding to every item embedding
    # Width of the free item-ID embedding, projected to `mos.dim` and added to the category's;
    # None: `mos.dim`, no projection. A narrow ID leaves less to memorise per item.
    item_id_dim: Optional[int] = None
    # Order information every encoder gets: "sessions" adds to each history event an embedding of
    # how many sessions ago it happened (0 = the newest session; 1, 2, 3, 4-7, 8-15, ... in log2
    # buckets), sessions cut as `mos.session_mode` cuts them; "none" leaves the events unordered.
    recency: str = "sessions"
    mlp_hidden: tuple = (64, 32)     # hidden widths of the MLP head on [t ; u ; t*u]
    # How a stacked kind is trained. "boosted" (`mos.boosting`): the backbone part (embeddings,
    # backbone encoder, head) is trained by the backbone's own loss, so it follows the backbone
    # model step for step; the correction fits on top of it, reading the embeddings detached, by
    # a second loss through the frozen head; early stopping watches the backbone candidate, and
    # the correction is served only if its validation gain exceeds its standard error. Needs the
    # residual fusion and a global expert for MoS. "joint": one loss trains every part together.
    training: str = "boosted"

    def __post_init__(self):
        self.mlp_hidden = tuple(self.mlp_hidden)
        check_int_fields(self, "model", ("mlp_hidden",))
        check_choice("model.kind", self.kind, MODEL_KINDS)
        check_choice("model.training", self.training, TRAININGS)
        check_choice("model.recency", self.recency, RECENCIES)
        if self.item_id_dim is not None:
            check_positive("model.item_id_dim", self.item_id_dim)
        if self.kind == "mos" and self.training == "boosted" and (
                self.mos.fusion != "residual" or "global" not in self.mos.ablation.experts
                or len(self.mos.ablation.experts) < 2):
            raise ValueError(f"model.training: expected 'joint' when the MoS layer has no residual fusion over a "
                             f"global expert and another (fusion={self.mos.fusion!r}, ablation.experts="
                             f"{list(self.mos.ablation.experts)}), got 'boosted'")
        self.mlp_hidden = tuple(self.mlp_hidden)
        for width in self.mlp_hidden:
            check_positive("model.mlp_hidden[]", width)

    @property
    def stacked(self) -> bool:
        return self.kind in STACKED_KINDS

    @property
    def boosted(self) -> bool:
        return self.stacked and self.training == "boosted"


@dataclass
class TrainConfig:
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_epochs: int = 10
    patience: int = 2                # epochs without a better validation AUC before stopping
    seeds: tuple = (0,)              # one run per model per seed
    device: str = "cpu"
    threads: int = 0                 # torch.set_num_threads; 0 keeps torch's default
    progress: str = "auto"           # "auto" (a bar on a terminal, quiet otherwise) | "bar" | "none"
    quiet: bool = False              # no per-epoch log lines on stderr (statistics and tables still print)
    out_dir: str = "runs"            # one JSON line per run is appended to out_dir/results.jsonl
    # Checkpoints: out_dir/checkpoints/<model>-seed<seed>.pt after every epoch (and every
    # checkpoint_every steps when > 0); `resume` continues each run from its checkpoint.
    checkpoint_every: int = 0
    resume: bool = False

    def __post_init__(self):
        self.seeds = tuple(self.seeds)
        check_int_fields(self, "train")
        check_positive("train.batch_size", self.batch_size)
        check_positive("train.lr", self.lr)
        check_positive("train.max_epochs", self.max_epochs)
        check_positive("train.patience", self.patience)
        for name in ("weight_decay", "threads", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"train.{name}: expected a number >= 0, got {value!r}")
        self.seeds = tuple(self.seeds)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"train.seeds: expected a non-empty list of ints, got {list(self.seeds)}")
        check_choice("train.progress", self.progress, ("auto", "bar", "none"))


# The option keys a profile may set per model: what a model is and how it trains, never the
# data, the seeds or where and how loudly a run writes.
PER_MODEL_PREFIXES = ("model.", "train.")
PER_MODEL_FIXED = ("model.kind", "train.seeds", "train.out_dir", "train.device", "train.threads", "train.progress",
                   "train.quiet", "train.resume", "train.checkpoint_every")


@dataclass
class ProfileConfig:
    """`python -m mos profile`: what is measured besides the training runs, each model's own
    options and the validation grid they are chosen from."""

    setting: str = "synthetic data"          # the data setting's name, the title of profile.md
    flop_batch_size: int = 256               # test examples the FLOPs per example are counted on
    lengths: tuple = (100, 250, 500, 1000, 2000)   # L of the FLOPs-versus-length plot
    length_examples: int = 8                 # examples per length in that plot
    heatmap_users: int = 4                   # users in the session-similarity heatmap
    # Model name -> {dotted key: value} for that model's runs (the options chosen on validation
    # by an earlier study, say), e.g. {gshard: {model.moe.num_experts: 8}}.
    per_model: dict = field(default_factory=dict)
    # Model name -> a list of option sets ({dotted key: value}) tried on `tuning_seeds`; the set
    # with the best mean validation AUC is used for that model's runs on `train.seeds`.
    grid: dict = field(default_factory=dict)
    tuning_seeds: tuple = ()

    def __post_init__(self):
        self.lengths = tuple(self.lengths)
        check_int_fields(self, "profile", ("lengths",))
        check_positive("profile.flop_batch_size", self.flop_batch_size)
        for length in self.lengths:
            check_positive("profile.lengths[]", length)
        check_positive("profile.length_examples", self.length_examples)
        check_positive("profile.heatmap_users", self.heatmap_users)
        self.tuning_seeds = tuple(self.tuning_seeds)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.tuning_seeds):
            raise ValueError(f"profile.tuning_seeds: expected a list of ints, got {list(self.tuning_seeds)}")
        if self.grid and not self.tuning_seeds:
            raise ValueError("profile.tuning_seeds: expected at least one seed to try profile.grid's options on, got none")
        for section in ("per_model", "grid"):
            value = getattr(self, section)
            if not isinstance(value, dict):
                raise TypeError(f"profile.{section}: expected a mapping of model names, got {type(value).__name__}")
            for name, options in value.items():
                check_choice(f"profile.{section} key", name, tuple(VARIANTS))
                sets = options if section == "grid" else [options]
                if section == "grid" and (not isinstance(options, list) or not options):
                    raise TypeError(f"profile.grid.{name}: expected a non-empty list of option sets, got {options!r}")
                for index, option_set in enumerate(sets):
                    where = f"profile.{section}.{name}" + (f"[{index}]" if section == "grid" else "")
                    _check_option_set(where, option_set)


def _check_option_set(where: str, options) -> None:
    if not isinstance(options, dict):
        raise TypeError(f"{where}: expected a mapping of dotted keys to values, got {type(options).__name__}")
    for key in options:
        if not isinstance(key, str) or not key.startswith(PER_MODEL_PREFIXES) or key in PER_MODEL_FIXED:
            raise ValueError(f"{where}: expected keys under {list(PER_MODEL_PREFIXES)} other than "
                             f"{list(PER_MODEL_FIXED)}, got {key!r}")


@dataclass
class RunConfig:
    """Top level of a YAML config: `models` lists the model kinds trained side by side."""

    models: tuple = ("backbone", "mos")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self):
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError("models: expected at least one model kind, got an empty list")
        for name in self.models:
            check_choice("models[]", name, tuple(VARIANTS))
