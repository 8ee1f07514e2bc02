"""Reliability diagrams and confidence histograms: the plotted bars are the per-bin numbers worked
out by hand, both figures bin exactly as the ECE they illustrate (calibrl.metrics.reliability_bins),
every colour drawn has a legend entry, and invalid input is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.image import imread

from calibrl.eval.plots import (
    confidence_histogram,
    confidence_histogram_figure,
    reliability_diagram,
    reliability_figure,
    reliability_grid,
)
from calibrl.metrics import reliability_bins


def _bars(ax, label_start):
    """``(left, width, bottom, height)`` rows of the bar container whose label starts so."""
    (bars,) = [c for c in ax.containers if any(x.get_label().startswith(label_start) for x in (c, *c[:1]))]
    return [(round(p.get_x(), 9), round(p.get_width(), 9), round(p.get_y(), 9), round(p.get_height(), 9)) for p in bars]


def _nonempty_bins(ax, label_start):
    return [(left, width) for left, width, _, height in _bars(ax, label_start) if height != 0]


# 0.0, every inner edge k/10 and 1.0
EDGES = [k / 10 for k in range(11)]


@pytest.mark.parametrize("q", EDGES)
def test_a_confidence_lands_in_the_same_bin_in_both_figures_and_the_metric(q):
    # Bins are (lo, hi] with 0.0 in the first: k/10 belongs to ((k-1)/10, k/10], 0.0 to [0, 0.1].
    lo = round(max(q - 0.1, 0.0), 9)
    metric = reliability_bins([q], [1], n_bins=10)
    b = int(np.argmax(metric.count))
    assert (round(metric.lower[b], 9), round(metric.upper[b] - metric.lower[b], 9)) == (lo, 0.1)
    (diagram,) = reliability_figure({"p": ([q], [1])}, n_bins=10).axes
    (histogram,) = confidence_histogram_figure([q], [1], n_bins=10).axes
    assert _nonempty_bins(diagram, "accuracy") == [(lo, 0.1)]
    assert _nonempty_bins(histogram, "correct") == [(lo, 0.1)]


def test_histogram_with_finer_bins_keeps_the_convention():
    # 20 bins: 0.20 is in (0.15, 0.20], as in the metric, not in [0.20, 0.25).
    (ax,) = confidence_histogram_figure([0.2], [0], n_bins=20).axes
    assert _nonempty_bins(ax, "wrong") == [(0.15, 0.05)]


def test_reliability_bars_are_the_per_bin_accuracies_by_hand():
    q = [0.05, 0.15, 0.15, 0.15, 0.2, 0.95, 0.95]
    c = [0, 1, 0, 1, 1, 1, 0]
    (ax,) = reliability_figure({"signal": (q, c)}).axes
    # (0, 0.1]: 0.05 wrong -> accuracy 0, confidence 0.05, 1 prediction.
    # (0.1, 0.2]: 0.15 x3 and 0.2, 3 of 4 right -> accuracy 0.75, confidence 0.65 / 4 = 0.1625.
    # (0.9, 1]: 0.95 right and wrong -> accuracy 0.5, confidence 0.95. Empty bins: no bar.
    assert _bars(ax, "accuracy") == [(0.0, 0.1, 0.0, 0.0), (0.1, 0.1, 0.0, 0.75), (0.9, 0.1, 0.0, 0.5)]
    # gaps from accuracy to mean confidence: 0.05, 0.1625 - 0.75 = -0.5875, 0.95 - 0.5 = 0.45
    assert _bars(ax, "gap") == [(0.0, 0.1, 0.0, 0.05), (0.1, 0.1, 0.75, -0.5875), (0.9, 0.1, 0.5, 0.45)]
    assert [t.get_text() for t in ax.texts] == ["1", "4", "2"]  # predictions per bin, on the bars
    assert any(ln.get_xdata().tolist() == [0, 1] and ln.get_ydata().tolist() == [0, 1] for ln in ax.get_lines())
    # ECE = (1 * 0.05 + 4 * 0.5875 + 2 * 0.45) / 7 = 3.3 / 7 = 0.471
    assert ax.get_title() == "signal\nECE = 0.471, N = 7"


def test_quantile_bars_follow_the_quantile_bins():
    q, c = [0.1, 0.2, 0.3, 0.9], [0, 1, 1, 1]
    bins = reliability_bins(q, c, n_bins=2, strategy="quantile")  # inner edge: the median 0.25
    (ax,) = reliability_figure({"p": (q, c)}, n_bins=2, strategy="quantile").axes
    assert [(x, w, h) for x, w, _, h in _bars(ax, "accuracy")] == [
        (0.0, 0.25, 0.5), (0.25, 0.75, 1.0)] == [(bins.lower[i], bins.upper[i] - bins.lower[i], bins.accuracy[i])
                                                 for i in range(2)]


def _colours(patch):
    return to_rgba(patch.get_facecolor()), to_rgba(patch.get_edgecolor())


def test_every_colour_of_the_reliability_diagram_is_in_its_legend():
    # Underconfident bins (accuracy above confidence) put the gap inside the bar.
    (ax,) = reliability_figure({"p": ([0.15, 0.15, 0.55, 0.95], [1, 1, 1, 0])}).axes
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "perfect calibration", "accuracy", "gap to mean confidence", "n above a bar: predictions in the bin"]
    legend_colours = {_colours(h) for h in legend.legend_handles if hasattr(h, "get_facecolor")}
    assert {_colours(p) for p in ax.patches} <= legend_colours
    assert {to_rgba(ln.get_color()) for ln in ax.get_lines()} <= {to_rgba(h.get_color()) for h in legend.legend_handles
                                                                   if hasattr(h, "get_color")}
    # No two filled shapes overlap, so no blended colour (e.g. purple) that the legend lacks.
    filled = [p.get_bbox() for p in ax.patches if to_rgba(p.get_facecolor())[3] > 0 and p.get_height() != 0]
    for i, a in enumerate(filled):
        for b in filled[i + 1:]:
            overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_y = min(max(a.y0, a.y1), max(b.y0, b.y1)) - max(min(a.y0, a.y1), min(b.y0, b.y1))
            assert overlap_x <= 1e-12 or overlap_y <= 1e-12, (a, b)


def test_histogram_counts_by_hand():
    q = [0.0, 0.05, 0.2, 0.2, 0.21, 1.0]
    c = [1, 0, 1, 0, 1, 1]
    (ax,) = confidence_histogram_figure(q, c, n_bins=5, title="t").axes
    # bins (0, 0.2] (with 0.0), (0.2, 0.4], ..., (0.8, 1]: right 0.0, 0.2 | 0.21 | - | - | 1.0;
    # wrong 0.05, 0.2 in the first bin, stacked on the right ones.
    assert [h for *_, h in _bars(ax, "correct")] == [2, 1, 0, 0, 1]
    assert [(bottom, h) for _, _, bottom, h in _bars(ax, "wrong")] == [(2, 2), (1, 0), (0, 0), (0, 0), (1, 0)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["correct (4)", "wrong (2)"]
    assert ax.get_title() == "t\nN = 6, accuracy = 0.667"


def test_grid_puts_panels_in_order():
    panels = {"verbalized": ([0.2, 0.9], [0, 1]), "token prob.": ([0.5], [1]), "window": ([0.7], [0])}
    fig = reliability_figure(panels, n_bins=5, title="before / after", n_cols=2)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split("\n")[0] for ax in visible] == list(panels) and fig.get_suptitle() == "before / after"
    assert [round(ax.get_position().x0, 2) < 0.5 for ax in visible] == [True, False, True]  # 2 columns


def test_writers_save_the_figure_as_png(tmp_path):
    # one 4.5-inch panel at 120 dpi is 540 x 540 pixels; two side by side 1080 x 540
    path = tmp_path / "nested" / "dir" / "reliability.png"
    assert reliability_diagram([0.15, 0.95], [1, 0], path) == path and imread(path).shape[:2] == (540, 540)
    path = tmp_path / "grid.png"
    assert reliability_grid({"a": ([0.5], [1]), "b": ([0.5], [0])}, str(path)) == path
    assert imread(path).shape[:2] == (540, 1080)
    path = tmp_path / "a" / "hist.png"
    assert confidence_histogram([0.7, 0.9], [1, 1], path) == path and imread(path).shape[:2] == (540, 540)


@pytest.mark.parametrize(
    "draw",
    [
        lambda p: reliability_diagram([], [], p),
        lambda p: confidence_histogram([], [], p),
        lambda p: reliability_grid({"ok": ([0.5], [1]), "empty": ([], [])}, p),
        lambda p: reliability_grid({}, p),
        lambda p: reliability_grid({"ok": ([0.5], [1])}, p, n_cols=0),
        lambda p: reliability_diagram([0.5, 1.5], [1, 0], p),
        lambda p: confidence_histogram([0.5], [1], p, n_bins=0),
    ],
    ids=["diagram-empty", "histogram-empty", "grid-empty-panel", "grid-no-panels", "grid-no-columns",
         "diagram-out-of-range", "histogram-no-bins"],
)
def test_invalid_input_raises_before_writing(tmp_path, draw):
    path = tmp_path / "never" / "plot.png"
    with pytest.raises(ValueError):
        draw(path)
    assert not path.parent.exists()
