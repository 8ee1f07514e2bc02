"""``calibrl-compare``: tables, curves, trade-off plot, reliability diagrams and an HTML report
that compare the arms of an experiment, each arm over its seeds.

Usage::

    calibrl-compare RUN_DIR... [--out DIR] [--by KEY]... [--allow-partial]
    calibrl-compare --wandb ENTITY/PROJECT --group G [--wandb-report] [--out DIR] [--by KEY]...

**Runs.** A local run is a ``calibrl-train`` run directory: ``config_resolved.yaml`` and
``metrics.jsonl`` are required, the per-sample predictions ``eval_<stage>.jsonl`` are used where
present. ``--wandb ENTITY/PROJECT --group G`` reads every run of that W&B group instead, through
``wandb.Api()`` (config, summary, ``scan_history``), into the same in-memory :class:`Run`; W&B
has no per-sample predictions, so those runs have no bootstrap intervals (cells show ``mean ±
std`` only), no ``confidence_std`` and no reliability diagrams (the report says so). Without
network or API key it fails with a one-line error and exit code 2.

**Arms.** Runs are grouped into arms by the values of ``--by`` keys of their config (dotted keys,
repeatable; default ``experiment_name``, whose value is then the arm label as is; otherwise the
label is ``key=value, ...``, e.g. ``reward.weights.brier=0.25``). Each run of an arm is one seed
(``config.seed``). A run whose config lacks a ``--by`` key, and an arm with one seed twice, are
errors naming the runs.

**Eval points.** The ``eval/<dataset>/*`` records of the metrics file, in order: ``raw`` and
``start``/``sft`` before RL (RL step 0), ``step<N>`` after RL step N (``trainer.eval_every``),
``final`` last, once the run has finished. A point's metrics are computed from its predictions
file when there is one (:mod:`calibrl.metrics`, the functions training uses), else taken from the
logged scalars. With several eval datasets in one run, ``--dataset`` picks one.

**Tables** (Markdown and CSV, printed too). Columns (:data:`COLUMNS`): accuracy and format rate
over all samples (a format failure is wrong); ECE (10 uniform bins, ``sum_b n_b/N |acc_b -
conf_b|``, Guo et al. 2017, arXiv:1706.04599), Brier score (``mean (q - c)^2``, Brier 1950),
AUROC (correct vs wrong ranked by confidence, Hanley & McNeil 1982), mean and std of the stated
confidence over the well-formed samples. Each cell is ``mean ± std`` over the arm's seeds (std
with ``ddof=1``; ``±`` omitted for one seed) followed by ``[low, high]``, the 95%
percentile-bootstrap interval (Efron & Tibshirani 1993) of the metric on the arm's pooled samples
(all seeds together, resampled by sample: it reflects the finite eval set, not seed-to-seed
variation, which the std shows); no interval without predictions.

- ``comparison.md`` / ``.csv``: the ``--stage`` eval (default ``final``).
- ``comparison_best.md`` / ``.csv``: per seed, the best value of each metric over the run's eval
  points after RL started (RL step > 0: the raw and post-SFT evals are every arm's starting
  point, not its result), then aggregated as above. Directions (:data:`BEST`): accuracy, format rate and AUROC
  are maximised, ECE and Brier minimised; confidence mean/std have no better direction and no
  best. Ties go to the earliest point. ``<metric>_at`` (CSV) names each seed's best point. The
  interval pools each seed's samples at its best point, so it is conditional on that selection
  (optimistic, like the best value itself).
- ``runs.csv``: one row per run: final and best values and where the best was.

**Figures** (PNG, Agg, :mod:`calibrl.eval.plots`). ``curves.png``: accuracy, ECE, Brier, AUROC and mean
confidence over RL steps from the per-step ``train/*`` records (rollouts of the training batch),
one line per arm (seed mean, min–max band over seeds), the eval points as markers (held-out set,
seed mean with min–max bars). ``tradeoff.png``: each arm's seed-mean path through the
accuracy-vs-ECE plane over its eval points (raw/sft → ... → final). ``reliability_<stage>.png``:
one reliability diagram per arm (DeGroot & Fienberg 1983; Niculescu-Mizil & Caruana 2005), the
``--stage`` predictions of all seeds pooled, well-formed samples only.

**Report.** ``report.html``: one self-contained page with all tables (HTML) and figures (base64
PNG); no scripts, no network (:mod:`calibrl.report.html`).

**Unfinished runs.** A run without the ``--stage`` eval (no ``eval_final.jsonl`` locally, no
``final/*`` summary on W&B) is an error unless ``--allow-partial``: then it contributes to the
curves and the trade-off plot only, and the report lists it as excluded from the tables and
reliability diagrams.

**W&B report.** ``--wandb-report`` also creates a W&B Report (line plots of ``train/*`` over
``train/rl_step``, runs of the group grouped by the ``--by`` config keys) when the optional
package ``wandb_workspaces`` is importable (``pip install wandb-workspaces``); without it, it
prints how to group the runs in the W&B UI.

Errors: unusable input raises :class:`CompareError` (the CLI prints it on one line and exits 2).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from calibrl.metrics import auroc, bootstrap_ci, brier_score, expected_calibration_error
from calibrl.eval.plots import Band, curves_grid, reliability_grid, tradeoff_plot
from calibrl.report.html import Section, render_report

__all__ = [
    "BEST",
    "COLUMNS",
    "CURVE_METRICS",
    "CompareError",
    "EvalPoint",
    "Run",
    "WandbUnavailable",
    "compare",
    "compare_best",
    "eval_curves",
    "group_runs",
    "load_run",
    "load_wandb_runs",
    "main",
    "runs_table",
    "to_markdown",
    "train_curves",
    "wandb_report",
    "write_comparison",
]

# accuracy and format rate are over all samples; the rest over the well-formed ones
COLUMNS = ("accuracy", "format_rate", "ece", "brier", "auroc", "confidence_mean", "confidence_std")
# the direction in which a metric is better, for the best-over-eval-points table
BEST = {"accuracy": "max", "format_rate": "max", "ece": "min", "brier": "min", "auroc": "max"}
# per-step training metrics drawn as curves (``train/<metric>``), also the eval markers
CURVE_METRICS = ("accuracy", "ece", "brier", "auroc", "confidence_mean")
DEFAULT_BY = ("experiment_name",)
# stages evaluated before the first RL step, in the order a run evaluates them
ZERO_STAGES = ("raw", "start", "sft")

_WELL_FORMED = {
    "ece": expected_calibration_error,
    "brier": brier_score,
    "auroc": auroc,
    "confidence_mean": lambda q, c: float(np.mean(q)),
    "confidence_std": lambda q, c: float(np.std(q)),
}
_MISSING = object()
_WANDB_UI_HOWTO = (
    "wandb_workspaces is not installed (pip install wandb-workspaces), so no W&B Report was created. "
    "In the W&B UI: open project {path}, filter the runs table by Group = {group}, click 'Group' and "
    "choose the config keys {keys}; line plots of train/accuracy, train/ece, train/brier, train/auroc "
    "and train/confidence_mean with x-axis train/rl_step then show one line per arm (edit panel -> "
    "Grouping -> range: min/max for the seed band)."
)


class CompareError(ValueError):
    """Input calibrl-compare cannot use; the message names the run (or W&B path) and the problem."""


class WandbUnavailable(CompareError):
    """The W&B API could not be used: no network, no API key, or access refused."""


def _metrics(rows: list[dict]) -> dict[str, float]:
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    ok = np.array([r["format_ok"] for r in rows], dtype=bool)
    out = {"accuracy": float(correct.mean()), "format_rate": float(ok.mean())}
    q = np.array([r["confidence"] for r in rows if r["format_ok"]], dtype=np.float64)
    for name, fn in _WELL_FORMED.items():
        out[name] = fn(q, correct[ok]) if ok.any() else math.nan
    return out


@dataclass(frozen=True, eq=False)
class EvalPoint:
    """One held-out eval of a run.

    Attributes:
        stage: ``raw``, ``start`` or ``sft`` (before RL), ``step<N>`` (after RL step N), ``final``.
        rl_step: RL steps done when it ran (0 before RL).
        logged: its logged ``eval/<dataset>/<metric>`` scalars, by metric name.
        rows: its per-sample predictions (``eval_<stage>.jsonl`` rows with ``confidence``,
            ``correct``, ``format_ok``), None where not available (W&B).
    """

    stage: str
    rl_step: int
    logged: dict[str, float]
    rows: list[dict] | None = None

    @cached_property
    def values(self) -> dict[str, float]:
        """:data:`COLUMNS` values in [0, 1]: from ``rows`` when present, else from ``logged``
        (NaN where not logged, e.g. ``confidence_std``, or with no well-formed sample)."""
        if self.rows is not None:
            return _metrics(self.rows)
        return {c: self.logged.get(c, math.nan) for c in COLUMNS}


@dataclass(frozen=True, eq=False)
class Run:
    """One training run (one seed of an arm), from a run directory or from W&B.

    Attributes:
        name: where it came from: the run directory, or ``wandb:ENTITY/PROJECT/RUN_ID``.
        config: its resolved config.
        seed: ``config.seed``.
        dataset: its eval set (the ``<dataset>`` of ``eval/<dataset>/*``); None without evals.
        train: ``{"rl_step": int [T], metric: float [T] per metric of CURVE_METRICS}`` from the
            per-step ``train/*`` records, ordered by RL step; NaN where a record lacks a metric.
        evals: its eval points in run order.
        finished: whether it reached its final eval.
    """

    name: str
    config: DictConfig
    seed: int
    dataset: str | None
    train: dict[str, np.ndarray]
    evals: list[EvalPoint]
    finished: bool

    def point(self, stage: str) -> EvalPoint | None:
        """The first eval point of ``stage``, None if the run has none."""
        return next((p for p in self.evals if p.stage == stage), None)


def _number(value: Any) -> float | None:
    """A logged scalar as float (JSON ``NaN``/``Infinity`` included); None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value)
    return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise CompareError(f"{path}:{i}: not a JSON line ({err.msg})") from None
    return rows


def _read_predictions(path: Path) -> list[dict]:
    rows = _read_jsonl(path)
    for i, row in enumerate(rows, 1):
        if missing := {"confidence", "correct", "format_ok"} - row.keys():
            raise CompareError(f"{path}: row {i} lacks {', '.join(sorted(missing))} (not calibrl predictions?)")
        q = row["confidence"]
        if row["format_ok"] and not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
            raise CompareError(f"{path}: row {i} is well-formed but its confidence {q!r} is not in [0, 1]")
    if not rows:
        raise CompareError(f"{path}: no predictions")
    return rows


def _select(config: DictConfig, key: str, run: str) -> Any:
    """The value at a dotted key (or a flat key with dots, as a flattened W&B config may hold)."""
    value = OmegaConf.select(config, key, default=_MISSING)
    if value is _MISSING and key in config:
        value = config[key]
    if value is _MISSING:
        raise CompareError(f"{run}: config has no key {key!r}")
    if OmegaConf.is_config(value):
        raise CompareError(f"{run}: config key {key!r} is a section, not a value")
    return value


def _parse_records(
    records: Iterable[dict], name: str, dataset: str | None
) -> tuple[dict[str, np.ndarray], list[tuple[int, dict[str, float]]], str | None]:
    """Training records by RL step and eval records (with the RL step they follow) of one dataset.

    A record is a training record when it has ``train/rl_step``; it is (also) an eval record
    when it has ``eval/<dataset>/<metric>`` keys (deeper keys such as slices are ignored). The
    last record of an RL step wins (a resumed run never repeats one; this only guards).
    """
    rl_step = 0
    train: dict[int, dict[str, float]] = {}
    evals: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for rec in records:
        if (rl := _number(rec.get("train/rl_step"))) is not None:
            rl_step = int(rl)
            values = {m: _number(rec.get(f"train/{m}")) for m in CURVE_METRICS}
            train[rl_step] = {m: math.nan if v is None else v for m, v in values.items()}
        found: dict[str, dict[str, float]] = {}
        for key, value in rec.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and (v := _number(value)) is not None:
                found.setdefault(parts[1], {})[parts[2]] = v
        for ds, values in found.items():
            evals.setdefault(ds, []).append((rl_step, values))
    if dataset is None and len(evals) > 1:
        raise CompareError(
            f"{name}: eval records of several datasets ({', '.join(sorted(evals))}); choose one with --dataset")
    if dataset is not None and evals and dataset not in evals:
        raise CompareError(f"{name}: no eval records of dataset {dataset!r} (found: {', '.join(sorted(evals))})")
    dataset = dataset if dataset is not None else next(iter(evals), None)
    steps = sorted(train)
    arrays = {"rl_step": np.array(steps, dtype=np.int64)}
    arrays |= {m: np.array([train[s][m] for s in steps], dtype=np.float64) for m in CURVE_METRICS}
    return arrays, evals.get(dataset, []), dataset


def _make_run(
    name: str,
    config: DictConfig,
    records: Iterable[dict],
    *,
    zero_stages: Sequence[str],
    finished: bool,
    dataset: str | None,
    predictions: Callable[[str], list[dict] | None],
) -> Run:
    """Label the eval records with their stages and attach predictions (shared by both sources).

    The last eval of a finished run is ``final``; an eval after RL step N is ``step<N>``; the evals
    before RL take the names ``zero_stages`` in order when their count matches, else ``step0``.
    """
    seed = _select(config, "seed", name)
    train, points, dataset = _parse_records(records, name, dataset)
    if finished and not points:
        raise CompareError(f"{name}: finished, but its metrics hold no eval/<dataset>/* record")
    n_zero = sum(rl == 0 for rl, _ in points[: len(points) - int(finished)])
    zero = iter(zero_stages if len(zero_stages) == n_zero else ["step0"] * n_zero)
    evals = []
    for i, (rl, logged) in enumerate(points):
        stage = "final" if finished and i == len(points) - 1 else f"step{rl}" if rl > 0 else next(zero)
        evals.append(EvalPoint(stage, rl, logged, predictions(stage)))
    return Run(name, config, int(seed), dataset, train, evals, finished)


def load_run(run_dir: str | Path, dataset: str | None = None) -> Run:
    """Read one ``calibrl-train`` run directory.

    Args:
        run_dir: the run directory (``config_resolved.yaml``, ``metrics.jsonl``, optional
            ``eval_<stage>.jsonl`` predictions; finished when ``eval_final.jsonl`` exists).
        dataset: eval dataset to read, required only when the run evaluated several.

    Raises:
        CompareError: not a directory, a required file missing, a ``calibrl-eval`` output
            directory (``eval.json``, no ``eval_<stage>.jsonl``), a line that is not JSON, a
            predictions row without ``confidence``/``correct``/``format_ok`` or well-formed with a
            confidence outside [0, 1], no ``seed`` in the config, an ambiguous or absent
            ``dataset``.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise CompareError(f"{d}: not a directory")
    for name in ("config_resolved.yaml", "metrics.jsonl"):
        if not (d / name).is_file():
            raise CompareError(f"{d}: no {name} (not a calibrl-train run directory?)")
    if (d / "eval.json").is_file() and not any(d.glob("eval_*.jsonl")):
        raise CompareError(f"{d}: a calibrl-eval output (eval.json), not a calibrl-train run directory")

    def predictions(stage: str) -> list[dict] | None:
        path = d / f"eval_{stage}.jsonl"
        return _read_predictions(path) if path.is_file() else None

    return _make_run(
        str(d), OmegaConf.load(d / "config_resolved.yaml"), _read_jsonl(d / "metrics.jsonl"),
        zero_stages=[s for s in ZERO_STAGES if (d / f"eval_{s}.jsonl").is_file()],
        finished=(d / "eval_final.jsonl").is_file(), dataset=dataset, predictions=predictions,
    )


def load_wandb_runs(path: str, group: str, dataset: str | None = None, api: Any = None) -> list[Run]:
    """Read every run of a W&B group into :class:`Run` objects (no predictions: ``rows`` is None).

    A run is finished when its summary has ``final/accuracy`` (set by ``calibrl-train`` after the
    final eval). History rows (``scan_history``) play the part of the metrics file; W&B merges the
    records logged at one step into one row, which the parser reads as training then eval. Stages
    before RL are named from the config (``eval.raw_model`` -> ``raw``, then ``sft`` if
    ``trainer.sft.enabled`` else ``start``). Two evals logged at one step (``raw`` and ``start``
    of a run without SFT, both at step 0) reach W&B as one row, the later values winning; that
    point is then named ``step0``.

    Args:
        path: ``ENTITY/PROJECT``.
        group: the W&B run group (``logger.group``).
        dataset: as in :func:`load_run`.
        api: a ``wandb.Api``-like object (tests pass a fake); default ``wandb.Api(timeout=30)``.

    Raises:
        CompareError: ``path`` not ``ENTITY/PROJECT``, no run in the group, or a run as in
            :func:`load_run`.
        WandbUnavailable: the API failed (no network, no API key, access refused).
    """
    import wandb  # imported here: it is slow to import and only this source needs it

    if path.count("/") != 1 or not all(path.split("/")):
        raise CompareError(f"--wandb takes ENTITY/PROJECT, got {path!r}")
    try:
        api = api if api is not None else wandb.Api(timeout=30)
        found = list(api.runs(path, filters={"group": group}))
        raw = [(r, dict(r.config), dict(r.summary_metrics), list(r.scan_history())) for r in found]
    except (wandb.errors.Error, OSError) as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise WandbUnavailable(
            f"W&B API unavailable for {path} (group {group!r}): {type(err).__name__}: {reason}") from None
    if not raw:
        raise CompareError(f"no W&B runs in {path} with group {group!r}")
    runs = []
    for r, config, summary, history in raw:
        cfg = OmegaConf.create({k: v for k, v in config.items() if not k.startswith("_")})
        name = f"wandb:{path}/{r.id}"
        zero = (["raw"] if OmegaConf.select(cfg, "eval.raw_model") else []) + [
            "sft" if OmegaConf.select(cfg, "trainer.sft.enabled") else "start"
        ]
        records = ({k: v for k, v in row.items() if not k.startswith("_")} for row in history)
        runs.append(_make_run(
            name, cfg, records, zero_stages=zero, finished=summary.get("final/accuracy") is not None,
            dataset=dataset, predictions=lambda stage: None,
        ))
    return runs


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
        groups.setdefault(tuple(_select(run.config, key, run.name) for key in by), []).append(run)
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
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    ok = np.array([r["format_ok"] for r in rows], dtype=np.float64)
    # accuracy and format rate are over all rows; their confidence argument is unused (zeros)
    out = {k: bootstrap_ci(np.zeros(len(rows)), v, {k: lambda _q, c: float(np.mean(c))},
                           n_resamples=n_resamples, seed=seed)[k]
           for k, v in (("accuracy", correct), ("format_rate", ok))}
    if ok.any():
        q = np.array([r["confidence"] for r in rows if r["format_ok"]], dtype=np.float64)
        out |= bootstrap_ci(q, correct[ok == 1], _WELL_FORMED, n_resamples=n_resamples, seed=seed)
    return {k: (out[k]["ci_low"], out[k]["ci_high"]) if k in out else (math.nan, math.nan) for k in COLUMNS}


def _pooled_ci_of(points: Sequence[EvalPoint], n_resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """Pooled interval of the points' predictions; NaN intervals when any point has none."""
    if any(p.rows is None for p in points):
        return dict.fromkeys(COLUMNS, (math.nan, math.nan))
    return _pooled_ci([r for p in points for r in p.rows], n_resamples, seed)


def _table_row(arm: str, runs: Sequence[Run], per_seed: Sequence[Mapping[str, float]],
               ci: Mapping[str, tuple[float, float]], columns: Iterable[str]) -> dict:
    row: dict = {"arm": arm, "seeds": " ".join(str(r.seed) for r in runs)}
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
    """One row per arm of the ``stage`` eval: ``arm``, ``seeds`` (space-separated), and per column
    of :data:`COLUMNS` ``<col>_mean``, ``<col>_std`` (NaN for one seed), ``<col>_ci_low``,
    ``<col>_ci_high`` (pooled bootstrap, NaN without predictions; see the module docstring).

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


def compare_best(arms: Mapping[str, Sequence[Run]], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per arm of the best eval values: per metric of :data:`BEST`, each seed's best value
    over its eval points, aggregated as in :func:`compare` (``<m>_mean``, ``<m>_std``,
    ``<m>_ci_low``, ``<m>_ci_high``), and ``<m>_at``: each seed's best stage (``-`` when the run
    has no finite value). The interval pools each seed's predictions at its best point.
    """
    table = []
    for arm, runs in arms.items():
        best = [{m: _best_point(r, m) for m in BEST} for r in runs]
        per_seed = [{m: b[m].values[m] if b[m] else math.nan for m in BEST} for b in best]
        cis: dict[tuple, dict[str, tuple[float, float]]] = {}  # one bootstrap per distinct set of points
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
        row = _table_row(arm, runs, per_seed, ci, BEST)
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


def _aggregate(series: Sequence[Mapping[Any, float]], keys: Sequence[Any]) -> tuple[np.ndarray, ...]:
    """Seed mean, min, max and count of finite values at each key; ``[S, K]`` -> ``[K]`` each."""
    v = np.array([[s.get(k, math.nan) for k in keys] for s in series], dtype=np.float64)  # [seed, key]
    finite = np.isfinite(v)
    n = finite.sum(axis=0)
    safe = np.where(n > 0, n, 1)
    mean = np.where(n > 0, np.where(finite, v, 0.0).sum(axis=0) / safe, np.nan)
    low = np.where(n > 0, np.where(finite, v, np.inf).min(axis=0), np.nan)
    high = np.where(n > 0, np.where(finite, v, -np.inf).max(axis=0), np.nan)
    return mean, low, high, n


def train_curves(arms: Mapping[str, Sequence[Run]], metric: str) -> dict[str, Band]:
    """Per arm, ``train/<metric>`` over RL steps: x is the union of its seeds' steps; mean, min and
    max over the seeds with a finite value there (NaN where none). Arms without training records
    are left out.

    Raises:
        ValueError: ``metric`` not in :data:`CURVE_METRICS`.
    """
    if metric not in CURVE_METRICS:
        raise ValueError(f"unknown curve metric {metric!r}; valid: {', '.join(CURVE_METRICS)}")
    out = {}
    for arm, runs in arms.items():
        series = [dict(zip(r.train["rl_step"].tolist(), r.train[metric].tolist(), strict=True)) for r in runs]
        steps = sorted(set().union(*series))
        if steps:
            out[arm] = Band(np.array(steps, dtype=np.float64), *_aggregate(series, steps))
    return out


def eval_curves(arms: Mapping[str, Sequence[Run]], metric: str) -> dict[str, tuple[Band, list[str]]]:
    """Per arm, a metric of :data:`COLUMNS` over its eval points, seeds aligned by (RL step, order
    among the evals at that step): ``(Band with x = RL step, stage label of each point)``. Arms
    without eval points are left out.

    Raises:
        ValueError: ``metric`` not in :data:`COLUMNS`.
    """
    if metric not in COLUMNS:
        raise ValueError(f"unknown eval metric {metric!r}; valid: {', '.join(COLUMNS)}")
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
        keys = sorted(set().union(*series))
        if keys:
            band = Band(np.array([k[0] for k in keys], dtype=np.float64), *_aggregate(series, keys))
            out[arm] = (band, [stages[k] for k in keys])
    return out


def _cell(row: Mapping[str, Any], col: str) -> str:
    std = "" if math.isnan(row[f"{col}_std"]) else f" ± {row[f'{col}_std']:.3f}"
    low, high = row[f"{col}_ci_low"], row[f"{col}_ci_high"]
    ci = "" if math.isnan(low) and math.isnan(high) else f" [{low:.3f}, {high:.3f}]"
    return f"{row[f'{col}_mean']:.3f}{std}{ci}"


def _formatted(table: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and text rows (``mean ± std [ci_low, ci_high]`` cells) of an arm table."""
    return ["arm", "seeds", *columns], [[r["arm"], r["seeds"], *(_cell(r, c) for c in columns)] for r in table]


def to_markdown(table: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """An arm table as Markdown (``mean ± std [ci_low, ci_high]`` cells)."""
    header, rows = _formatted(table, columns)
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


_Part = tuple[list[Section], list[Path]]  # report sections and the files written for them


def _runs_part(arms: Mapping[str, Sequence[Run]], stage: str, source: str, out: Path) -> _Part:
    runs = runs_table(arms, stage)
    notes = ([f"Source: {source}."] if source else []) + [
        f"{r.name}: no {stage} eval (unfinished run): in the curves only"
        for members in arms.values() for r in members if not r.point(stage)
    ]
    table = ("", list(runs[0]), [[_text(v) for v in r.values()] for r in runs])
    return [Section("Runs", notes=notes, tables=[table])], [_write_csv(out / "runs.csv", runs)]


def _tables_part(done: Mapping[str, Sequence[Run]], stage: str, n_resamples: int, seed: int, out: Path) -> _Part:
    if not done:
        return [Section("Tables", notes=[f"No run has a {stage} eval: no tables."])], []
    final, best = compare(done, stage, n_resamples, seed), compare_best(done, n_resamples, seed)
    files = []
    for stem, table, cols in (("comparison", final, COLUMNS), ("comparison_best", best, tuple(BEST))):
        (out / f"{stem}.md").write_text(to_markdown(table, cols))
        files += [out / f"{stem}.md", _write_csv(out / f"{stem}.csv", table)]
    cells = ("Cells: mean ± std over seeds [95% percentile-bootstrap interval on the pooled samples]; no interval "
             "where per-sample predictions are not available (W&B); accuracy and format rate over all samples, "
             "the rest over the well-formed ones.")
    best_note = ("Per seed, the best value over the run's eval points (max accuracy, format rate and AUROC; min ECE "
                 "and Brier), then aggregated; the interval pools each seed's samples at its best point, so it is "
                 "conditional on that selection. Where each best was: the Runs table.")
    return [
        Section(f"{stage} eval", notes=[cells], tables=[("", *_formatted(final, COLUMNS))]),
        Section("Best eval", notes=[best_note], tables=[("", *_formatted(best, tuple(BEST)))]),
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
        arms: ``{label: runs}`` from :func:`group_runs`.
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


def wandb_report(path: str, group: str, by: Sequence[str]) -> str:
    """Create a W&B Report of a group (line plots of :data:`CURVE_METRICS` over ``train/rl_step``,
    runs grouped by the ``by`` config keys) and return its URL.

    Raises:
        ImportError: ``wandb_workspaces`` is not installed.
    """
    import wandb_workspaces.reports.v2 as wr

    entity, project = path.split("/")
    runset = wr.Runset(entity=entity, project=project, name=group, filters=f"Metric('group') == {group!r}",
                       groupby=[f"config.{k}" for k in by])
    panels = [wr.LinePlot(x="train/rl_step", y=[f"train/{m}"], title=f"train/{m}") for m in CURVE_METRICS]
    report = wr.Report(entity=entity, project=project, title=f"calibrl-compare: {group}",
                       description=f"Arms by {', '.join(by)}; mean over seeds.",
                       blocks=[wr.PanelGrid(runsets=[runset], panels=panels)])
    report.save()
    return report.url


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry (``calibrl-compare``); exit code 2 on unusable input (one-line error)."""
    parser = argparse.ArgumentParser(prog="calibrl-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", type=Path, help="calibrl-train run directories")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs of --group from W&B instead")
    parser.add_argument("--group", help="W&B run group (logger.group) with --wandb")
    parser.add_argument("--wandb-report", action="store_true", help="also create a W&B Report (needs wandb_workspaces)")
    parser.add_argument("--by", action="append", metavar="KEY",
                        help="dotted config key that defines an arm (repeatable; default experiment_name)")
    parser.add_argument("--dataset", help="eval dataset, when runs evaluated several")
    parser.add_argument("--allow-partial", action="store_true",
                        help="admit runs without the --stage eval: curves and trade-off plot only")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder")
    parser.add_argument("--stage", default="final", help="eval stage of the main table (final, sft, step<N>, ...)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    if bool(args.run_dirs) == bool(args.wandb):
        parser.error("give run directories, or --wandb ENTITY/PROJECT --group G (not both)")
    if args.wandb and not args.group:
        parser.error("--wandb needs --group")
    if args.wandb_report and not args.wandb:
        parser.error("--wandb-report needs --wandb")
    by = tuple(args.by or DEFAULT_BY)
    try:
        if args.wandb:
            runs, source = load_wandb_runs(args.wandb, args.group, args.dataset), f"W&B {args.wandb}, group {args.group}"
        else:
            runs, source = [load_run(d, args.dataset) for d in args.run_dirs], "local run directories"
        if not args.allow_partial and (partial := [r for r in runs if not r.point(args.stage)]):
            raise CompareError(
                f"{partial[0].name}: no {args.stage} eval (no eval_{args.stage}.jsonl / {args.stage} eval record; "
                f"{len(partial)} such run(s)): unfinished? --allow-partial admits them to the curves only")
        written = write_comparison(group_runs(runs, by), args.out, stage=args.stage, n_resamples=args.n_bootstrap,
                                   seed=args.seed, source=source)
    except CompareError as err:
        print(f"calibrl-compare: {err}", file=sys.stderr)
        sys.exit(2)
    for name, heading in (("comparison.md", f"{args.stage} eval"), ("comparison_best.md", "best eval")):
        if name in written:
            print(f"{heading}:\n{written[name].read_text()}")
    print("written: " + ", ".join(str(p) for p in written.values()))
    if args.wandb_report:
        import wandb

        try:
            print(f"W&B report: {wandb_report(args.wandb, args.group, by)}")
        except ImportError:
            print(_WANDB_UI_HOWTO.format(path=args.wandb, group=args.group, keys=", ".join(by)))
        except (wandb.errors.Error, OSError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [""])[0]
            print(f"calibrl-compare: W&B report not created: {type(err).__name__}: {reason}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
