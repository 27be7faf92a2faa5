"""The profile's figures are readable: nothing covers the MoS marker, every line of the cost plot
can be told apart, the similarity heatmaps say what they show and nothing is cropped."""
import numpy as np
import pytest

from mos.lab import plots


def rows():
    """Eleven models, several close together around MoS (as the profile's are)."""
    points = {"backbone": (0.32, 0.540), "gshard": (0.64, 0.594), "dselect_k": (1.2, 0.543),
              "expert_choice": (0.64, 0.582), "mos": (0.70, 0.445), "mos_no_global": (0.39, 0.511),
              "mos_no_short": (0.66, 0.426), "mos_no_themes": (0.36, 0.620),
              "mos_random_routing": (0.69, 0.525), "mos_token_routing": (0.73, 0.442),
              "mos_global_sessions": (0.45, 0.448)}
    return [{"model": name, "mflops": x, "auc_mean": y, "auc_std": 0.004} for name, (x, y) in points.items()]


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_auc_versus_flops_names_cover_neither_mos_nor_each_other():
    data = rows()
    fig = plots.auc_versus_flops_figure(data)
    renderer = drawn(fig)
    ax = fig.axes[0]
    ordered = sorted(data, key=lambda row: row["model"] != "mos")
    markers = plots.marker_boxes(ax, [(r["mflops"], r["auc_mean"], 16 if r["model"] == "mos" else 7)
                                      for r in ordered])
    names = [text for text in ax.texts]
    assert sorted(text.get_text() for text in names) == sorted(r["model"] for r in data)
    boxes = [text.get_window_extent(renderer) for text in names]
    for at, box in enumerate(boxes):
        assert not box.overlaps(markers[0]), f"{names[at].get_text()} covers the MoS marker"
        assert not any(box.overlaps(other) for other in boxes[at + 1:]), names[at].get_text()
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))          # below the axes, over no point
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"MoS", "MoS ablations", "backbone and MoE baselines"}
    assert ax.get_xlabel() == "forward MFLOPs per example (log scale)"


def test_flops_versus_length_lines_differ_in_colour_or_marker_and_panels_hold_the_families():
    models = [r["model"] for r in rows()]
    flops = {name: [0.1 * (k + 1) * (1 + (name == "dselect_k")) for k in range(3)] for name in models}
    fig = plots.flops_versus_length_figure([100, 200, 400], flops)
    renderer = drawn(fig)
    panels = fig.axes[:2]
    assert [ax.get_title() for ax in panels] == ["MoS and the baselines", "MoS and its ablations"]
    for ax in panels:
        looks = [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in ax.get_lines()]
        assert len(set(looks)) == len(looks)
        assert ax.get_legend().get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0
    shown = [line.get_label() for ax in panels for line in ax.get_lines()]
    assert sorted(set(shown)) == sorted(models) and shown.count("mos") == 2
    assert panels[0].get_ylabel() == "forward MFLOPs per example"


def test_session_similarity_has_a_colour_bar_titles_and_uncropped_labels(tmp_path):
    matrices = [np.eye(7), np.eye(12)]
    labels = [[1, 7, 1, 10, 1, 7, 1], list(range(12))]
    fig = plots.session_similarity_figure(matrices, labels, [5, 42])
    renderer = drawn(fig)
    panels, bar = fig.axes[:2], fig.axes[2]
    assert "cosine similarity" in bar.get_ylabel()
    for ax, user in zip(panels, (5, 42)):
        assert ax.get_title().startswith(f"user {user}: session similarity")
        assert "cosine" in ax.get_title()
        label = ax.xaxis.label.get_window_extent(renderer)
        assert fig.bbox.contains(label.x0, label.y0) and fig.bbox.contains(label.x1, label.y1)
    path = plots.session_similarity(matrices, labels, [5, 42], tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("models, panels", [(["mos"], ["MoS"]), (["backbone", "mos"], ["MoS and the baselines"]),
                                             (["mos", "mos_no_short"], ["MoS and its ablations"])])
def test_the_cost_plot_has_a_panel_per_family_present(tmp_path, recwarn, models, panels):
    fig = plots.flops_versus_length_figure([10, 20], {model: [1e-6, 2e-6] for model in models})
    assert [ax.get_title() for ax in fig.axes] == panels
    data = [row for row in rows() if row["model"] in models]
    plots.auc_versus_flops(data, tmp_path / "a.png")
    plots.flops_versus_length([10, 20], {model: [1e-6, 2e-6] for model in models}, tmp_path / "f.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "f.png").stat().st_size > 0
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_the_routing_picture_shows_each_theme_s_share_of_each_interest(tmp_path):
    """One panel per model, rows normalised (a pure router: one bright cell per row), the purity in
    the title, a colour bar that says what the colour is, nothing cropped."""
    pure = np.array([[9, 0, 0], [0, 5, 0], [0, 0, 7], [0, 0, 0]])
    mixed = np.full((4, 3), 3)
    fig = plots.routing_figure({"mos": pure, "mos_random_routing": mixed})
    renderer = drawn(fig)
    panels, bar = fig.axes[:2], fig.axes[2]
    assert "share of the theme's sessions" in bar.get_ylabel()
    assert panels[0].get_title() == "mos: test sessions by theme\n(purity 1.000)"
    assert panels[1].get_title().endswith("(purity 0.333)")
    shown = panels[0].get_images()[0].get_array()
    assert np.allclose(shown[:3].max(axis=1), 1.0) and np.allclose(shown[3], 0.0)
    for ax in panels:
        label = ax.xaxis.label.get_window_extent(renderer)
        assert fig.bbox.contains(label.x0, label.y0) and fig.bbox.contains(label.x1, label.y1)
    assert plots.routing({"mos": pure}, tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
