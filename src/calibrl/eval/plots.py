"""Reliability diagrams, confidence histograms and run-comparison figures, written as PNG files.

Run comparison (:mod:`calibrl.report.compare` computes the data): :func:`curves_grid` (one panel per
metric over training steps, one line per arm with its seed band and eval markers) and
:func:`tradeoff_plot` (each arm's path through the accuracy-ECE plane over its eval points).
Arm ``i`` (in mapping order) is drawn in colour ``C{i}`` in every comparison figure, so one arm
keeps one colour across figures built from the same mapping order.

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas: pyplot is never
imported, so no global backend is switched, no window can open, and no figure stays registered
anywhere (nothing to close, nothing leaks). The binning is :func:`calibrl.metrics.reliability_bins`,
the one the reported ECE uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from calibrl.metrics import ReliabilityBins, reliability_bins
from calibrl.metrics.calibration import ArrayLike, _validate

__all__ = ["Band", "confidence_histogram", "curves_grid", "reliability_diagram", "reliability_grid", "tradeoff_plot"]

PANEL_SIZE = (4.5, 4.5)  # inches per diagram
DPI = 120


def _figure(n_panels: int, n_cols: int | None = None, spare: bool = False) -> tuple[Figure, list[Axes]]:
    """``n_panels`` axes on a grid of ``n_cols`` columns (default: one row); unused cells hidden.
    With ``spare``, the axes of the unused cells follow the panels' (visible, for e.g. a legend)."""
    n_cols = min(n_cols or n_panels, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * n_cols, PANEL_SIZE[1] * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(spare)
    return fig, axes if spare else axes[:n_panels]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _draw_reliability(ax: Axes, bins: ReliabilityBins, label: str) -> None:
    """Accuracy bars over the bins (count on each), the gap to mean confidence shaded, the diagonal."""
    full = bins.count > 0
    left, width = bins.lower[full], (bins.upper - bins.lower)[full]
    acc, conf = bins.accuracy[full], bins.confidence_mean[full]
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    bars = ax.bar(left, acc, width=width, align="edge", color="C0", edgecolor="black", linewidth=0.5, label="accuracy")
    # The gap spans accuracy -> mean confidence: above the bar when overconfident, inside it when not.
    ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", color="C3", alpha=0.3, hatch="//",
           edgecolor="C3", linewidth=0.5, label="gap to mean confidence")
    ax.bar_label(bars, labels=[str(n) for n in bins.count[full]], padding=2, fontsize=7)
    n = int(bins.count.sum())
    ax.set_title(f"{label}\nECE = {bins.calibration_error():.3f}, N = {n}", fontsize=10)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.1)  # headroom for the counts above full bars
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=7)


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
    if not panels:
        raise ValueError("reliability_grid needs at least one panel")
    if n_cols is not None and n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    bins = {name: reliability_bins(q, c, n_bins, strategy) for name, (q, c) in panels.items()}
    fig, axes = _figure(len(bins), n_cols)
    for ax, (name, b) in zip(axes, bins.items(), strict=True):
        _draw_reliability(ax, b, name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def confidence_histogram(
    confidence: ArrayLike, correct: ArrayLike, path: str | Path, *, n_bins: int = 20, title: str | None = None
) -> Path:
    """Write a histogram of confidence, stacked by correct (green) and wrong (red) predictions.

    Args:
        confidence: stated confidences, float ``[N]`` in [0, 1].
        correct: correctness ``[N]``, 0/1 or bool.
        path: PNG file to write; parent folders are created.
        n_bins: equal-width bins over [0, 1] (>= 1).
        title: axes title (default ``"Confidence histogram"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: invalid inputs or ``n_bins < 1`` (before anything is written).
    """
    q, c = _validate(confidence, correct)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    right, wrong = q[c == 1.0], q[c == 0.0]
    fig, (ax,) = _figure(1)
    ax.hist([right, wrong], bins=np.linspace(0.0, 1.0, n_bins + 1), stacked=True, color=["C2", "C3"],
            edgecolor="black", linewidth=0.5, label=[f"correct ({right.size})", f"wrong ({wrong.size})"])
    ax.set_title(f"{title or 'Confidence histogram'}\nN = {q.size}, accuracy = {c.mean():.3f}", fontsize=10)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("confidence")
    ax.set_ylabel("predictions")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


@dataclass(frozen=True)
class Band:
    """One arm's curve of one metric, aggregated over its seeds.

    Attributes:
        x: float ``[K]``, positions (RL steps), increasing.
        mean: float ``[K]``, mean over the seeds that have a finite value at ``x[k]``; NaN where none.
        low: float ``[K]``, minimum over those seeds (NaN where none).
        high: float ``[K]``, maximum over those seeds (NaN where none).
        n: int ``[K]``, seeds with a finite value at ``x[k]``.
    """

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray

    def __post_init__(self) -> None:
        shapes = {np.shape(a) for a in (self.x, self.mean, self.low, self.high, self.n)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"Band arrays must be 1-D of one length, got shapes {sorted(shapes)}")


def _arm_colours(*mappings: Mapping[str, object] | None) -> dict[str, str]:
    arms: dict[str, str] = {}
    for mapping in mappings:
        for arm in mapping or {}:
            arms.setdefault(arm, f"C{len(arms) % 10}")
    return arms


def curves_grid(
    panels: Mapping[str, Mapping[str, Band]],
    path: str | Path,
    *,
    markers: Mapping[str, Mapping[str, Band]] | None = None,
    xlabel: str = "RL step",
    n_cols: int = 3,
    title: str | None = None,
) -> Path:
    """Write one panel per metric: per arm, the seed-mean line over ``x`` with the min–max band
    over seeds shaded, and optionally eval points as markers (seed mean, min–max error bars).

    Args:
        panels: ``{metric (panel title): {arm: Band}}``; a metric with no arms gets an empty
            panel marked "no data".
        path: PNG file to write; parent folders are created.
        markers: ``{metric: {arm: Band}}`` of eval points, drawn on the panel of the same metric
            (metrics not in ``panels`` are ignored).
        xlabel: x-axis label of every panel.
        n_cols: panels per row (>= 1).
        title: figure title (none by default).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no panels or ``n_cols < 1`` (before anything is written).
    """
    if not panels:
        raise ValueError("curves_grid needs at least one panel")
    if n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    markers = markers or {}
    colours = _arm_colours(*panels.values(), *markers.values())
    fig, axes = _figure(len(panels), n_cols, spare=True)
    for ax, (metric, bands) in zip(axes, panels.items()):
        for arm, band in bands.items():
            ax.plot(band.x, band.mean, color=colours[arm], linewidth=1.5)
            ax.fill_between(band.x, band.low, band.high, color=colours[arm], alpha=0.2, linewidth=0)
        for arm, band in markers.get(metric, {}).items():
            spread = np.vstack([band.mean - band.low, band.high - band.mean])
            ax.errorbar(band.x, band.mean, yerr=spread, fmt="o", color=colours[arm], markeredgecolor="black",
                        markersize=5, capsize=3, linewidth=1)
        if not bands and not markers.get(metric):
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    # One legend for all panels: arms by colour, and what a line and a marker are.
    handles = [Line2D([], [], color=c, linewidth=3, label=arm) for arm, c in colours.items()]
    handles += [Line2D([], [], color="grey", linewidth=1.5, label="training batch: seed mean, min–max band"),
                Line2D([], [], color="grey", marker="o", markeredgecolor="black", linestyle="none",
                       label="held-out eval: seed mean, min–max bar")]
    spare = axes[len(panels):]
    if spare:
        spare[0].axis("off")
        spare[0].legend(handles=handles, loc="center", fontsize=8)
        for ax in spare[1:]:
            ax.set_visible(False)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def tradeoff_plot(
    paths: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[str]]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Write the accuracy-vs-ECE plane: per arm, its path through its eval points in order.

    x is ECE (lower is better), y accuracy (higher is better), so the desirable corner is the top
    left. The first point of a path is a hollow circle, the last a star; every point is labelled
    with its stage (``raw``, ``sft``, ``step<N>``, ``final``). Non-finite points are skipped.

    Args:
        paths: ``{arm: (ece [K], accuracy [K], stage labels [K])}``, points in eval order.
        path: PNG file to write; parent folders are created.
        title: axes title (default ``"Accuracy vs ECE over training"``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no arms, or an arm whose three sequences differ in length (before anything is
            written).
    """
    if not paths:
        raise ValueError("tradeoff_plot needs at least one arm")
    for arm, (ece, acc, stages) in paths.items():
        if not len(ece) == len(acc) == len(stages):
            raise ValueError(
                f"arm {arm!r}: ece, accuracy and stages differ in length ({len(ece)}, {len(acc)}, {len(stages)})")
    colours = _arm_colours(paths)
    fig, (ax,) = _figure(1)
    fig.set_size_inches(PANEL_SIZE[0] * 1.5, PANEL_SIZE[1] * 1.2)
    drawn = False
    for arm, (ece, acc, stages) in paths.items():
        x, y = np.asarray(ece, dtype=np.float64), np.asarray(acc, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y, names = x[ok], y[ok], [s for s, keep in zip(stages, ok, strict=True) if keep]
        if not names:
            continue
        drawn = True
        ax.plot(x, y, color=colours[arm], linewidth=1.2, marker="o", markersize=4, label=arm)
        ax.plot(x[0], y[0], marker="o", markersize=9, markerfacecolor="none", color=colours[arm])
        ax.plot(x[-1], y[-1], marker="*", markersize=14, color=colours[arm], markeredgecolor="black")
        for xi, yi, name in zip(x, y, names, strict=True):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colours[arm])
    ax.set_xlabel("ECE (lower is better)")
    ax.set_ylabel("accuracy (higher is better)")
    ax.set_title(title or "Accuracy vs ECE over training", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=7)
    else:  # e.g. no well-formed answer anywhere, so no ECE
        ax.text(0.5, 0.5, "no finite (ECE, accuracy) point", ha="center", va="center", transform=ax.transAxes,
                color="grey")
    return _save(fig, path)
