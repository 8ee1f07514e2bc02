"""Reliability diagrams and confidence histograms of one evaluation, written as PNG files.

Each figure has a builder that returns it (:func:`reliability_figure`,
:func:`confidence_histogram_figure`; tests read the plotted data from it) and a writer that
saves it (:func:`reliability_diagram`, :func:`reliability_grid`, :func:`confidence_histogram`).
:func:`grid_figure` and :func:`save_figure` are the figure plumbing the run-comparison figures of
:mod:`calibrl.report.figures` share.

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas: pyplot is never
imported, so no global backend is switched, no window can open, and no figure stays registered
anywhere (nothing to close, nothing leaks). Both figures bin with
:func:`calibrl.metrics.reliability_bins`, the binning of the reported ECE: bins are right-closed,
``(lo, hi]``, with 0.0 in the first bin, so a confidence on an edge (0.2 with 10 bins) is in the
bin below it (0.1–0.2) in the diagram, in the histogram and in the ECE alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from calibrl.metrics import ReliabilityBins, reliability_bins
from calibrl.metrics.calibration import ArrayLike

__all__ = [
    "confidence_histogram",
    "confidence_histogram_figure",
    "grid_figure",
    "reliability_diagram",
    "reliability_figure",
    "reliability_grid",
    "save_figure",
]

PANEL_SIZE = (4.5, 4.5)  # inches per diagram
DPI = 120
BIN_NOTE = "bins (lo, hi], 0 in the first"  # the convention of calibrl.metrics.reliability_bins


def grid_figure(n_panels: int, n_cols: int | None = None, spare: bool = False) -> tuple[Figure, list[Axes]]:
    """A figure of ``n_panels`` axes on a grid of ``n_cols`` columns (default: one row), each
    :data:`PANEL_SIZE` inches, on an Agg canvas.

    Returns:
        ``(figure, axes)``: the ``n_panels`` axes in reading order; with ``spare``, followed by
        the axes of the unused grid cells (left visible, e.g. for a legend; hidden otherwise).
    """
    n_cols = min(n_cols or n_panels, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * n_cols, PANEL_SIZE[1] * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(spare)
    return fig, axes if spare else axes[:n_panels]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (:data:`DPI` dots per inch) to ``path``, creating parent folders.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _draw_reliability(ax: Axes, bins: ReliabilityBins, label: str) -> None:
    """Accuracy bars over the non-empty bins (count above each), the gap to mean confidence
    hatched, the diagonal; a legend entry for each of them."""
    full = bins.count > 0
    left, width = bins.lower[full], (bins.upper - bins.lower)[full]
    acc, conf = bins.accuracy[full], bins.confidence_mean[full]
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    bars = ax.bar(left, acc, width=width, align="edge", color="C0", edgecolor="black", linewidth=0.5, label="accuracy")
    # The gap spans accuracy -> mean confidence: above the bar when overconfident, inside it when
    # not. Hatched but unfilled, so inside a bar it never blends with the bar's fill into a colour
    # (purple) that no legend entry explains.
    ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", facecolor="none", hatch="//", edgecolor="C3",
           linewidth=0.8, label="gap to mean confidence")
    ax.bar_label(bars, labels=[str(n) for n in bins.count[full]], padding=2, fontsize=7)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", label="n above a bar: predictions in the bin"))
    n = int(bins.count.sum())
    ax.set_title(f"{label}\nECE = {bins.calibration_error():.3f}, N = {n}", fontsize=10)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.1)  # headroom for the counts above full bars
    ax.set_xlabel(f"confidence ({BIN_NOTE})")
    ax.set_ylabel("accuracy")
    ax.legend(handles=handles, loc="upper left", fontsize=7, framealpha=1.0)  # opaque: no tinted bar behind it


def reliability_figure(
    panels: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
    title: str | None = None,
    n_cols: int | None = None,
) -> Figure:
    """Reliability diagrams side by side: per panel, per-bin accuracy against confidence, with
    ECE and N in its title (arguments as in :func:`reliability_grid`).

    Returns:
        The figure; its axes are the panels in mapping order.

    Raises:
        ValueError: no panels, a panel with invalid inputs, ``n_cols < 1``, ``n_bins < 1`` or an
            unknown strategy.
    """
    if not panels:
        raise ValueError("reliability_grid needs at least one panel")
    if n_cols is not None and n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    bins = {name: reliability_bins(q, c, n_bins, strategy) for name, (q, c) in panels.items()}
    fig, axes = grid_figure(len(bins), n_cols)
    for ax, (name, b) in zip(axes, bins.items(), strict=True):
        _draw_reliability(ax, b, name)
    if title:
        fig.suptitle(title)
    return fig


def reliability_diagram(
    confidence: ArrayLike,
    correct: ArrayLike,
    path: str | Path,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
    title: str | None = None,
) -> Path:
    """Write a reliability diagram: per-bin accuracy against confidence, with ECE and N in the title.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        path: PNG file to write; parent folders are created.
        n_bins, strategy: binning, as in :func:`calibrl.metrics.reliability_bins`.
        title: figure title (default ``"Reliability diagram"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid inputs, ``n_bins < 1`` or an unknown strategy (before anything is
            written).
    """
    panel = {title or "Reliability diagram": (confidence, correct)}
    return reliability_grid(panel, path, n_bins=n_bins, strategy=strategy)


def reliability_grid(
    panels: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
    title: str | None = None,
    n_cols: int | None = None,
) -> Path:
    """Write several reliability diagrams side by side (e.g. two confidence signals, before/after).

    Args:
        panels: ``{panel title: (confidence float [N_i] in [0, 1], correct [N_i] of 0/1)}``,
            drawn left to right in mapping order.
        path: PNG file to write; parent folders are created.
        n_bins, strategy: binning of every panel, as in :func:`calibrl.metrics.reliability_bins`.
        title: figure title above the panels (none by default).
        n_cols: panels per row (default: all in one row).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no panels, a panel with invalid inputs, or ``n_cols < 1`` (before anything is
            written).
    """
    fig = reliability_figure(panels, n_bins=n_bins, strategy=strategy, title=title, n_cols=n_cols)
    return save_figure(fig, path)


def confidence_histogram_figure(
    confidence: ArrayLike, correct: ArrayLike, *, n_bins: int = 20, title: str | None = None
) -> Figure:
    """A histogram of confidence, stacked by correct (green) and wrong (red) predictions, binned
    as :func:`calibrl.metrics.reliability_bins` bins (arguments as in :func:`confidence_histogram`).

    Returns:
        The figure, one axes.

    Raises:
        ValueError: invalid inputs or ``n_bins < 1``.
    """
    # The metrics' binning, not np.histogram's [lo, hi): a confidence on an edge is counted in the
    # bin below it, as in the reliability diagram and the ECE.
    bins = reliability_bins(confidence, correct, n_bins)
    right = np.rint(np.where(bins.count > 0, bins.accuracy, 0.0) * bins.count).astype(np.int64)  # [B]
    wrong = bins.count - right
    width = bins.upper - bins.lower
    fig, (ax,) = grid_figure(1)
    ax.bar(bins.lower, right, width=width, align="edge", color="C2", edgecolor="black", linewidth=0.5,
           label=f"correct ({right.sum()})")
    ax.bar(bins.lower, wrong, width=width, bottom=right, align="edge", color="C3", edgecolor="black", linewidth=0.5,
           label=f"wrong ({wrong.sum()})")
    n = int(bins.count.sum())
    ax.set_title(f"{title or 'Confidence histogram'}\nN = {n}, accuracy = {right.sum() / n:.3f}", fontsize=10)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(f"confidence ({BIN_NOTE})")
    ax.set_ylabel("predictions")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def confidence_histogram(
    confidence: ArrayLike, correct: ArrayLike, path: str | Path, *, n_bins: int = 20, title: str | None = None
) -> Path:
    """Write a histogram of confidence, stacked by correct (green) and wrong (red) predictions.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        path: PNG file to write; parent folders are created.
        n_bins: equal-width bins over [0, 1] (>= 1), right-closed as in
            :func:`calibrl.metrics.reliability_bins`.
        title: axes title (default ``"Confidence histogram"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid inputs or ``n_bins < 1`` (before anything is written).
    """
    return save_figure(confidence_histogram_figure(confidence, correct, n_bins=n_bins, title=title), path)
