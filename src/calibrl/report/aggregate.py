"""Arms of an experiment and their statistics over seeds, from :class:`~calibrl.report.load.Run`
records: the numbers behind ``calibrl-compare``'s tables and curves.

**Arms** (:func:`group_runs`). Runs are grouped into arms by the values of ``by`` keys of their
config (dotted keys; default ``experiment_name``, whose value is then the arm label as is;
otherwise the label is ``key=value, ...``, e.g. ``reward.weights.brier=0.25``). Each run of an
arm is one seed (``config.seed``). A run whose config lacks a ``by`` key, and an arm with one
seed twice, are errors naming the runs.

**Table rows** (:func:`compare`, :func:`compare_best`). Per column, ``<col>_mean`` and
``<col>_std`` over the arm's seeds (std with ``ddof=1``; NaN for one seed), and ``<col>_ci_low``,
``<col>_ci_high``: the 95% percentile-bootstrap interval (Efron & Tibshirani 1993) of the metric
on the arm's pooled samples (all seeds together, resampled by sample: it reflects the finite eval
set, not seed-to-seed variation, which the std shows); NaN without predictions. ``n_seeds``
counts the arm's runs, ``seed_ids`` lists their seeds.

**Best values** (:func:`compare_best`). Per seed, the best value of each metric over the run's
eval points after RL started (RL step > 0: the raw and post-SFT evals are every arm's starting
point, not its result), then aggregated as above. Directions (:data:`BEST`): accuracy, format rate
and AUROC are maximised, ECE and Brier minimised; confidence mean/std have no better direction
and no best. Ties go to the earliest point. The interval pools each seed's samples at its best
point, so it is conditional on that selection (optimistic, like the best value itself).

**Curves** (:func:`train_curves`, :func:`eval_curves`): per arm, a metric over RL steps as a
:class:`Band` (seed mean, min and max).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibrl.metrics import bootstrap_ci
from calibrl.report.load import (
    COLUMNS,
    CURVE_METRICS,
    WELL_FORMED_METRICS,
    CompareError,
    EvalPoint,
    Run,
    config_value,
)

__all__ = [
    "BEST",
    "DEFAULT_BY",
    "Band",
    "compare",
    "compare_best",
    "eval_curves",
    "group_runs",
    "runs_table",
    "train_curves",
]

# the direction in which a metric is better, for the best-over-eval-points table
BEST = {"accuracy": "max", "format_rate": "max", "ece": "min", "brier": "min", "auroc": "max"}
DEFAULT_BY = ("experiment_name",)


@dataclass(frozen=True)
class Band:
    """One arm's curve of one metric, aggregated over its seeds.

    Attributes:
        x: float ``[K]``, positions (RL steps), increasing.
        mean: float ``[K]``, mean over the seeds that have a finite value at ``x[k]``; NaN where none.
        low: float ``[K]``, minimum over those seeds (NaN where none).
        high: float ``[K]``, maximum over those seeds (NaN where none).
        n: int ``[K]``, seeds with a finite value at ``x[k]``.

    Raises:
        ValueError: the arrays are not 1-D of one length.
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


def _sort_key(values: tuple) -> tuple:
    """Numbers before other values, numbers by value, the rest by text."""
    return tuple((0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))
                 for v in values)


def group_runs(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY) -> dict[str, list[Run]]:
    """Group runs into arms: ``{label: [runs sorted by seed]}``, arms sorted by their key values
    (numbers numerically).

    The label is the value itself when ``by`` is the default ``("experiment_name",)``, else
    ``"key=value, key=value"``.

    Raises:
        CompareError: a run whose config lacks a key (message names run and key), or an arm with
            a seed twice.
    """
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(config_value(run.config, key, run.name) for key in by), []).append(run)
    arms = {}
    for values in sorted(groups, key=_sort_key):
        if tuple(by) == DEFAULT_BY:
            label = str(values[0])
        else:
            label = ", ".join(f"{k}={v}" for k, v in zip(by, values, strict=True))
        members = sorted(groups[values], key=lambda r: r.seed)
        for a, b in zip(members, members[1:]):
            if a.seed == b.seed:
                raise CompareError(
                    f"arm {label!r} has seed {a.seed} twice ({a.name}, {b.name}); add a --by key that tells them apart")
        arms[label] = members
    return arms


def _pooled_ci(rows: list[dict], n_resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """``{column: (low, high)}`` of every :data:`COLUMNS` entry on the pooled rows."""
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    ok = np.array([r["format_ok"] for r in rows], dtype=np.float64)
    # accuracy and format rate are over all rows; their confidence argument is unused (zeros)
    out = {k: bootstrap_ci(np.zeros(len(rows)), v, {k: lambda _q, c: float(np.mean(c))},
                           n_resamples=n_resamples, seed=seed)[k]
           for k, v in (("accuracy", correct), ("format_rate", ok))}
    if ok.any():
        q = np.array([r["confidence"] for r in rows if r["format_ok"]], dtype=np.float64)
        out |= bootstrap_ci(q, correct[ok == 1], WELL_FORMED_METRICS, n_resamples=n_resamples, seed=seed)
    return {k: (out[k]["ci_low"], out[k]["ci_high"]) if k in out else (math.nan, math.nan) for k in COLUMNS}


def _pooled_ci_of(points: Sequence[EvalPoint], n_resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Pooled interval of the points' predictions; NaN intervals when any point has none."""
    if any(p.rows is None for p in points):
        return dict.fromkeys(COLUMNS, (math.nan, math.nan))
    return _pooled_ci([r for p in points for r in p.rows], n_resamples, seed)


def _table_row(arm: str, runs: Sequence[Run], per_seed: Sequence[Mapping[str, float]],
               ci: Mapping[str, tuple[float, float]], columns: Iterable[str]) -> dict:
    row: dict = {"arm": arm, "n_seeds": len(runs), "seed_ids": " ".join(str(r.seed) for r in runs)}
    for col in columns:
        values = np.array([m[col] for m in per_seed], dtype=np.float64)
        row[f"{col}_mean"] = float(np.mean(values))
        row[f"{col}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        row[f"{col}_ci_low"], row[f"{col}_ci_high"] = ci[col]
    return row


def _stage_point(run: Run, stage: str) -> EvalPoint:
    point = run.point(stage)
    if point is None:
        raise CompareError(f"{run.name}: no {stage!r} eval (no eval_{stage}.jsonl / {stage} eval record)")
    return point


def compare(
    arms: Mapping[str, Sequence[Run]], stage: str = "final", n_resamples: int = 1000, seed: int = 0
) -> list[dict]:
    """One row per arm of the ``stage`` eval: ``arm``, ``n_seeds`` (int), ``seed_ids``
    (space-separated), and per column of :data:`~calibrl.report.load.COLUMNS` ``<col>_mean``,
    ``<col>_std`` (NaN for one seed), ``<col>_ci_low``, ``<col>_ci_high`` (pooled bootstrap with
    ``n_resamples`` resamples and ``seed``, NaN without predictions; see the module docstring).

    Raises:
        CompareError: a run without that eval.
    """
    table = []
    for arm, runs in arms.items():
        points = [_stage_point(r, stage) for r in runs]
        table.append(_table_row(arm, runs, [p.values for p in points], _pooled_ci_of(points, n_resamples, seed), COLUMNS))
    return table


def _best_point(run: Run, metric: str) -> EvalPoint | None:
    """The eval point after RL started (``rl_step > 0``: the raw and post-SFT evals are the
    starting point, not a result of the arm) with the best finite value of ``metric`` (direction
    :data:`BEST`; ties: earliest); None without one."""
    points = [p for p in run.evals if p.rl_step > 0]
    values = np.array([p.values[metric] for p in points], dtype=np.float64)
    if not np.isfinite(values).any():
        return None
    sign = 1.0 if BEST[metric] == "max" else -1.0
    return points[int(np.argmax(np.where(np.isfinite(values), sign * values, -np.inf)))]


def _best_ci(best: Sequence[Mapping[str, EvalPoint | None]], n_resamples: int, seed: int) -> dict:
    """Per metric of :data:`BEST`, the interval on the seeds' pooled samples at their best points
    (NaN where a seed has none); one bootstrap per distinct set of points."""
    cis: dict[tuple, dict[str, tuple[float, float]]] = {}
    ci = {}
    for m in BEST:
        points = [b[m] for b in best]
        if any(p is None for p in points):
            ci[m] = (math.nan, math.nan)
            continue
        key = tuple(id(p) for p in points)
        if key not in cis:
            cis[key] = _pooled_ci_of(points, n_resamples, seed)
        ci[m] = cis[key][m]
    return ci


def compare_best(arms: Mapping[str, Sequence[Run]], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per arm of the best eval values: ``arm``, ``n_seeds``, ``seed_ids``, and per metric
    of :data:`BEST` each seed's best value over its eval points, aggregated as in :func:`compare`
    (``<m>_mean``, ``<m>_std``, ``<m>_ci_low``, ``<m>_ci_high``), and ``<m>_at``: each seed's best
    stage, space-separated in ``seed_ids`` order (``-`` when the run has no finite value). The
    interval pools each seed's predictions at its best point.
    """
    table = []
    for arm, runs in arms.items():
        best = [{m: _best_point(r, m) for m in BEST} for r in runs]
        per_seed = [{m: b[m].values[m] if b[m] else math.nan for m in BEST} for b in best]
        row = _table_row(arm, runs, per_seed, _best_ci(best, n_resamples, seed), BEST)
        row |= {f"{m}_at": " ".join(b[m].stage if b[m] else "-" for b in best) for m in BEST}
        table.append(row)
    return table


def runs_table(arms: Mapping[str, Sequence[Run]], stage: str = "final") -> list[dict]:
    """One row per run: ``arm``, ``seed``, ``run``, ``evals`` (its stages), ``<stage>_<col>`` per
    column (NaN without that eval), ``best_<m>`` and ``best_<m>_at`` per metric of :data:`BEST`."""
    rows = []
    for arm, runs in arms.items():
        for run in runs:
            point = run.point(stage)
            row = {"arm": arm, "seed": run.seed, "run": run.name, "evals": " ".join(p.stage for p in run.evals)}
            row |= {f"{stage}_{c}": point.values[c] if point else math.nan for c in COLUMNS}
            for m in BEST:
                best = _best_point(run, m)
                row[f"best_{m}"] = best.values[m] if best else math.nan
                row[f"best_{m}_at"] = best.stage if best else "-"
            rows.append(row)
    return rows


def _band(series: Sequence[Mapping[Any, float]], keys: Sequence[Any], x: Sequence[float]) -> Band:
    """Seed mean, min, max and count of finite values at each key (``[S, K]`` -> ``[K]`` each),
    at positions ``x [K]``."""
    v = np.array([[s.get(k, math.nan) for k in keys] for s in series], dtype=np.float64)  # [seed, key]
    finite = np.isfinite(v)
    n = finite.sum(axis=0)
    safe = np.where(n > 0, n, 1)
    mean = np.where(n > 0, np.where(finite, v, 0.0).sum(axis=0) / safe, np.nan)
    low = np.where(n > 0, np.where(finite, v, np.inf).min(axis=0), np.nan)
    high = np.where(n > 0, np.where(finite, v, -np.inf).max(axis=0), np.nan)
    return Band(np.asarray(x, dtype=np.float64), mean, low, high, n)


def _check_metric(metric: str, valid: Sequence[str], kind: str) -> None:
    if metric not in valid:
        raise ValueError(f"unknown {kind} metric {metric!r}; valid: {', '.join(valid)}")


def train_curves(arms: Mapping[str, Sequence[Run]], metric: str) -> dict[str, Band]:
    """Per arm, ``train/<metric>`` over RL steps: x is the union of its seeds' steps; mean, min and
    max over the seeds with a finite value there (NaN where none). Arms without training records
    are left out.

    Raises:
        ValueError: ``metric`` not in :data:`~calibrl.report.load.CURVE_METRICS`.
    """
    _check_metric(metric, CURVE_METRICS, "curve")
    out = {}
    for arm, runs in arms.items():
        series = [dict(zip(r.train["rl_step"].tolist(), r.train[metric].tolist(), strict=True)) for r in runs]
        if steps := sorted(set().union(*series)):
            out[arm] = _band(series, steps, steps)
    return out


def eval_curves(arms: Mapping[str, Sequence[Run]], metric: str) -> dict[str, tuple[Band, list[str]]]:
    """Per arm, a metric of :data:`~calibrl.report.load.COLUMNS` over its eval points, seeds
    aligned by (RL step, order among the evals at that step): ``(Band with x = RL step, stage
    label of each point)``. Arms without eval points are left out.

    Raises:
        ValueError: ``metric`` not in :data:`~calibrl.report.load.COLUMNS`.
    """
    _check_metric(metric, COLUMNS, "eval")
    out = {}
    for arm, runs in arms.items():
        series, stages = [], {}
        for run in runs:
            seen: Counter[int] = Counter()
            values = {}
            for p in run.evals:
                key = (p.rl_step, seen[p.rl_step])
                seen[p.rl_step] += 1
                values[key] = p.values[metric]
                stages.setdefault(key, p.stage)
            series.append(values)
        if keys := sorted(set().union(*series)):
            out[arm] = (_band(series, keys, [k[0] for k in keys]), [stages[k] for k in keys])
    return out
