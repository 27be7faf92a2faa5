"""Evaluation of a trained CTR model on one split: its per-example predictions, and from them
AUC, GAUC, LogLoss and, with a router, its theme loads and its purity and NMI against the true
interests (when the data knows them).

Under torchrun each rank predicts its share of the batches and the metrics are computed from all
of them, so they equal those of one process. A metric that a split cannot define (AUC of one
class, GAUC without a user of both classes) is None, never an error: a small split may be so.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from mos.lab import distributed, metrics
from mos.lab.files import write_atomic


@dataclass
class SplitPredictions:
    """Every example of a split, in the split's order."""

    labels: torch.Tensor                               # [N] float32 in {0, 1}
    users: torch.Tensor                                # [N] int64
    logits: torch.Tensor                               # [N] float32, the served prediction
    candidates: Optional[Dict[str, torch.Tensor]] = None   # boosted kinds: "backbone", "corrected" [N]
    # With a router: per session, its top-1 theme, its token count and (synthetic data) its true interest.
    session_theme: List[torch.Tensor] = field(default_factory=list)
    session_tokens: List[torch.Tensor] = field(default_factory=list)
    session_truth: List[torch.Tensor] = field(default_factory=list)

    def served(self, correction: bool) -> "SplitPredictions":
        """The same predictions with the given candidate of a boosted model served."""
        return replace(self, logits=self.candidates["corrected" if correction else "backbone"])

    def arrays(self, prefix: str) -> Dict[str, np.ndarray]:
        """Compact numpy arrays named `<prefix>_<field>`, for `save_predictions`."""
        out = {f"{prefix}_labels": self.labels.numpy().astype(np.int8), f"{prefix}_users": self.users.numpy(),
               f"{prefix}_logits": self.logits.numpy().astype(np.float32)}
        for name, values in (self.candidates or {}).items():
            out[f"{prefix}_{name}"] = values.numpy().astype(np.float32)
        return out


def evaluate(model, dataset, *, batch_size: int, device, num_themes: int, max_history: Optional[int] = None,
             group: Optional[distributed.Group] = None) -> dict:
    """The metrics of `model` on `dataset` (`split_metrics` of `predict_split`)."""
    return split_metrics(predict_split(model, dataset, batch_size=batch_size, device=device, max_history=max_history,
                                       group=group), num_themes, model)


def split_metrics(pred: SplitPredictions, num_themes: int, model=None) -> dict:
    """AUC, GAUC, LogLoss of the served prediction; each candidate's AUC for a boosted model;
    the tokens each theme got and (when the data knows each event's true interest) the router's
    purity and NMI."""
    labels, logits = pred.labels, pred.logits
    # One class (possible in a small test split; training checks its own splits first): no ranking.
    both_classes = 0 < int(labels.sum()) < labels.numel()
    candidate_auc = None
    if pred.candidates is not None and both_classes:
        candidate_auc = {name: float(metrics.auc(labels, c)) for name, c in pred.candidates.items()}
    gauc, users_used, users_skipped = metrics.gauc(labels, logits, pred.users)
    theme_tokens = torch.zeros(num_themes, dtype=torch.int64)
    for theme, tokens in zip(pred.session_theme, pred.session_tokens):
        theme_tokens.index_add_(0, theme, tokens)
    serving = getattr(model, "serve_correction", None)
    result = {
        "examples": int(labels.numel()),
        "auc": float(metrics.auc(labels, logits)) if both_classes else None,
        "gauc": gauc,
        "gauc_users": int(users_used),
        "gauc_users_skipped": int(users_skipped),
        "logloss": float(metrics.logloss(labels, logits)),
        "purity": None,
        "purity_cap": None,
        "routing_table": None,
        "nmi": None,
        "theme_tokens": theme_tokens.tolist() if pred.session_theme else None,
        "candidate_auc": candidate_auc,
        "serves_correction": None if serving is None else bool(serving),
    }
    if pred.session_truth:
        # Sessions made only of noise events (truth -1) are left out by the metrics themselves.
        assigned = torch.cat(pred.session_theme)
        majority = torch.cat(pred.session_truth)
        result["purity"] = float(metrics.routing_purity(assigned, majority))
        result["purity_cap"] = metrics.purity_cap(majority, num_themes)
        result["routing_table"] = metrics.routing_table(assigned, majority, num_themes).tolist()
        result["nmi"] = float(metrics.routing_nmi(assigned, majority))
    return result


def predict_split(model, dataset, *, batch_size: int, device, max_history: Optional[int] = None,
                  group: Optional[distributed.Group] = None) -> SplitPredictions:
    """Every example's prediction (and routing) of `model` on `dataset`, in the dataset's order."""
    outputs = predictions(model, dataset, batch_size=batch_size, device=device, max_history=max_history, group=group)
    if not outputs:
        empty = torch.zeros(0)
        return SplitPredictions(empty, torch.zeros(0, dtype=torch.int64), empty)
    cat = {name: torch.cat([out[name] for out in outputs]) for name in ("labels", "users", "logits")}
    candidates = None
    if "candidates" in outputs[0]:
        candidates = {name: torch.cat([out["candidates"][name] for out in outputs])
                      for name in outputs[0]["candidates"]}
    routed = [out for out in outputs if "session_theme" in out]
    return SplitPredictions(cat["labels"], cat["users"], cat["logits"], candidates,
                            [out["session_theme"] for out in routed], [out["session_tokens"] for out in routed],
                            [out["session_truth"] for out in routed if "session_truth" in out])


def save_predictions(path: Path, **splits: SplitPredictions) -> None:
    """The splits' per-example labels, users and predictions (each candidate's too) in one
    compressed .npz, written under a unique temporary name and renamed into place."""
    arrays = {}
    for prefix, pred in splits.items():
        arrays.update(pred.arrays(prefix))
    write_atomic(path, lambda stream: np.savez_compressed(stream, **arrays), binary=True)


@torch.no_grad()
def predictions(model, dataset, *, batch_size: int, device, max_history: Optional[int] = None,
                group: Optional[distributed.Group] = None) -> list[dict]:
    """What `_predict` returns for every batch of `dataset` (in order), from the shares of all ranks."""
    model.eval()
    group = group or distributed.single(device)
    num_batches = dataset.num_batches(batch_size)
    mine = distributed.rank_batches(dataset.batches(batch_size, max_history=max_history), num_batches, group,
                                    wrap_around=False)
    per_rank = distributed.gather(group, [_predict(model, batch.to(device)) for batch in mine])
    return [per_rank[index % group.world_size][index // group.world_size] for index in range(num_batches)]


def _predict(model, batch) -> dict:
    """What `evaluate` needs of one batch, on the CPU (small: a few numbers per example or session)."""
    out = model(batch)
    result = {"logits": out.logits.float().cpu(), "labels": batch.label.float().cpu(), "users": batch.user.cpu()}
    if out.candidates is not None:
        candidates = out.candidates._asdict() if hasattr(out.candidates, "_asdict") else out.candidates
        result["candidates"] = {name: c.float().cpu() for name, c in candidates.items()}
    routing = out.routing
    if routing is not None:
        result["session_theme"] = routing.session_theme.cpu()
        result["session_tokens"] = routing.session_offsets.diff().cpu()
        if batch.true_interest is not None:
            result["session_truth"] = metrics.session_majority(batch.true_interest, routing.session_offsets).cpu()
    return result
