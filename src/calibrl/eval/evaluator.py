"""Held-out evaluation: generate, score with the training reward path, report calibration.

One evaluator serves both the in-training evals (``trainer.eval_every``, and before/after RL) and
``calibrl-eval``, so for the same checkpoint, settings and seed they produce the same numbers.

Per eval set, ``n_samples`` completions per question are generated (greedy when ``n_samples=1``
and ``do_sample=false``), parsed and verified exactly as in training
(:func:`calibrl.rewards.scoring.score_completions`). Four confidence signals are reported side by side
(:mod:`calibrl.eval.signals`): the stated (``verbalized``) confidence, the answer-token
probability (``answer_prob``) and the lowest sliding-window probability over the reasoning
(``lowest_window_prob``), so a user sees whether training changed what the model *says* or
what it *knows*; and the expected stated confidence over the confidence grid
(``expected_confidence``, with ``eval.grid_step`` set), which shows the stated-confidence
distribution moving before its greedy mode does. ``eval.intrinsic=false`` drops the two
token-probability signals, ``eval.grid_step=null`` the expected one.

Row policy: ``accuracy`` and ``format_rate`` are over all samples (a format failure is wrong).
Calibration metrics of every signal are over the well-formed samples (the only ones that state a
confidence) where that signal is defined, so the signals are compared on the same rows (up to
rows where a signal is undefined, e.g. ``expected_confidence`` on a row whose ``<confidence>`` tag
does not end on a token boundary; each signal's ``n`` counts its rows).

Report layout (``EvalResult.report``, written to ``eval.json`` by ``calibrl-eval`` as strict JSON,
undefined values as ``null``, see :func:`report_json`); every metric is
``{"value", "ci_low", "ci_high", "n_valid"}`` with a seeded percentile bootstrap CI
(:func:`calibrl.metrics.bootstrap_ci`)::

    {"dataset", "n_questions", "n_samples", "accuracy", "format_rate",
     "signals": {signal: {"n": rows, metric: ...}},             # metric names: calibrl.metrics.scalar_metrics
     "slices": {field: {label: {"count", "accuracy", "format_rate", "signals": {signal: {metric: ...}}}}},
     "voting": {method: {"coverage": share, "accuracy", "ece", "brier", "auroc", "confidence_mean"}},  # n_samples > 1
     "abstention": {"rate", "answer_rate", "selective_accuracy", "over", "under", ...}}  # plain numbers

``abstention`` (:func:`calibrl.metrics.abstention_metrics`) is reported when the format has an
abstain phrase or the set has unanswerable items. An abstention is a well-formed row with the
verdict of :func:`calibrl.rewards.scoring.verdict` (wrong on an answerable question, right on an
unanswerable one), so it counts in ``accuracy`` and in the calibration metrics like any answer.

Flat scalars (``EvalResult.scalars()``, logged as ``eval/<dataset>/<key>``): ``accuracy``,
``format_rate``, ``overconfidence`` (mean stated confidence minus accuracy, well-formed rows), every
verbalized metric under its own name (``ece``, ``brier``, ``auroc``, ``confidence_mean``, ...), the
other signals as ``<signal>/<metric>`` (``answer_prob/auroc``, ``expected_confidence/ece``, ...),
per slice ``slice/<label>/<metric>`` (field ``slice``) or ``slice/<field>=<label>/<metric>`` with
``count``, ``accuracy`` and the verbalized metrics, and per voting method
``vote/<method>/<metric>``, and ``abstain/<key>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrl.config import EvalConfig
from calibrl.eval.signals import SIGNALS, confidence_signals, expected_stated_confidence
from calibrl.data.prompts import PromptBuilder
from calibrl.data.example import Example
from calibrl.device import module_device
from calibrl.distributed import DistInfo, gather_objects
from calibrl.metrics import abstention_metrics, bootstrap_ci, metric_report, scalar_metrics
from calibrl.metrics.voting import VOTING_METHODS, aggregate
from calibrl.rewards import RewardFunction
from calibrl.rl.confidence_grid import ConfidenceGrid
from calibrl.rl.rollout import generate_rollout
from calibrl.rewards.scoring import score_completions

__all__ = [
    "EvalResult", "check_eval_config", "check_slice_fields", "evaluate", "report_json", "signal_values", "write_predictions",
]

# Metrics of the voted aggregates (a short list: a vote is already a summary).
VOTE_METRICS = ("ece", "brier", "auroc", "confidence_mean")


def check_eval_config(settings: EvalConfig) -> None:
    """Check the ``eval`` settings (the :class:`calibrl.config.EvalConfig` fields' meaning is
    documented there).

    Raises:
        ValueError: an invalid setting; the message names the ``eval.*`` key.
    """
    s = settings
    problems = [
        (s.batch_size < 1, f"eval.batch_size must be >= 1, got {s.batch_size}"),
        (s.max_new_tokens < 1, f"eval.max_new_tokens must be >= 1, got {s.max_new_tokens}"),
        (s.n_samples < 1, f"eval.n_samples must be >= 1, got {s.n_samples}"),
        (s.n_samples > 1 and not s.do_sample,
         f"eval.n_samples={s.n_samples} needs eval.do_sample=true (greedy samples would all be identical)"),
        (s.do_sample and s.temperature <= 0, f"eval.temperature must be > 0, got {s.temperature}"),
        (s.n_bins < 1, f"eval.n_bins must be >= 1, got {s.n_bins}"),
        (not 0.0 <= s.confident_threshold <= 1.0, f"eval.confident_threshold must be in [0, 1], got {s.confident_threshold}"),
        (s.window < 1, f"eval.window must be >= 1, got {s.window}"),
        (s.n_bootstrap < 0, f"eval.n_bootstrap must be >= 0, got {s.n_bootstrap}"),
        (not 0.0 < s.ci_level < 1.0, f"eval.ci_level must be in (0, 1), got {s.ci_level}"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(message)
    if s.grid_step is not None:
        try:
            ConfidenceGrid(s.grid_step)
        except ValueError as err:
            raise ValueError(f"eval.grid_step: {err}; null: no expected confidence") from err


@dataclass
class EvalResult:
    """Predictions and report of one eval set.

    Attributes:
        dataset: eval set name.
        predictions: one dict per sample (question id, sample index, slice, fields, completion,
            parsed answer, the confidence signals, correctness, format verdict and error).
        report: nested metrics with CIs (layout in the module docstring).
    """

    dataset: str
    predictions: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Flat ``key -> value`` view for the metrics file and W&B (keys in the module docstring)."""
        r = self.report
        out = {"accuracy": r["accuracy"]["value"], "format_rate": r["format_rate"]["value"]}
        for signal, metrics in r["signals"].items():
            prefix = "" if signal == "verbalized" else f"{signal}/"
            out |= {f"{prefix}{k}": v["value"] for k, v in metrics.items() if k != "n"}
        out["overconfidence"] = out.get("confidence_mean", math.nan) - out.get("accuracy_well_formed", math.nan)
        for field_name, labels in r["slices"].items():
            for label, s in labels.items():
                prefix = f"slice/{label}" if field_name == "slice" else f"slice/{field_name}={label}"
                out[f"{prefix}/count"] = float(s["count"])
                out[f"{prefix}/accuracy"] = s["accuracy"]["value"]
                out |= {f"{prefix}/{k}": v["value"] for k, v in s["signals"].get("verbalized", {}).items() if k != "n"}
        out |= {f"abstain/{k}": v for k, v in r.get("abstention", {}).items()}
        for method, metrics in r.get("voting", {}).items():
            out |= {f"vote/{method}/{k}": v["value"] if isinstance(v, dict) else v for k, v in metrics.items()}
        return out


def _batch_rows(
    model: Any, tokenizer: Any, prompts: PromptBuilder, batch: list[Example],
    score: Callable[[list[str], list[Example]], tuple[list[Any], Any]], settings: EvalConfig, dataset: str,
    autocast_dtype: torch.dtype | None, grid: ConfidenceGrid | None,
) -> list[dict[str, Any]]:
    """Prediction rows of one batch of questions: ``len(batch) * n_samples`` rows, question by
    question; ``score(texts, examples)`` parses, verifies and rewards the completions; the
    expected confidence is computed over ``grid`` (NaN without one)."""
    rollout = generate_rollout(
        model,
        tokenizer,
        [prompts.prompt(e) for e in batch],
        settings.n_samples,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        do_sample=settings.do_sample,
        stop_string=f"</{prompts.fmt.confidence}>",
        autocast_dtype=autocast_dtype,
    )
    per_sample = [e for e in batch for _ in range(settings.n_samples)]  # rollout rows: group by group
    parsed, rewards = score(rollout.texts, per_sample)
    signals = {name: np.full(len(rollout), np.nan) for name in SIGNALS} | {"verbalized": rewards.confidence}
    if settings.intrinsic:
        signals |= confidence_signals(model, tokenizer, rollout, parsed, prompts.fmt, window=settings.window,
                                      autocast_dtype=autocast_dtype)
    if grid is not None:
        signals["expected_confidence"] = expected_stated_confidence(
            model, tokenizer, rollout, parsed, grid, prompts.fmt, autocast_dtype=autocast_dtype)
    return [
        {
            "dataset": dataset, "id": e.id, "sample": i % settings.n_samples, "slice": e.slice,
            "fields": dict(e.fields), "question": e.question, "reference": e.answer, "completion": text,
            "answer": p.answer, "format_ok": p.format_ok, "error": p.error,
            "abstained": p.abstained, "unanswerable": e.unanswerable,
            "correct": int(rewards.correct[i]),
            # `confidence` is the verbalized signal (None when the format failed).
            "confidence": p.confidence,
            **{s: _finite_or_none(signals[s][i]) for s in SIGNALS if s != "verbalized"},
        }
        for i, (e, text, p) in enumerate(zip(per_sample, rollout.texts, parsed))
    ]


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def signal_values(rows: Sequence[dict[str, Any]], signal: str) -> np.ndarray:
    """float ``[len(rows)]``: the ``signal`` (a name in :data:`~calibrl.eval.signals.SIGNALS`)
    of every prediction row, NaN where the row is not well-formed or the signal is undefined (or
    missing: a row written before the signal existed)."""
    key = "confidence" if signal == "verbalized" else signal
    return np.array([np.nan if r.get(key) is None or not r["format_ok"] else r[key] for r in rows], dtype=np.float64)


def _mean_ci(values: np.ndarray, name: str, settings: EvalConfig) -> dict[str, float]:
    """Bootstrap CI of the mean of 0/1 ``values`` (accuracy, format rate); the confidence argument
    of :func:`bootstrap_ci` is unused by a mean, so zeros stand in for it."""
    return bootstrap_ci(
        np.zeros(values.size), values, {name: lambda _q, c: float(np.mean(c))},
        n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed,
    )[name]


def _signal_reports(rows: Sequence[dict[str, Any]], settings: EvalConfig) -> dict[str, dict[str, Any]]:
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for signal in SIGNALS:
        q = signal_values(rows, signal)
        keep = np.isfinite(q)
        if not keep.any():
            continue
        report = metric_report(
            q[keep], correct[keep], n_bins=settings.n_bins, threshold=settings.confident_threshold,
            n_resamples=settings.n_bootstrap, seed=settings.seed, level=settings.ci_level,
        )
        # `accuracy` here is among the rows the calibration metrics see (the well-formed ones);
        # renamed so it is never read as the accuracy over all samples.
        report["accuracy_well_formed"] = report.pop("accuracy")
        out[signal] = {"n": int(keep.sum()), **report}
    return out


def _summarize(rows: list[dict[str, Any]], settings: EvalConfig, dataset: str, abstention: bool = False) -> dict[str, Any]:
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    ok = np.array([r["format_ok"] for r in rows], dtype=np.float64)
    report: dict[str, Any] = {
        "dataset": dataset,
        "n_questions": len({r["id"] for r in rows}),
        "n_samples": settings.n_samples,
        "accuracy": _mean_ci(correct, "accuracy", settings),
        "format_rate": _mean_ci(ok, "format_rate", settings),
        "signals": _signal_reports(rows, settings),
        "slices": {},
    }
    for field_name in settings.slice_by:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            label = (r["slice"] if field_name == "slice" else str(r["unanswerable"]) if field_name == "unanswerable"
                     else str(r["fields"][field_name]))
            groups.setdefault(label, []).append(r)
        report["slices"][field_name] = {
            label: {
                "count": len(g),
                "accuracy": _mean_ci(np.array([r["correct"] for r in g], np.float64), "accuracy", settings),
                "format_rate": _mean_ci(np.array([r["format_ok"] for r in g], np.float64), "format_rate", settings),
                "signals": _signal_reports(g, settings),
            }
            for label, g in sorted(groups.items())
        }
    if settings.n_samples > 1:
        report["voting"] = _voting(rows, settings)
    if abstention:
        report["abstention"] = abstention_metrics(
            [r["id"] for r in rows], [r["abstained"] for r in rows], [r["correct"] for r in rows],
            [r["format_ok"] for r in rows], [r["unanswerable"] for r in rows],
        )
    return report


def _voting(rows: Sequence[dict[str, Any]], settings: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per voting method: ``coverage`` (share of questions with a vote, a plain number),
    ``accuracy`` over all questions (no vote = wrong) and :data:`VOTE_METRICS` over the questions
    that voted, each with a bootstrap CI over questions."""
    ids, answers = [r["id"] for r in rows], [r["answer"] for r in rows]
    conf, correct = signal_values(rows, "verbalized"), [r["correct"] for r in rows]
    metrics = {k: fn for k, fn in scalar_metrics(settings.n_bins, settings.confident_threshold).items() if k in VOTE_METRICS}
    out = {}
    for method in VOTING_METHODS.names():
        res = aggregate(ids, answers, conf, correct, method)
        entry: dict[str, Any] = {
            "coverage": float(res.voted.mean()),
            "accuracy": _mean_ci(res.correct.astype(np.float64), "accuracy", settings),
        }
        if res.voted.any():
            entry |= bootstrap_ci(res.confidence[res.voted], res.correct[res.voted], metrics,
                                  n_resamples=settings.n_bootstrap, level=settings.ci_level, seed=settings.seed)
        out[method] = entry
    return out


def check_slice_fields(examples: Sequence[Example], slice_by: Sequence[str], dataset: str) -> None:
    """Check that the examples have every ``slice_by`` field (looked up on the first example, as
    every example of a set comes from one source).

    Raises:
        ValueError: a missing field; the message names the eval set and lists the fields.
    """
    for name in slice_by:
        try:
            examples[0].field_value(name)
        except KeyError as err:
            raise ValueError(f"eval.slice_by: eval set {dataset!r}: {err.args[0]}") from err


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: PromptBuilder,
    examples: Sequence[Example],
    is_correct: Callable[[str | None, Example], bool],
    reward_fn: RewardFunction,
    settings: EvalConfig,
    *,
    dataset: str,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    dist: DistInfo = DistInfo(),
) -> EvalResult:
    """Evaluate ``model`` on ``examples`` with ``settings.n_samples`` completions each
    (``settings``: the ``eval`` config group, :class:`calibrl.config.EvalConfig`).

    Sampling runs under a forked, seeded RNG (``settings.seed``): the result depends only on the
    weights, the examples and the settings, and the caller's RNG state is left as it was.

    Args:
        examples: eval questions (Q of them).
        is_correct: verifier verdict ``is_correct(answer, example)`` (the dataset's).
        dataset: name used in the report and in the prediction rows.
        autocast_dtype: e.g. ``torch.bfloat16`` for autocast on the model's device (as in
            training), or ``None``.
        progress: called with the number of questions finished after each batch.
        dist: with several processes each rank generates for ``examples[rank::world_size]`` and
            the rows are gathered (in question order) before the report, which every rank
            computes; identical to one process with greedy decoding (sampling draws differ).

    Returns:
        An :class:`EvalResult` with ``Q * n_samples`` prediction rows.

    Raises:
        ValueError: an invalid setting (:func:`check_eval_config`), no examples, or a
            ``settings.slice_by`` field the examples do not have.
    """
    check_eval_config(settings)
    if not examples:
        raise ValueError(f"eval set {dataset!r} has no examples")
    check_slice_fields(examples, settings.slice_by, dataset)

    def score(texts: list[str], per_sample: list[Example]) -> tuple[list[Any], Any]:
        return score_completions(texts, per_sample, is_correct, reward_fn, prompts.fmt)

    mine, rows = examples[dist.rank :: dist.world_size], []
    grid = None if settings.grid_step is None else ConfidenceGrid.for_format(settings.grid_step, prompts.fmt)
    device = module_device(model)
    # on a GPU, sampling draws from the CUDA generator: fork it too
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for start in range(0, len(mine), settings.batch_size):
            batch = list(mine[start : start + settings.batch_size])
            rows += _batch_rows(model, tokenizer, prompts, batch, score, settings, dataset, autocast_dtype, grid)
            if progress:
                progress(len(batch))
    if dist.world_size > 1:
        order = {e.id: i for i, e in enumerate(examples)}
        rows = sorted((r for part in gather_objects(rows) for r in part), key=lambda r: (order[r["id"]], r["sample"]))
    abstention = prompts.fmt.abstain is not None or any(e.unanswerable for e in examples)
    return EvalResult(dataset, rows, _summarize(rows, settings, dataset, abstention))


def report_json(report: Any) -> str:
    """``report`` as strict JSON (indented): non-finite numbers (undefined metrics, e.g. AUROC
    with one class, or CIs without resamples) become ``null``."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    return json.dumps(clean(report), indent=2, allow_nan=False)


def write_predictions(result: EvalResult, path: Path) -> Path:
    """Write one JSON line per prediction row to ``path`` (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in result.predictions:
            f.write(json.dumps(row) + "\n")
    return path

