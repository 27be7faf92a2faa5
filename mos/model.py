"""`CTRModel`: embeddings, a sequence encoder (MoS or a plain backbone) and an MLP head (spec step 7)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from .baselines import DSelectK, ExpertChoice, GShard, SampleMoE
from .config import ModelConfig
from .data.batch import Batch
from .encoders import make_encoder
from .layer import MoSLayer, RoutingInfo


SAMPLE_MOE = {"gshard": GShard, "dselect_k": DSelectK, "expert_choice": ExpertChoice}


@dataclass
class CTROutput:
    logits: torch.Tensor                       # [B]
    aux_loss: torch.Tensor                     # scalar, already weighted (0 for the backbone)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)
    routing: Optional[RoutingInfo] = None


class CTRModel(nn.Module):
    """logit = MLP([t ; u ; t*u]) where t is the target embedding and u the encoded history."""

    def __init__(self, config: ModelConfig, num_items: int, num_categories: int):
        super().__init__()
        self.config = config
        mos_cfg = config.mos
        dim = mos_cfg.dim
        self.item_embedding = nn.Embedding(num_items, dim, padding_idx=0)
        self.category_embedding = nn.Embedding(num_categories, dim, padding_idx=0) if config.use_category else None
        for table in filter(None, (self.item_embedding, self.category_embedding)):
            nn.init.normal_(table.weight, std=0.1)
        layers, width = [], 3 * dim
        for hidden in config.mlp_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, 1))
        # The encoder is built last and MoS builds its global expert first, so a MoS model and a
        # backbone model built from the same seed start with the same embeddings, head and
        # backbone encoder; with the residual fusion they start as the same function.
        if config.kind == "mos":
            self.encoder = MoSLayer(mos_cfg)
        elif config.kind == "backbone":
            self.encoder = make_encoder(mos_cfg.encoder, dim, mos_cfg.num_heads, 1, num_layers=mos_cfg.num_layers,
                                        readout=mos_cfg.readout, dropout=mos_cfg.dropout, backend=mos_cfg.backend)
        else:
            self.encoder = SAMPLE_MOE[config.kind](config)

    def embed(self, items: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
        out = self.item_embedding(items)
        if self.category_embedding is not None:
            out = out + self.category_embedding(categories)
        return out

    def forward(self, batch: Batch) -> CTROutput:
        tokens = self.embed(batch.item_ids, batch.category_ids)
        target = self.embed(batch.target_item, batch.target_category)
        routing = None
        if isinstance(self.encoder, MoSLayer):
            out = self.encoder(tokens, target, batch.offsets, timestamps=batch.timestamps, max_len=batch.max_len)
            user, aux_loss, aux, routing = out.output, out.aux_loss, out.aux, out.routing
        elif isinstance(self.encoder, SampleMoE):
            out = self.encoder(tokens, target, batch.offsets, max_len=batch.max_len)
            user, aux_loss, aux = out.output, out.aux_loss, out.aux
        else:
            user = self.encoder(tokens, target, batch.offsets, max_len=batch.max_len)[0]
            aux_loss, aux = tokens.new_zeros(()), {}
        logits = self.head(torch.cat([target, user, target * user], dim=1)).squeeze(1)
        return CTROutput(logits, aux_loss, aux, routing)
