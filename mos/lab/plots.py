"""The profiling figures (PNG, matplotlib's Agg backend: no display needed).

Each figure is built by a `*_figure` function (what the tests inspect) and written by the
function of the plot's name. FLOPs are in the profile's one unit (`mos.lab.report.FLOP_UNIT`). Legends sit outside the axes, so they never cover a point.
"""
from __future__ import annotations

from itertools import cycle
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from mos.lab.report import FLOP_UNIT  # noqa: E402

# Offsets (points) tried in turn for a point's name, nearest first: the first one that covers no
# marker and no other name wins.
_LABEL_OFFSETS = [(7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"),
                  (-7, -5, "right", "top"), (0, 10, "center", "bottom"), (0, -10, "center", "top"),
                  (14, 14, "left", "bottom"), (-14, -14, "right", "top"), (14, -14, "left", "top"),
                  (-14, 14, "right", "bottom"), (0, 22, "center", "bottom"), (0, -22, "center", "top")]
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "8")


def _family(name: str) -> str:
    return "mos" if name == "mos" else ("ablation" if name.startswith("mos_") else "baseline")


_STYLE = {  # family -> how its points and lines look
    "mos": dict(color="tab:red", marker="*", markersize=16, label="MoS"),
    "ablation": dict(color="tab:orange", marker="s", markersize=7, label="MoS ablations"),
    "baseline": dict(color="tab:blue", marker="o", markersize=7, label="backbone and MoE baselines"),
}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def auc_versus_flops_figure(rows: Sequence[dict]):
    """rows: model, mflops (forward per example, in FLOP_UNIT), auc_mean, auc_std. Log x; MoS a red star."""
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    # MoS first: its name gets the first choice of place.
    ordered = sorted(rows, key=lambda row: _family(row["model"]) != "mos")
    points = []
    for row in ordered:
        style = _STYLE[_family(row["model"])]
        x = row["mflops"]
        ax.errorbar(x, row["auc_mean"], yerr=row["auc_std"] or 0.0, fmt=style["marker"], color=style["color"],
                    markersize=style["markersize"], capsize=3, zorder=3 if row["model"] == "mos" else 2)
        points.append((x, row["auc_mean"], style["markersize"]))
    ax.set_xscale("log")
    # Plain numbers (0.3, 0.6, 1) rather than powers of ten: the unit already carries the scale.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.margins(x=0.2, y=0.15)
    ax.set_xlabel(f"forward {FLOP_UNIT} per example (log scale)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("AUC versus FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], linestyle="none", color=s["color"], marker=s["marker"], markersize=s["markersize"] * 0.7,
                      label=s["label"]) for s in _STYLE.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    _place_names(fig, ax, points, [row["model"] for row in ordered])
    return fig


def auc_versus_flops(rows: Sequence[dict], path: Path) -> Path:
    return _save(auc_versus_flops_figure(rows), path)


def marker_boxes(ax, points) -> List[Bbox]:
    """Display-space boxes of markers at (x, y, size in points)."""
    boxes = []
    for x, y, size in points:
        cx, cy = ax.transData.transform((x, y))
        half = size * ax.figure.dpi / 72 / 2
        boxes.append(Bbox.from_extents(cx - half, cy - half, cx + half, cy + half))
    return boxes


def _place_names(fig, ax, points, names) -> None:
    """Annotate each point with its name where it covers no marker and no earlier name."""
    fig.canvas.draw()          # fixes the layout and the axes limits the positions depend on
    renderer = fig.canvas.get_renderer()
    taken = marker_boxes(ax, points)
    inside = ax.get_window_extent(renderer)
    for (x, y, _), name in zip(points, names):
        for dx, dy, ha, va in _LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8,
                               fontweight="bold" if name == "mos" else "normal")
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in taken) and inside.contains(box.x0, box.y0) \
                    and inside.contains(box.x1, box.y1):
                break
            text.remove()
        else:   # nowhere free: the first place, with a line to the point so the name is not misread
            text = ax.annotate(name, (x, y), xytext=(20, 20), textcoords="offset points", fontsize=8,
                               arrowprops=dict(arrowstyle="-", color="0.5", lw=0.5))
            box = text.get_window_extent(renderer)
        taken.append(box)


def flops_versus_length_figure(lengths: Sequence[int], flops: Dict[str, List[float]]):
    """flops: model -> forward FLOPs per example (in FLOP_UNIT) at each length. Two panels, MoS in both: the
    baselines, and the MoS ablations (dashed). Each line has its own colour and marker; models of
    equal cost share a line, their markers drawn over MoS's."""
    present = {_family(model) for model in flops}
    panels = [(family, title) for family, title in (("baseline", "MoS and the baselines"),
                                                     ("ablation", "MoS and its ablations")) if family in present]
    panels = panels or [("mos", "MoS")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), sharey=True, squeeze=False,
                             layout="constrained")
    axes = axes[0]
    # tab20 without its two reds, which mark MoS.
    colors = cycle(c for at, c in enumerate(matplotlib.colormaps["tab20"].colors) if at not in (6, 7))
    markers = cycle(_MARKERS)
    for ax, (family, title) in zip(axes, panels):
        for model, values in flops.items():
            kind = _family(model)
            if kind not in ("mos", family):
                continue
            main = kind == "mos"
            ax.plot(lengths, values, label=model, linestyle="--" if kind == "ablation" else "-",
                    marker="*" if main else next(markers), markersize=12 if main else 7, markeredgecolor="white",
                    linewidth=2.4 if main else 1.4, color="tab:red" if main else next(colors), zorder=2 if main else 3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sequence length L (events in the history)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    axes[0].set_ylabel(f"forward {FLOP_UNIT} per example")
    fig.suptitle("How cost grows with the sequence", fontsize=11)
    return fig


def flops_versus_length(lengths: Sequence[int], flops: Dict[str, List[float]], path: Path) -> Path:
    return _save(flops_versus_length_figure(lengths, flops), path)


def session_similarity_figure(matrices: Sequence[np.ndarray], labels: Sequence[Sequence[int]], users: Sequence[int]):
    """One heatmap per user: cosine similarity between the category histograms of its sessions;
    ticks show each session's true interest (the session-hopping picture)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.4 * len(matrices) + 1, 3.9), squeeze=False,
                             layout="constrained")
    for ax, matrix, label, user in zip(axes[0], matrices, labels, users):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ticks = range(len(label))
        ax.set_xticks(ticks, [str(x) for x in label], fontsize=7)
        ax.set_yticks(ticks, [str(x) for x in label], fontsize=7)
        ax.set_xlabel("session, oldest first\n(its true interest)", fontsize=8)
        ax.set_title(f"user {user}: session similarity\n(cosine of category histograms)", fontsize=8)
    axes[0][0].set_ylabel("session, oldest first (its true interest)", fontsize=8)
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label("cosine similarity: 0 no category shared, 1 the same mix", fontsize=8)
    return fig


def session_similarity(matrices: Sequence[np.ndarray], labels: Sequence[Sequence[int]], users: Sequence[int],
                       path: Path) -> Path:
    return _save(session_similarity_figure(matrices, labels, users), path)


def routing_figure(tables: Dict[str, np.ndarray]):
    """One heatmap per model: the share of each routed theme's test sessions (rows) on each true
    interest (columns). A pure router puts one bright cell per row; a random one spreads each row
    evenly (the routing picture)."""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.6 * len(tables) + 1, 3.6), squeeze=False,
                             layout="constrained")
    for ax, (model, table) in zip(axes[0], tables.items()):
        table = np.asarray(table, dtype=float)
        shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)
        image = ax.imshow(shares, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xlabel("true interest of the session", fontsize=8)
        ax.set_ylabel("routed theme", fontsize=8)
        purity = table.max(axis=1).sum() / max(table.sum(), 1.0)
        ax.set_title(f"{model}: test sessions by theme\n(purity {purity:.3f})", fontsize=8)
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label("share of the theme's sessions", fontsize=8)
    return fig


def routing(tables: Dict[str, np.ndarray], path: Path) -> Path:
    return _save(routing_figure(tables), path)
