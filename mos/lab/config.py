"""Configuration of the CTR lab: the model around the encoder, the MoE baselines, training, the
profile and the whole run (the layer's options are `mos.config.MoSConfig`, the data's
`mos.lab.data.config.DataConfig`).

Defaults live here; a YAML file overrides them and `--set key=value` overrides the file
(`load_run_config`). Values are checked in `__post_init__` so a bad option fails at once with
the field's name, what was expected and what came.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mos_kernels.checks import check_choice, check_positive

from mos.config import EXPERT_KINDS, MoSConfig, check_field_types, config_section
from mos.routing import LearnedRouter, RandomRouter, route_sessions, route_tokens
from mos.lab.data.config import DataConfig
from mos.lab.moved_options import refuse_moved
from mos.lab.variants import VARIANTS


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
        check_field_types(self, "model.moe")
        check_positive("model.moe.num_experts", self.num_experts)
        check_positive("model.moe.top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k: expected at most num_experts={self.num_experts}, got {self.top_k}")
        check_positive("model.moe.capacity_factor", self.capacity_factor)
        check_positive("model.moe.smooth_step_gamma", self.smooth_step_gamma)
        for name in ("load_balance_weight", "entropy_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"model.moe.{name}: expected a number >= 0, got {getattr(self, name)!r}")


@dataclass
class MoSAblation:
    """The parts of the MoS layer an ablation swaps (`model.ablation.*`; the variants of
    `mos.lab.variants` set them): the defaults are the layer, every other value removes or
    weakens one of its parts. `layer_parts` turns them into the keywords `MoSLayer` takes.

    Attributes:
        router: "learned" prototypes, or "random" themes.
        routing_unit: route whole "session"s, or every "token" alone.
        experts: which expert kinds run, a list of "global", "short", "themes".
        vq_detach_tokens: the learned router's VQ and load-balance losses see the session
            vectors detached, so they train the prototypes and never the item embeddings (True).
        session_consistency: the learned router also trains on its session-consistency loss
            (`mos.routing.session_consistency_loss`), an addition rather than an ablation (False).
    """

    router: str = "learned"
    routing_unit: str = "session"
    experts: tuple = EXPERT_KINDS
    vq_detach_tokens: bool = True
    session_consistency: bool = False

    def __post_init__(self):
        check_choice("model.ablation.router", self.router, ("learned", "random"))
        check_choice("model.ablation.routing_unit", self.routing_unit, ("session", "token"))
        self.experts = tuple(self.experts)
        for kind in self.experts:
            check_choice("model.ablation.experts[]", kind, EXPERT_KINDS)
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"model.ablation.experts: expected a non-empty list of distinct kinds from "
                             f"{list(EXPERT_KINDS)}, got {list(self.experts)}")
        if self.session_consistency and self.router != "learned":
            raise ValueError(f"model.ablation.session_consistency: expected False with router {self.router!r} "
                             f"(only the learned router has the loss), got True")
        if self.session_consistency and self.routing_unit != "session":
            raise ValueError(f"model.ablation.session_consistency: expected False with routing_unit "
                             f"{self.routing_unit!r} (a unit of one token has no session-mates), got True")

    def check_with(self, mos) -> None:
        """The options of this section that depend on the layer's (`model.mos`)."""
        if mos.theme_recency and self.routing_unit != "session":
            raise ValueError(f"model.mos.theme_recency: expected False with routing_unit {self.routing_unit!r} "
                             f"(it ranks sessions on a theme; a unit of one token would rank tokens), got True")

    def layer_parts(self) -> dict:
        """The keywords of `MoSLayer` (router, routing_unit, experts) these options stand for."""
        if "themes" not in self.experts:
            return dict(experts=self.experts)     # nothing routes: the layer takes no router
        router = (LearnedRouter(vq_detach_tokens=self.vq_detach_tokens, session_consistency=self.session_consistency)
                  if self.router == "learned" else RandomRouter())
        routing_unit = route_sessions if self.routing_unit == "session" else route_tokens
        return dict(router=router, routing_unit=routing_unit, experts=self.experts)


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
    ablation: MoSAblation = field(default_factory=MoSAblation)   # kind "mos" only
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
    # Kind "mos": the router and the theme summary's query read an item-ID embedding of their own
    # (width mos.dim; `MoSLayer`'s routing_values/routing_target), trained by the router's losses
    # and the task loss through the gate, never by the backbone's loss: where categories do not
    # name the themes, the router can learn them without changing what the backbone reads.
    routing_embedding: bool = False
    # How a stacked kind is trained. "boosted" (`mos.boosting`): the backbone part (embeddings,
    # backbone encoder, head) is trained by the backbone's own loss, so it follows the backbone
    # model step for step; the correction fits on top of it, reading the embeddings detached, by
    # a second loss through the frozen head; early stopping watches the backbone candidate, and
    # the correction is served only if its validation gain exceeds its standard error. Needs the
    # residual fusion and a global expert for MoS. "joint": one loss trains every part together.
    training: str = "boosted"

    def __post_init__(self):
        self.ablation = config_section("model.ablation", self.ablation, MoSAblation)
        self.mos = config_section("model.mos", self.mos, MoSConfig)
        self.mlp_hidden = tuple(self.mlp_hidden)
        check_field_types(self, "model", ("mlp_hidden",))
        check_choice("model.kind", self.kind, MODEL_KINDS)
        check_choice("model.training", self.training, TRAININGS)
        check_choice("model.recency", self.recency, RECENCIES)
        if self.item_id_dim is not None:
            check_positive("model.item_id_dim", self.item_id_dim)
        if self.kind == "mos" and self.training == "boosted" and (
                self.mos.fusion != "residual" or "global" not in self.ablation.experts
                or len(self.ablation.experts) < 2):
            raise ValueError(f"model.training: expected 'joint' when the MoS layer has no residual fusion over a "
                             f"global expert and another (mos.fusion={self.mos.fusion!r}, ablation.experts="
                             f"{list(self.ablation.experts)}), got 'boosted'")
        if self.routing_embedding and (self.kind != "mos" or "themes" not in self.ablation.experts):
            raise ValueError(f"model.routing_embedding: expected False without theme experts to route (kind="
                             f"{self.kind!r}, ablation.experts={list(self.ablation.experts)}), got True")
        if self.kind == "mos":
            self.ablation.check_with(self.mos)
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
        check_field_types(self, "train")
        check_positive("train.batch_size", self.batch_size)
        check_positive("train.lr", self.lr)
        if not self.lr < float("inf"):
            raise ValueError(f"train.lr: expected a finite learning rate, got {self.lr!r}")
        check_positive("train.max_epochs", self.max_epochs)
        check_positive("train.patience", self.patience)
        for name in ("weight_decay", "threads", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"train.{name}: expected a number >= 0, got {value!r}")
        self.seeds = tuple(self.seeds)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"train.seeds: expected a non-empty list of ints, got {list(self.seeds)}")
        if not all(0 <= s < 2 ** 32 for s in self.seeds):      # numpy's and torch's generators take these
            raise ValueError(f"train.seeds: expected ints in [0, 2^32), got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            # A repeated seed is one run counted twice: the paired statistics would think it two.
            raise ValueError(f"train.seeds: expected distinct seeds, got {list(self.seeds)}")
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
    # The MoS models the verdict holds to the targets: each against its backbone, the stacking
    # control, each MoE baseline and its matched random-routing control
    # (`mos.lab.variants.random_routing_control`), and its forward FLOPs against each MoE's.
    headline: tuple = ("mos",)

    def __post_init__(self):
        self.lengths = tuple(self.lengths)
        check_field_types(self, "profile", ("lengths",))
        check_positive("profile.flop_batch_size", self.flop_batch_size)
        for length in self.lengths:
            check_positive("profile.lengths[]", length)
        check_positive("profile.length_examples", self.length_examples)
        check_positive("profile.heatmap_users", self.heatmap_users)
        self.tuning_seeds = tuple(self.tuning_seeds)
        self.headline = (self.headline,) if isinstance(self.headline, str) else tuple(self.headline)
        mos_variants = tuple(name for name, overrides in VARIANTS.items() if overrides.get("kind") == "mos")
        for name in self.headline:
            check_choice("profile.headline[]", name, mos_variants)
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
