"""Evaluation of a trained CTR model on one split: AUC, GAUC, LogLoss and, with a router, its
theme loads and its purity and NMI against the true interests (when the data knows them).

Under torchrun each rank predicts its share of the batches and the metrics are computed from all
of them, so they equal those of one process. A metric that a split cannot define (AUC of one
class, GAUC without a user of both classes) is None, never an error: a small split may be so.
"""
from __future__ import annotations

from typing import Optional

import torch

from mos import distributed, metrics


def evaluate(model, dataset, *, batch_size: int, device, num_themes: int, max_history: Optional[int] = None,
             group: Optional[distributed.Group] = None, choose: bool = False) -> dict:
    """AUC, GAUC, LogLoss of `model` on `dataset`; with a router, also the tokens each theme got
    and (when the data knows each event's true interest) the router's purity and NMI.

    A boosted MoS model has two candidate predictions: `choose` (on the validation split) sets the
    one it serves to the one with the higher AUC here, and the metrics are those of that one."""
    outputs = predictions(model, dataset, batch_size=batch_size, device=device, max_history=max_history, group=group)
    logits, labels, users = (torch.cat([out[name] for out in outputs]) for name in ("logits", "labels", "users"))
    # One class (possible in a small test split; training checks its own splits first): no ranking.
    both_classes = 0 < int(labels.sum()) < labels.numel()
    candidate_auc = None
    if outputs and "candidates" in outputs[0] and both_classes:
        candidates = {name: torch.cat([out["candidates"][name] for out in outputs]) for name in outputs[0]["candidates"]}
        candidate_auc = {name: float(metrics.auc(labels, c)) for name, c in candidates.items()}
        if choose:
            model.serve(candidate_auc["mos"] >= candidate_auc["backbone"])
            logits = candidates["mos" if bool(model.serve_extras) else "backbone"]
    gauc, users_used, users_skipped = metrics.gauc(labels, logits, users)
    routed = [out for out in outputs if "session_theme" in out]
    theme_tokens = torch.zeros(num_themes, dtype=torch.int64)
    for out in routed:
        theme_tokens.index_add_(0, out["session_theme"], out["session_tokens"])
    result = {
        "examples": int(labels.numel()),
        "auc": float(metrics.auc(labels, logits)) if both_classes else None,
        "gauc": gauc,
        "gauc_users": int(users_used),
        "gauc_users_skipped": int(users_skipped),
        "logloss": float(metrics.logloss(labels, logits)),
        "purity": None,
        "nmi": None,
        "theme_tokens": theme_tokens.tolist() if routed else None,
        "candidate_auc": candidate_auc,
        "serves_extras": bool(model.serve_extras) if hasattr(model, "serve_extras") else None,
    }
    truth = [out for out in routed if "session_truth" in out]
    if truth:
        # Sessions made only of noise events (truth -1) are left out by the metrics themselves.
        assigned = torch.cat([out["session_theme"] for out in truth])
        majority = torch.cat([out["session_truth"] for out in truth])
        result["purity"] = float(metrics.routing_purity(assigned, majority))
        result["nmi"] = float(metrics.routing_nmi(assigned, majority))
    return result


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
        result["candidates"] = {name: c.float().cpu() for name, c in out.candidates.items()}
    routing = out.routing
    if routing is not None:
        result["session_theme"] = routing.session_theme.cpu()
        result["session_tokens"] = routing.session_offsets.diff().cpu()
        if batch.true_interest is not None:
            result["session_truth"] = metrics.session_majority(batch.true_interest, routing.session_offsets).cpu()
    return result
