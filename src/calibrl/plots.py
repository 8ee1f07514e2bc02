"""Reliability diagrams and confidence histograms, written as PNG files.

Figures are plain :class:`matplotlib.figure.Figure` objects on an Agg canvas: pyplot is never
imported, so no global backend is switched, no window can open, and no figure stays registered
anywhere (nothing to close, nothing leaks). The binning is :func:`calibrl.metrics.reliability_bins`,
the one the reported ECE uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrl.metrics import ReliabilityBins, reliability_bins
from calibrl.metrics.calibration import ArrayLike, _validate

__all__ = ["confidence_histogram", "reliability_diagram", "reliability_grid"]

PANEL_SIZE = (4.5, 4.5)  # inches per diagram
DPI = 120


def _figure(n_panels: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(PANEL_SIZE[0] * n_panels, PANEL_SIZE[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, n_panels, squeeze=False)[0])


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
) -> Path:
    """Write several reliability diagrams side by side (e.g. two confidence signals, before/after).

    Args:
        panels: ``{panel title: (confidence float [N_i] in [0, 1], correct [N_i] of 0/1)}``,
            drawn left to right in mapping order.
        path: PNG file to write; parent folders are created.
        n_bins, strategy: binning of every panel, as in :func:`calibrl.metrics.reliability_bins`.
        title: figure title above the panels (none by default).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no panels, or a panel with invalid inputs (before anything is written).
    """
    if not panels:
        raise ValueError("reliability_grid needs at least one panel")
    bins = {name: reliability_bins(q, c, n_bins, strategy) for name, (q, c) in panels.items()}
    fig, axes = _figure(len(bins))
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
