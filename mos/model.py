"""`CTRModel`: embeddings, a sequence encoder (MoS or a plain backbone) and an MLP head."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import DSelectK, ExpertChoice, GShard, SampleMoE
from .config import ModelConfig
from .data.batch import Batch
from .encoders import make_encoder
from .layer import MoSLayer, RoutingInfo


SAMPLE_MOE = {"gshard": GShard, "dselect_k": DSelectK, "expert_choice": ExpertChoice}


def training_loss(out: "CTROutput", label: torch.Tensor) -> torch.Tensor:
    """The loss a model is trained on: BCE of its prediction, or of each candidate prediction of
    a boosted MoS model (each trains its own part), plus the weighted auxiliary losses."""
    predictions = [out.logits] if out.candidates is None else list(out.candidates.values())
    return sum(F.binary_cross_entropy_with_logits(p, label) for p in predictions) + out.aux_loss


@dataclass
class CTROutput:
    logits: torch.Tensor                       # [B] the prediction the model serves
    aux_loss: torch.Tensor                     # scalar, already weighted (0 for the backbone)
    aux: Dict[str, torch.Tensor] = field(default_factory=dict)
    routing: Optional[RoutingInfo] = None
    # Boosted MoS: [B] logits of both candidate predictions, each trained by its own BCE:
    # "backbone" (the global expert alone) and "mos" (with the other experts' correction).
    candidates: Optional[Dict[str, torch.Tensor]] = None


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
        self.boosted = config.kind == "mos" and config.mos_training == "boosted"
        if config.kind == "mos":
            # Boosted: the other experts read the embeddings detached (only the backbone's loss shapes them).
            detached = replace(mos_cfg, ablation=replace(mos_cfg.ablation, extras_detach_inputs=True))
            self.encoder = MoSLayer(detached if self.boosted else mos_cfg)
        elif config.kind == "backbone":
            self.encoder = make_encoder(mos_cfg.encoder, dim, mos_cfg.num_heads, 1, num_layers=mos_cfg.num_layers,
                                        readout=mos_cfg.readout, dropout=mos_cfg.dropout, backend=mos_cfg.backend)
        else:
            self.encoder = SAMPLE_MOE[config.kind](config)
        if self.boosted:
            # Which candidate the model serves; set from the validation AUC (`serve`), saved with the weights.
            self.register_buffer("serve_extras", torch.tensor(True))

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
            if self.boosted:
                return self._boosted(target, out)
        elif isinstance(self.encoder, SampleMoE):
            out = self.encoder(tokens, target, batch.offsets, max_len=batch.max_len)
            user, aux_loss, aux = out.output, out.aux_loss, out.aux
        else:
            user = self.encoder(tokens, target, batch.offsets, max_len=batch.max_len)[0]
            aux_loss, aux = tokens.new_zeros(()), {}
        return CTROutput(self._head(target, user), aux_loss, aux, routing)

    def _head(self, target: torch.Tensor, user: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The MLP head on [t ; u ; t*u]; `frozen`: with its parameters detached (no gradient to them)."""
        x = torch.cat([target, user, target * user], dim=1)
        if not frozen:
            return self.head(x).squeeze(1)
        for layer in self.head:
            x = F.linear(x, layer.weight.detach(), layer.bias.detach()) if isinstance(layer, nn.Linear) else layer(x)
        return x.squeeze(1)

    def _boosted(self, target: torch.Tensor, out) -> CTROutput:
        """Backbone logits from the global expert (trained by their own BCE, exactly as the
        backbone model); MoS logits add the other experts' term through the same head with its
        parameters, the target and the global vector detached, so that their BCE trains the
        other experts (and the router) alone."""
        backbone = self._head(target, out.global_output)
        mos = self._head(target.detach(), out.global_output.detach() + out.extras_output, frozen=True)
        served = torch.where(self.serve_extras, mos, backbone)
        return CTROutput(served, out.aux_loss, out.aux, out.routing, {"backbone": backbone, "mos": mos})

    def serve(self, extras: bool) -> None:
        """Serve the MoS candidate (True) or the backbone candidate (False) of a boosted model."""
        self.serve_extras.fill_(extras)
