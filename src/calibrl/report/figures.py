"""Run-comparison figures of ``calibrl-compare``, written as PNG files (:mod:`calibrl.report.aggregate`
computes their data).

:func:`curves_grid` draws one panel per metric over training steps, one line per arm with its seed
band and eval markers; :func:`tradeoff_plot` draws each arm's path through the accuracy-ECE plane
over its eval points. Each has a builder that returns the figure (:func:`curves_figure`,
:func:`tradeoff_figure`). Arm ``i`` (in mapping order) is drawn in colour ``C{i}`` in every
comparison figure, so one arm keeps one colour across figures built from the same mapping order.
Figures are built and saved as in :mod:`calibrl.eval.plots` (Agg canvas, no pyplot).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from calibrl.eval.plots import PANEL_SIZE, grid_figure, save_figure
from calibrl.report.aggregate import Band

__all__ = ["curves_figure", "curves_grid", "tradeoff_figure", "tradeoff_plot"]

# (ece [K], accuracy [K], stage labels [K]) of one arm, points in eval order
TradeoffPath = tuple[Sequence[float], Sequence[float], Sequence[str]]


def _arm_colours(*mappings: Mapping[str, object] | None) -> dict[str, str]:
    """``{arm: "C<i>"}``, arms numbered in order of first appearance over the mappings."""
    arms: dict[str, str] = {}
    for mapping in mappings:
        for arm in mapping or {}:
            arms.setdefault(arm, f"C{len(arms) % 10}")
    return arms


def _curves_legend(fig: Figure, spare: Sequence[Axes], colours: Mapping[str, str]) -> None:
    """One legend for all panels: arms by colour, and what a line and a marker are; in the first
    spare grid cell if there is one, else below the panels."""
    handles = [Line2D([], [], color=c, linewidth=3, label=arm) for arm, c in colours.items()]
    handles += [Line2D([], [], color="grey", linewidth=1.5, label="training batch: seed mean, min–max band"),
                Line2D([], [], color="grey", marker="o", markeredgecolor="black", linestyle="none",
                       label="held-out eval: seed mean, min–max bar")]
    if spare:
        spare[0].axis("off")
        spare[0].legend(handles=handles, loc="center", fontsize=8)
        for ax in spare[1:]:
            ax.set_visible(False)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)


def curves_figure(
    panels: Mapping[str, Mapping[str, Band]],
    *,
    markers: Mapping[str, Mapping[str, Band]] | None = None,
    xlabel: str = "RL step",
    n_cols: int = 3,
    title: str | None = None,
) -> Figure:
    """The figure of :func:`curves_grid` (same arguments but ``path``).

    Returns:
        The figure; its first ``len(panels)`` axes are the panels in mapping order.

    Raises:
        ValueError: no panels or ``n_cols < 1``.
    """
    if not panels:
        raise ValueError("curves_grid needs at least one panel")
    if n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    markers = markers or {}
    colours = _arm_colours(*panels.values(), *markers.values())
    fig, axes = grid_figure(len(panels), n_cols, spare=True)
    for ax, (metric, bands) in zip(axes, panels.items()):
        for arm, band in bands.items():
            ax.plot(band.x, band.mean, color=colours[arm], linewidth=1.5)
            ax.fill_between(band.x, band.low, band.high, color=colours[arm], alpha=0.2, linewidth=0)
        for arm, band in markers.get(metric, {}).items():
            spread = np.vstack([band.mean - band.low, band.high - band.mean])
            ax.errorbar(band.x, band.mean, yerr=spread, fmt="o", color=colours[arm], markeredgecolor="black",
                        markersize=5, capsize=3, linewidth=1)
        finite = [b for b in [*bands.values(), *markers.get(metric, {}).values()] if np.isfinite(b.mean).any()]
        if not finite:  # no arm, or only undefined values (e.g. AUROC where every answer was wrong)
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 2.5
        ax.grid(alpha=0.3)
    _curves_legend(fig, axes[len(panels):], colours)
    if title:
        fig.suptitle(title)
    return fig


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
    fig = curves_figure(panels, markers=markers, xlabel=xlabel, n_cols=n_cols, title=title)
    return save_figure(fig, path)


def tradeoff_figure(paths: Mapping[str, TradeoffPath], *, title: str | None = None) -> Figure:
    """The figure of :func:`tradeoff_plot` (same arguments but ``path``).

    Returns:
        The figure, one axes.

    Raises:
        ValueError: no arms, or an arm whose three sequences differ in length.
    """
    if not paths:
        raise ValueError("tradeoff_plot needs at least one arm")
    for arm, (ece, acc, stages) in paths.items():
        if not len(ece) == len(acc) == len(stages):
            raise ValueError(
                f"arm {arm!r}: ece, accuracy and stages differ in length ({len(ece)}, {len(acc)}, {len(stages)})")
    colours = _arm_colours(paths)
    fig, (ax,) = grid_figure(1)
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
        labelled: list[tuple[float, float]] = []
        near = 0.02 * max(np.ptp(x), np.ptp(y), 1e-9)  # a label within this of an earlier one would overprint it
        for i, (xi, yi, name) in enumerate(zip(x, y, names, strict=True)):
            if i == len(names) - 1 or all(abs(xi - a) > near or abs(yi - b) > near for a, b in labelled):
                last = i == len(names) - 1 and len(names) > 1
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, -10) if last else (4, 4), fontsize=7,
                            color=colours[arm])
                labelled.append((xi, yi))
    ax.set_xlabel("ECE (lower is better)")
    ax.set_ylabel("accuracy (higher is better)")
    ax.set_title(title or "Accuracy vs ECE over training", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=7)
    else:  # e.g. no well-formed answer anywhere, so no ECE
        ax.text(0.5, 0.5, "no finite (ECE, accuracy) point", ha="center", va="center", transform=ax.transAxes,
                color="grey")
    return fig


def tradeoff_plot(paths: Mapping[str, TradeoffPath], path: str | Path, *, title: str | None = None) -> Path:
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
    return save_figure(tradeoff_figure(paths, title=title), path)
