"""Runs for ``calibrl-compare``: run directories and W&B groups read into typed run records.

**Runs.** A local run is a ``calibrl-train`` run directory (:func:`load_run`):
``config_resolved.yaml`` and ``metrics.jsonl`` are required, the per-sample predictions
``eval_<stage>.jsonl`` are used where present. :func:`load_wandb_runs` reads every run of a W&B
group instead, through ``wandb.Api()`` (config, summary, ``scan_history``), into the same
:class:`Run`; W&B has no per-sample predictions, so those runs have no bootstrap intervals, no
``confidence_std`` and no reliability diagrams. Without network or API key it raises
:class:`WandbUnavailable`.

**Eval points** (:class:`EvalPoint`). The ``eval/<dataset>/*`` records of the metrics file, in
order: ``raw``, ``start``/``sft`` and ``self_label`` before RL (RL step 0), ``step<N>`` after RL
step N (``trainer.eval_every``), ``final`` last, once the run has finished. A point's metrics
(:data:`COLUMNS`) are computed from its predictions when there are any (:mod:`calibrl.metrics`,
the functions training uses), else taken from the logged scalars. With several eval datasets in
one run, ``dataset`` picks one.

Errors: unusable input raises :class:`CompareError`, whose message names the run (or W&B path)
and the problem.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from calibrl.metrics import auroc, brier_score, expected_calibration_error

__all__ = [
    "COLUMNS",
    "CURVE_METRICS",
    "WELL_FORMED_METRICS",
    "CompareError",
    "EvalPoint",
    "Run",
    "WandbUnavailable",
    "config_value",
    "load_run",
    "load_wandb_runs",
    "sample_metrics",
]

# accuracy and format rate are over all samples; the rest over the well-formed ones
COLUMNS = ("accuracy", "format_rate", "ece", "brier", "auroc", "confidence_mean", "confidence_std")
# per-step training metrics drawn as curves (``train/<metric>``), also the eval markers
CURVE_METRICS = ("accuracy", "ece", "brier", "auroc", "confidence_mean")
# stages evaluated before the first RL step, in the order a run evaluates them
ZERO_STAGES = ("raw", "start", "sft", "self_label")
# ``(confidence [M], correct [M]) -> value`` over the M well-formed samples: ECE with 10 uniform
# bins (``sum_b n_b/N |acc_b - conf_b|``, Guo et al. 2017, arXiv:1706.04599), Brier score
# (``mean (q - c)^2``, Brier 1950), AUROC (correct vs wrong ranked by confidence, Hanley & McNeil
# 1982), mean and std of the stated confidence.
WELL_FORMED_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ece": expected_calibration_error,
    "brier": brier_score,
    "auroc": auroc,
    "confidence_mean": lambda q, c: float(np.mean(q)),
    "confidence_std": lambda q, c: float(np.std(q)),
}
_MISSING = object()


class CompareError(ValueError):
    """Input calibrl-compare cannot use; the message names the run (or W&B path) and the problem."""


class WandbUnavailable(CompareError):
    """The W&B API could not be used: no network, no API key, or access refused."""


def sample_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """:data:`COLUMNS` of predictions rows (``confidence``, ``correct``, ``format_ok``): accuracy
    and format rate over all rows (a format failure is wrong), :data:`WELL_FORMED_METRICS` over
    the well-formed ones (NaN without one, and AUROC NaN with one class only). Values in [0, 1]."""
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    ok = np.array([r["format_ok"] for r in rows], dtype=bool)
    out = {"accuracy": float(correct.mean()), "format_rate": float(ok.mean())}
    q = np.array([r["confidence"] for r in rows if r["format_ok"]], dtype=np.float64)
    for name, fn in WELL_FORMED_METRICS.items():
        out[name] = fn(q, correct[ok]) if ok.any() else math.nan
    return out


@dataclass(frozen=True, eq=False)
class EvalPoint:
    """One held-out eval of a run.

    Attributes:
        stage: ``raw``, ``start``, ``sft`` or ``self_label`` (before RL), ``step<N>`` (after RL step
            N), ``final``.
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
            return sample_metrics(self.rows)
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


def config_value(config: DictConfig, key: str, run: str) -> Any:
    """The value at a dotted ``key`` of a run's config (or at a flat key with dots, as a flattened
    W&B config may hold).

    Raises:
        CompareError: no such key, or the key is a section; the message names ``run``.
    """
    value = OmegaConf.select(config, key, default=_MISSING)
    if value is _MISSING and key in config:
        value = config[key]
    if value is _MISSING:
        raise CompareError(f"{run}: config has no key {key!r}")
    if OmegaConf.is_config(value):
        raise CompareError(f"{run}: config key {key!r} is a section, not a value")
    return value


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


def _eval_values(rec: dict) -> dict[str, dict[str, float]]:
    """``{dataset: {metric: value}}`` of a record's ``eval/<dataset>/<metric>`` scalars (deeper
    keys, such as slices, are not metrics of the dataset)."""
    found: dict[str, dict[str, float]] = {}
    for key, value in rec.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and (v := _number(value)) is not None:
            found.setdefault(parts[1], {})[parts[2]] = v
    return found


def _parse_records(
    records: Iterable[dict], name: str, dataset: str | None
) -> tuple[dict[str, np.ndarray], list[tuple[int, dict[str, float]]], str | None]:
    """Training records by RL step and eval records (with the RL step they follow) of one dataset.

    A record is a training record when it has ``train/rl_step``; it is (also) an eval record
    when it has ``eval/<dataset>/<metric>`` keys. The last record of an RL step wins (a resumed
    run never repeats one; this only guards).
    """
    rl_step = 0
    train: dict[int, dict[str, float]] = {}
    evals: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for rec in records:
        if (rl := _number(rec.get("train/rl_step"))) is not None:
            rl_step = int(rl)
            values = {m: _number(rec.get(f"train/{m}")) for m in CURVE_METRICS}
            train[rl_step] = {m: math.nan if v is None else v for m, v in values.items()}
        for ds, values in _eval_values(rec).items():
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
    seed = config_value(config, "seed", name)
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


def _fetch_group(path: str, group: str, api: Any) -> list[tuple[Any, dict, dict, list[dict]]]:
    """``(run, config, summary, history rows)`` of every run of the group, all read at once so
    that an API failure surfaces here.

    Raises:
        WandbUnavailable: the API failed.
    """
    import wandb  # imported here: it is slow to import and only this source needs it

    try:
        api = api if api is not None else wandb.Api(timeout=30)
        found = list(api.runs(path, filters={"group": group}))
        return [(r, dict(r.config), dict(r.summary_metrics), list(r.scan_history())) for r in found]
    except (wandb.errors.Error, OSError) as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise WandbUnavailable(
            f"W&B API unavailable for {path} (group {group!r}): {type(err).__name__}: {reason}") from None


def load_wandb_runs(path: str, group: str, dataset: str | None = None, api: Any = None) -> list[Run]:
    """Read every run of a W&B group into :class:`Run` objects (no predictions: ``rows`` is None).

    A run is finished when its summary has ``final/accuracy`` (set by ``calibrl-train`` after the
    final eval). History rows (``scan_history``) play the part of the metrics file; W&B merges the
    records logged at one step into one row, which the parser reads as training then eval. Stages
    before RL are named from the config (``eval.raw_model`` -> ``raw``, then ``sft`` if
    ``trainer.sft.enabled`` else ``start``, then ``self_label`` if ``trainer.self_label.enabled``).
    Two evals logged at one step (``raw`` and ``start`` of a run without SFT, both at step 0) reach
    W&B as one row, the later values winning; that point is then named ``step0``.

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
    if path.count("/") != 1 or not all(path.split("/")):
        raise CompareError(f"--wandb takes ENTITY/PROJECT, got {path!r}")
    raw = _fetch_group(path, group, api)
    if not raw:
        raise CompareError(f"no W&B runs in {path} with group {group!r}")
    runs = []
    for r, config, summary, history in raw:
        cfg = OmegaConf.create({k: v for k, v in config.items() if not k.startswith("_")})
        zero = (["raw"] if OmegaConf.select(cfg, "eval.raw_model") else []) + [
            "sft" if OmegaConf.select(cfg, "trainer.sft.enabled") else "start"
        ] + (["self_label"] if OmegaConf.select(cfg, "trainer.self_label.enabled") else [])
        records = ({k: v for k, v in row.items() if not k.startswith("_")} for row in history)
        runs.append(_make_run(
            f"wandb:{path}/{r.id}", cfg, records, zero_stages=zero,
            finished=summary.get("final/accuracy") is not None, dataset=dataset, predictions=lambda stage: None,
        ))
    return runs
