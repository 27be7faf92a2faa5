"""`CTRModel`: embeddings, a sequence encoder (the backbone, or the backbone plus a correction)
and an MLP head.

Every kind reads the same inputs: each history event is item ID (of width `item_id_dim`) +
category + recency (sessions ago), the target is item ID + category. A stacked kind (MoS, the
MoE baselines, the stacking control) is the backbone encoder plus a zero-initialised correction;
under boosted training (`mos.boosting`) it has two candidate predictions and serves the one
chosen at the end of training.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import mos_kernels as mk
from mos_kernels.checks import check_finite, check_offsets, reads_data
from mos_kernels.jagged import max_segment_length, segment_ids

from mos import boosting
from mos.layer import MoSLayer, RoutingInfo

from .baselines.stacked import StackedEncoder, backbone_encoder
from .config import ModelConfig
from .data.batch import Batch

# Sessions-ago buckets: 0, 1, 2-3, 4-7, ..., the last one open-ended (64 and more).
RECENCY_BUCKETS = 8


def training_loss(out: "CTROutput", label: torch.Tensor) -> torch.Tensor:
    """The loss a model is trained on: BCE of its prediction, or of each candidate of a boosted
    model (`mos.boosting.boosted_loss`), plus the weighted auxiliary losses."""
    if out.candidates is not None:
        return boosting.boosted_loss(out.candidates, label, out.aux_loss)
    return F.binary_cross_entropy_with_logits(out.logits, label) + out.aux_loss


@dataclass
class CTROutput:
    logits: torch.Tensor                       # [B] the prediction the model serves
    aux_loss: torch.Tensor                     # scalar, already weighted (0 for the backbone)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)
    routing: Optional[RoutingInfo] = None
    # Boosted stacked kinds: [B] logits of both candidates, each trained by its own BCE.
    candidates: Optional[boosting.Candidates] = None


class CTRHead(nn.Module):
    """logit = MLP([t ; u ; t*u]): target t [B, d], user u [B, d] -> [B]."""

    def __init__(self, dim: int, hidden: tuple):
        super().__init__()
        layers, width = [], 3 * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, target: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([target, user, target * user], dim=1)).squeeze(1)


class CTRModel(nn.Module):
    """The CTR model of `config.kind` over `num_items` item and `num_categories` category ids."""

    def __init__(self, config: ModelConfig, num_items: int, num_categories: int):
        super().__init__()
        self.config = config
        mos_cfg = config.mos
        dim = mos_cfg.dim
        id_dim = config.item_id_dim or dim
        self.item_embedding = nn.Embedding(num_items, id_dim, padding_idx=0)
        self.item_projection = nn.Linear(id_dim, dim, bias=False) if id_dim != dim else None
        self.category_embedding = nn.Embedding(num_categories, dim, padding_idx=0) if config.use_category else None
        self.recency_embedding = nn.Embedding(RECENCY_BUCKETS, dim) if config.recency == "sessions" else None
        for table in filter(None, (self.item_embedding, self.category_embedding, self.recency_embedding)):
            nn.init.normal_(table.weight, std=0.1)
        self.head = CTRHead(dim, config.mlp_hidden)
        # The encoder is built last and every stacked kind builds its backbone encoder first, so
        # models of every kind built from one seed start with the same embeddings, head and
        # backbone encoder, and (with the zero-initialised correction) as the same function.
        if config.kind == "mos":
            # Boosted: the other experts read the embeddings detached (only the backbone's loss shapes them).
            detached = replace(mos_cfg, extras_detach_inputs=True)
            self.encoder = MoSLayer(detached if config.boosted else mos_cfg, **config.ablation.layer_parts())
        elif config.kind == "backbone":
            self.encoder = backbone_encoder(config)
        else:
            self.encoder = StackedEncoder(config)
        # Built after the encoder, so every other parameter starts as in the model without it (its
        # draws come after theirs; training draws nothing from torch's generator with dropout 0).
        self.routing_embedding = nn.Embedding(num_items, dim, padding_idx=0) if config.routing_embedding else None
        if self.routing_embedding is not None:
            nn.init.normal_(self.routing_embedding.weight, std=0.1)
        if config.boosted:
            # Which candidate the model serves, set once at the end of training; saved with the weights.
            self.register_buffer("serve_correction", torch.tensor(False))

    def embed(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        out = self.item_embedding(items)
        if self.item_projection is not None:
            out = self.item_projection(out)
        if self.category_embedding is not None:
            out = out + self.category_embedding(categories)
        return out

    def embed_history(self, batch: Batch) -> torch.Tensor:
        """[T, d]: every history event's item and category embeddings, plus its recency's."""
        tokens = self.embed(batch.item_ids, batch.category_ids)
        if self.recency_embedding is not None:
            tokens = tokens + self.recency_embedding(self.recency_bucket(batch))
        return tokens

    def recency_bucket(self, batch: Batch) -> torch.Tensor:
        """[T] int64: 0 for the newest session's events, then 1 + floor(log2(sessions ago)),
        capped at RECENCY_BUCKETS - 1. Sessions are cut as the MoS layer cuts them."""
        cfg = self.config.mos
        num_tokens = batch.item_ids.numel()
        sessions = mk.sessionize(batch.offsets, mode=cfg.session_mode, session_len=cfg.session_len,
                                 timestamps=batch.timestamps, gap_seconds=cfg.gap_seconds,
                                 max_session_len=cfg.max_session_len, num_tokens=num_tokens)
        session = segment_ids(sessions.session_offsets, num_tokens, check=False)
        last = sessions.example_session_offsets[1:][sessions.session_example] - 1      # [S]
        ago = (last[session] - session).clamp_min(0) if num_tokens else session
        bucket = torch.where(ago > 0, torch.floor(torch.log2(ago.clamp_min(1).double())).long() + 1, 0)
        return bucket.clamp_max(RECENCY_BUCKETS - 1)

    def forward(self, batch: Batch) -> CTROutput:
        tokens = self.embed_history(batch)
        target = self.embed(batch.target_item, batch.target_category)
        # The model's own values and the batch's layout are checked once here; each op of an
        # encoder would scan its inputs again (21 passes over [T, d..3d] rows per transformer step: 7 % of its CPU time),
        # and the trainer checks the loss and every gradient anyway.
        check_finite("tokens", tokens)
        check_finite("target", target)
        check_offsets("batch.offsets", batch.offsets, total=tokens.shape[0], device=tokens.device)
        if reads_data() and batch.max_len < max_segment_length(batch.offsets):
            # Off the CPU attention pads to max_len: a smaller bound would cut histories silently.
            raise ValueError(f"batch.max_len: expected at least the longest history "
                             f"({max_segment_length(batch.offsets)}), got {batch.max_len}")
        with mk.data_checks(False):
            return self._encode(batch, tokens, target)

    def _encode(self, batch: Batch, tokens: torch.Tensor, target: torch.Tensor) -> CTROutput:
        if self.config.kind == "backbone":
            user = self.encoder(tokens, target, batch.offsets, max_len=batch.max_len)[0]
            return CTROutput(self.head(target, user), tokens.new_zeros(()))
        if isinstance(self.encoder, MoSLayer):
            routing = {}
            if self.routing_embedding is not None:
                routing = dict(routing_values=self.routing_embedding(batch.item_ids),
                               routing_target=self.routing_embedding(batch.target_item))
            out = self.encoder(tokens, target, batch.offsets, timestamps=batch.timestamps, max_len=batch.max_len,
                               **routing)
        else:
            out = self.encoder(tokens, target, batch.offsets, max_len=batch.max_len)
        if not self.config.boosted:
            return CTROutput(self.head(target, out.output), out.aux_loss, out.aux, out.routing)
        cands = boosting.candidates(self.head, target, out.global_output, out.extras_output)
        served = torch.where(self.serve_correction, cands.corrected, cands.backbone)
        return CTROutput(served, out.aux_loss, out.aux, out.routing, cands)

    def serve(self, correction: bool) -> None:
        """Serve the corrected candidate (True) or the backbone candidate (False) of a boosted model."""
        self.serve_correction.fill_(correction)
