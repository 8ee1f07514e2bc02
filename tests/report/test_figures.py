"""Comparison figures: the plotted lines, bands, markers and labels are the data they were given,
and bad input is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex

from calibrl.report.aggregate import Band
from calibrl.report.figures import curves_figure, curves_grid, tradeoff_figure, tradeoff_plot

NAN = float("nan")


def _band(x, mean, low, high):
    return Band(np.array(x, dtype=float), np.array(mean), np.array(low), np.array(high), np.ones(len(x), dtype=int))


def test_curves_draw_each_arm_in_its_colour_with_band_and_markers():
    a = _band([1, 2, 3], [0.2, 0.3, 0.4], [0.1, 0.2, 0.3], [0.3, 0.4, 0.5])
    b = _band([1, 2], [0.6, 0.6], [0.5, 0.5], [0.7, 0.7])
    evals = _band([0, 3], [0.5, 0.75], [0.5, 0.5], [0.5, 1.0])
    fig = curves_figure({"accuracy": {"a": a, "b": b}, "ece": {}, "brier": {"b": b}},
                        markers={"accuracy": {"a": evals}}, n_cols=2)
    acc, ece, _, spare = fig.axes  # 2 x 2 grid: the spare fourth cell holds the legend
    lines = [ln for ln in acc.get_lines() if ln.get_linestyle() == "-"]
    # one seed-mean line per arm: arm i in colour C{i}
    assert [(ln.get_xdata().tolist(), ln.get_ydata().tolist(), to_hex(ln.get_color())) for ln in lines[:2]] == [
        ([1, 2, 3], [0.2, 0.3, 0.4], to_hex("C0")), ([1, 2], [0.6, 0.6], to_hex("C1"))]
    # the min-max band of a: lower edge 0.1..0.3, upper edge 0.3..0.5
    band_y = acc.collections[0].get_paths()[0].vertices[:, 1]
    assert {0.1, 0.2, 0.3, 0.4, 0.5} <= set(np.round(band_y, 6))
    # eval markers of a at RL steps 0 and 3, seed mean 0.5 and 0.75
    (marker,) = [ln for ln in acc.get_lines() if ln.get_marker() == "o"]
    assert marker.get_xdata().tolist() == [0, 3] and marker.get_ydata().tolist() == [0.5, 0.75]
    assert [t.get_text() for t in ece.texts] == ["no data"]
    labels = [t.get_text() for t in spare.get_legend().get_texts()]
    assert labels[:2] == ["a", "b"] and len(labels) == 4
    # without a spare cell the legend goes below the panels
    fig = curves_figure({"accuracy": {"a": a}}, n_cols=1)
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "a"


def test_tradeoff_path_skips_non_finite_points_and_labels_stages():
    fig = tradeoff_figure({"a": ([0.3, NAN, 0.1], [0.5, 0.6, 0.7], ["sft", "step2", "final"]),
                           "b": ([NAN], [0.5], ["sft"])})
    (ax,) = fig.axes
    path, start, end = ax.get_lines()
    assert path.get_xdata().tolist() == [0.3, 0.1] and path.get_ydata().tolist() == [0.5, 0.7]
    assert (start.get_xdata().tolist(), start.get_marker()) == ([0.3], "o")  # first point
    assert (end.get_xdata().tolist(), end.get_marker()) == ([0.1], "*")  # last point
    assert [t.get_text() for t in ax.texts] == ["sft", "final"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a"]  # b has no finite point
    (empty,) = tradeoff_figure({"b": ([NAN], [0.5], ["sft"])}).axes
    assert [t.get_text() for t in empty.texts] == ["no finite (ECE, accuracy) point"]


def test_curves_mark_an_all_undefined_panel_and_tick_whole_steps():
    undefined = _band([1, 2, 3], [NAN] * 3, [NAN] * 3, [NAN] * 3)  # e.g. AUROC when no answer was right
    a = _band([1, 2, 3], [0.2, 0.3, 0.4], [0.1, 0.2, 0.3], [0.3, 0.4, 0.5])
    fig = curves_figure({"accuracy": {"a": a}, "auroc": {"a": undefined}}, n_cols=2)
    acc, auroc = fig.axes[:2]
    assert [t.get_text() for t in auroc.texts] == ["no data"] and len(acc.texts) == 0
    fig.canvas.draw()
    ticks = acc.get_xticks()
    assert len(ticks) > 1 and all(float(t).is_integer() for t in ticks)  # 3 steps: no 1.5, 2.5


def test_tradeoff_labels_do_not_overprint_a_point_on_an_earlier_one():
    # step6 sits on sft (within 2% of the axes' span): its label is dropped; final is always labelled
    fig = tradeoff_figure({"a": ([0.30, 0.3001, 0.10, 0.1001], [0.50, 0.5001, 0.70, 0.7001],
                                 ["sft", "step6", "step12", "final"])})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["sft", "step12", "final"]
    start, end = ax.texts[0], ax.texts[-1]
    assert start.xyann == (4, 4) and end.xyann == (4, -10)  # final's label goes below its star


def test_comparison_figures_refuse_bad_input_before_writing(tmp_path):
    path = tmp_path / "never" / "plot.png"
    band = _band([0, 1, 2], [0.0] * 3, [0.0] * 3, [0.0] * 3)
    with pytest.raises(ValueError, match="at least one panel"):
        curves_grid({}, path)
    with pytest.raises(ValueError, match="n_cols"):
        curves_grid({"accuracy": {"a": band}}, path, n_cols=0)
    with pytest.raises(ValueError, match="at least one arm"):
        tradeoff_plot({}, path)
    with pytest.raises(ValueError, match="differ in length"):
        tradeoff_plot({"a": ([0.1, 0.2], [0.5], ["sft", "final"])}, path)
    assert not path.parent.exists()
