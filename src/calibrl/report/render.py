"""The files ``calibrl-compare`` writes: tables (Markdown, CSV), figures (PNG) and ``report.html``.

**Tables** (:func:`write_comparison`; rows from :mod:`calibrl.report.aggregate`). Columns
:data:`~calibrl.report.load.COLUMNS`: accuracy and format rate over all samples (a format failure
is wrong), ECE, Brier score, AUROC, mean and std of the stated confidence over the well-formed
samples. Each arm row starts with ``arm``, ``n_seeds`` (how many runs) and ``seed_ids`` (their
``config.seed`` values, space-separated); each cell is ``mean ± std`` over the arm's seeds (``±``
omitted for one seed) followed by ``[low, high]``, the 95% bootstrap interval on the arm's pooled
samples (none without predictions).

- ``comparison.md`` / ``.csv``: the ``stage`` eval (default ``final``).
- ``comparison_best.md`` / ``.csv``: per seed, the best value of each metric over the run's eval
  points after RL started, then aggregated; ``<metric>_at`` (CSV) names each seed's best point.
- ``runs.csv``: one row per run: final and best values and where the best was.

**Figures** (:mod:`calibrl.report.figures`, :mod:`calibrl.eval.plots`). ``curves.png``: accuracy,
ECE, Brier, AUROC and mean confidence over RL steps from the per-step ``train/*`` records
(rollouts of the training batch), one line per arm (seed mean, min–max band over seeds), the eval
points as markers (held-out set, seed mean with min–max bars). ``tradeoff.png``: each arm's
seed-mean path through the accuracy-vs-ECE plane over its eval points (raw/sft → ... → final).
``reliability_<stage>.png``: one reliability diagram per arm (DeGroot & Fienberg 1983;
Niculescu-Mizil & Caruana 2005), the ``stage`` predictions of all seeds pooled, well-formed
samples only.

**Report.** ``report.html``: one self-contained page with all tables (HTML) and figures (base64
PNG); no scripts, no network (:mod:`calibrl.report.html`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibrl.eval.plots import reliability_grid
from calibrl.report.aggregate import BEST, compare, compare_best, eval_curves, runs_table, train_curves
from calibrl.report.figures import curves_grid, tradeoff_plot
from calibrl.report.html import Section, render_report
from calibrl.report.load import COLUMNS, CURVE_METRICS, Run

__all__ = ["table_text", "to_markdown", "write_comparison"]

_Part = tuple[list[Section], list[Path]]  # report sections and the files written for them


def _cell(row: Mapping[str, Any], col: str) -> str:
    std = "" if math.isnan(row[f"{col}_std"]) else f" ± {row[f'{col}_std']:.3f}"
    low, high = row[f"{col}_ci_low"], row[f"{col}_ci_high"]
    ci = "" if math.isnan(low) and math.isnan(high) else f" [{low:.3f}, {high:.3f}]"
    return f"{row[f'{col}_mean']:.3f}{std}{ci}"


def table_text(table: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of an arm table (rows of :func:`~calibrl.report.aggregate.compare`):
    ``arm``, ``n_seeds``, ``seed_ids``, then per column a ``mean ± std [ci_low, ci_high]`` cell
    (3 decimals; ``± std`` omitted where NaN, the interval where both ends are NaN)."""
    header = ["arm", "n_seeds", "seed_ids", *columns]
    return header, [[r["arm"], str(r["n_seeds"]), r["seed_ids"], *(_cell(r, c) for c in columns)] for r in table]


def to_markdown(table: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """An arm table as a Markdown table of :func:`table_text` cells, ending in a newline."""
    header, rows = table_text(table, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _text(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _runs_part(arms: Mapping[str, Sequence[Run]], stage: str, source: str, out: Path) -> _Part:
    runs = runs_table(arms, stage)
    notes = ([f"Source: {source}."] if source else []) + [
        f"{r.name}: no {stage} eval (unfinished run): in the curves only"
        for members in arms.values() for r in members if not r.point(stage)
    ]
    table = ("", list(runs[0]), [[_text(v) for v in r.values()] for r in runs])
    return [Section("Runs", notes=notes, tables=[table])], [_write_csv(out / "runs.csv", runs)]


_CELLS_NOTE = (
    "n_seeds: runs in the arm; seed_ids: their seeds. Cells: mean ± std over seeds [95% percentile-bootstrap "
    "interval on the pooled samples]; no interval where per-sample predictions are not available (W&B); accuracy "
    "and format rate over all samples, the rest over the well-formed ones.")
_BEST_NOTE = (
    "Per seed, the best value over the run's eval points (max accuracy, format rate and AUROC; min ECE and "
    "Brier), then aggregated; the interval pools each seed's samples at its best point, so it is conditional on "
    "that selection. Where each best was: the Runs table.")


def _tables_part(done: Mapping[str, Sequence[Run]], stage: str, n_resamples: int, seed: int, out: Path) -> _Part:
    if not done:
        return [Section("Tables", notes=[f"No run has a {stage} eval: no tables."])], []
    final, best = compare(done, stage, n_resamples, seed), compare_best(done, n_resamples, seed)
    files = []
    for stem, table, cols in (("comparison", final, COLUMNS), ("comparison_best", best, tuple(BEST))):
        (out / f"{stem}.md").write_text(to_markdown(table, cols))
        files += [out / f"{stem}.md", _write_csv(out / f"{stem}.csv", table)]
    return [
        Section(f"{stage} eval", notes=[_CELLS_NOTE], tables=[("", *table_text(final, COLUMNS))]),
        Section("Best eval", notes=[_BEST_NOTE], tables=[("", *table_text(best, tuple(BEST)))]),
    ], files


def _curves_part(arms: Mapping[str, Sequence[Run]], out: Path) -> _Part:
    datasets = ", ".join(sorted({r.dataset for members in arms.values() for r in members if r.dataset}))
    evals = {m: eval_curves(arms, m) for m in CURVE_METRICS}
    curves = curves_grid(
        {m: train_curves(arms, m) for m in CURVE_METRICS}, out / "curves.png",
        markers={m: {arm: band for arm, (band, _) in evals[m].items()} for m in CURVE_METRICS},
        title=f"train/* of the training batch per RL step; held-out eval points ({datasets})",
    )
    sections = [Section("Training curves", images=[(curves, "accuracy, ECE, Brier, AUROC, mean confidence per RL step")])]
    paths = {arm: (ece.mean, evals["accuracy"][arm][0].mean, stages) for arm, (ece, stages) in evals["ece"].items()}
    if not paths:
        return sections + [Section("Accuracy vs ECE", notes=["No eval points: no trade-off plot."])], [curves]
    tradeoff = tradeoff_plot(paths, out / "tradeoff.png")
    note = "Seed means at each eval point, in eval order (circle: first, star: last)."
    return sections + [Section("Accuracy vs ECE", notes=[note], images=[(tradeoff, "accuracy vs ECE path per arm")])], [
        curves, tradeoff]


def _reliability_part(done: Mapping[str, Sequence[Run]], stage: str, out: Path) -> _Part:
    panels, notes = {}, []
    for arm, members in done.items():
        points = [r.point(stage) for r in members]
        if any(p.rows is None for p in points):
            notes.append(f"{arm}: no per-sample predictions (not logged to W&B): no reliability diagram")
            continue
        rows = [row for p in points for row in p.rows if row["format_ok"]]
        if not rows:
            notes.append(f"{arm}: no well-formed prediction: no reliability diagram")
            continue
        q, c = (np.array([r[k] for r in rows], dtype=np.float64) for k in ("confidence", "correct"))
        panels[f"{arm} ({len(members)} seed{'s' * (len(members) > 1)} pooled)"] = (q, c)
    if not panels:
        return [Section("Reliability diagrams", notes=notes)], []
    png = reliability_grid(panels, out / f"reliability_{stage}.png", title=f"{stage} eval, well-formed samples", n_cols=4)
    return [Section("Reliability diagrams", notes=notes, images=[(png, f"{stage} eval per arm")])], [png]


def write_comparison(
    arms: Mapping[str, Sequence[Run]],
    out: str | Path,
    *,
    stage: str = "final",
    n_resamples: int = 1000,
    seed: int = 0,
    source: str = "",
) -> dict[str, Path]:
    """Write the tables, figures and ``report.html`` of the module docstring to ``out``.

    Runs without the ``stage`` eval (admitted with ``--allow-partial``) enter the curves and the
    trade-off plot only; the report lists them. Figures that have no data are skipped with a note
    in the report (e.g. reliability diagrams of W&B runs, which have no predictions).

    Args:
        arms: ``{label: runs}`` from :func:`~calibrl.report.aggregate.group_runs`.
        out: output folder (created).
        stage: eval stage of the main table and the reliability diagrams.
        n_resamples, seed: bootstrap resamples and seed.
        source: where the runs came from, for the report's header.

    Returns:
        ``{file name: path}`` of every file written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {arm: [r for r in runs if r.point(stage)] for arm, runs in arms.items()}
    done = {arm: runs for arm, runs in done.items() if runs}
    parts = [
        _runs_part(arms, stage, source, out),
        _tables_part(done, stage, n_resamples, seed, out),
        _curves_part(arms, out),
        _reliability_part(done, stage, out),
    ]
    intro = [f"{len(arms)} arm(s), {sum(map(len, arms.values()))} run(s)."]
    sections = [section for part_sections, _ in parts for section in part_sections]
    (out / "report.html").write_text(render_report("calibrl-compare", sections, intro))
    return {p.name: p for _, files in parts for p in files} | {"report.html": out / "report.html"}
