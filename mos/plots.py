"""The profiling figures (PNG, matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def _is_mos(name: str) -> bool:
    return name == "mos" or name.startswith("mos_")


def auc_versus_flops(rows: Sequence[dict], path: Path) -> Path:
    """rows: model, gflops (forward per example), auc_mean, auc_std. Log x; MoS highlighted."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        main = row["model"] == "mos"
        color = "tab:red" if main else ("tab:orange" if _is_mos(row["model"]) else "tab:blue")
        ax.errorbar(row["gflops"], row["auc_mean"], yerr=row["auc_std"], fmt="*" if main else "o",
                    markersize=14 if main else 7, color=color, capsize=3)
        ax.annotate(row["model"], (row["gflops"], row["auc_mean"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8, fontweight="bold" if main else "normal")
    ax.set_xscale("log")
    ax.set_xlabel("forward GFLOPs per example (log)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("AUC versus FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def flops_versus_length(lengths: Sequence[int], flops: Dict[str, List[float]], path: Path) -> Path:
    """flops: model -> forward GFLOPs per example at each length."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, values in flops.items():
        ax.plot(lengths, values, marker="o", linewidth=2.5 if model == "mos" else 1.2,
                color="tab:red" if model == "mos" else None, label=model)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("forward GFLOPs per example")
    ax.set_title("How cost grows with the sequence")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def session_similarity(matrices: Sequence[np.ndarray], labels: Sequence[Sequence[int]], path: Path) -> Path:
    """One heatmap per user: cosine similarity between the category histograms of its sessions;
    ticks show each session's true interest (the session-hopping picture)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.4), squeeze=False)
    for ax, matrix, label in zip(axes[0], matrices, labels):
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ticks = range(len(label))
        ax.set_xticks(ticks, [str(x) for x in label], fontsize=6)
        ax.set_yticks(ticks, [str(x) for x in label], fontsize=6)
        ax.set_xlabel("session (true interest)", fontsize=7)
    axes[0][0].set_ylabel("session (true interest)", fontsize=7)
    fig.suptitle("similarity between a user's sessions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
