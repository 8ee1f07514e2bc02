"""The ablation's machine-readable table: one row per (arm, seed, eval set), and its summary.

``python -m calibrl.report.ablation RUN_DIR ... --out docs/results/ablation.csv`` reads, from each
training run directory (``scripts/ablate.sh`` makes them):

- ``config_resolved.yaml``: the arm (``experiment_name``) and ``seed``;
- ``eval_final.json``: the in-domain eval after RL (``eval_set`` = the run's ``data.name``);
- the warm-up's eval the RL started from, ``eval_self_label.json`` if the run has one, else
  ``eval_sft.json`` (in-domain only: the ``start_*`` columns);
- ``eval_ood/eval.json`` (``calibrl-eval ... in_domain=false``): every out-of-domain set.

Columns (long form, :data:`COLUMNS`): ``arm, seed, eval_set, n, accuracy, ece, brier, auroc`` (the
greedy stated confidence's: ``signals.verbalized``), ``format_rate``, ``answer_prob_auroc``,
``expected_confidence_auroc``, ``expected_confidence_ece`` (blank where not computed), and
``start_accuracy, start_auroc, start_ece`` (the RL start, in-domain rows only). Values are
fractions in [0, 1]; AUROC is blank where undefined (one class).

It also writes ``<out stem>.md``: per arm and eval set, the mean and the sample std over seeds of
every metric column, and the number of seeds; with ``--curves PNG``, the training curves of
:func:`curve_bands` (one panel per metric of :data:`CURVES`, per arm the seed mean and the
min-max band over seeds, held-out in-domain eval points of the RL start and the end as markers).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from calibrl.report.aggregate import Band

__all__ = ["COLUMNS", "CURVES", "METRICS", "ablation_rows", "curve_bands", "main", "summary_markdown", "write_csv"]

METRICS = (
    "accuracy", "ece", "brier", "auroc", "format_rate", "answer_prob_auroc", "expected_confidence_auroc",
    "expected_confidence_ece", "start_accuracy", "start_auroc", "start_ece",
)
COLUMNS = ("arm", "seed", "eval_set", "n", *METRICS)
#: training-batch metrics drawn by ``--curves`` (``metrics.jsonl`` key -> the eval column of its
#: held-out markers, ``None``: no marker): accuracy of the sampled answers, AUROC of the sampled
#: stated confidence and of the expected stated confidence ``sum_v p(v) v``, ECE of the former
CURVES = {
    "train/accuracy": "accuracy",
    "train/auroc": "auroc",
    "train/expected_confidence/auroc": "expected_confidence_auroc",
    "train/ece": "ece",
}


def _value(node: Any) -> float | None:
    """A metric of an eval report: ``{"value": x, ...}`` or a bare number; ``None`` if absent or NaN."""
    if isinstance(node, dict):
        node = node.get("value")
    if node is None:
        return None
    x = float(node)
    return None if math.isnan(x) else x


def _set_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """The columns of one eval set's report (``eval_<stage>.json`` or ``datasets[name]`` of eval.json)."""
    signals = report.get("signals", {})
    verbal = signals.get("verbalized", {})
    out = {
        f"{prefix}accuracy": _value(report.get("accuracy")),
        f"{prefix}ece": _value(verbal.get("ece")),
        f"{prefix}auroc": _value(verbal.get("auroc")),
    }
    if prefix:
        return out
    out |= {
        "brier": _value(verbal.get("brier")),
        "format_rate": _value(report.get("format_rate")),
        "answer_prob_auroc": _value(signals.get("answer_prob", {}).get("auroc")),
        "expected_confidence_auroc": _value(signals.get("expected_confidence", {}).get("auroc")),
        "expected_confidence_ece": _value(signals.get("expected_confidence", {}).get("ece")),
    }
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: is the run finished (and its eval_ood done)?") from None


def ablation_rows(run_dirs: Sequence[str | Path], require_ood: bool = True) -> list[dict[str, Any]]:
    """Long-form rows (:data:`COLUMNS`) of the given training run directories.

    Args:
        run_dirs: finished training runs (with ``eval_final.json``).
        require_ood: a run without ``eval_ood/eval.json`` is an error (else its rows are left out).

    Returns:
        One dict per (run, eval set): the in-domain set first, then the out-of-domain sets in the
        order of eval.json.

    Raises:
        FileNotFoundError: a run without ``config_resolved.yaml`` or ``eval_final.json``, or
            (``require_ood``) without ``eval_ood/eval.json``.
        ValueError: two runs with the same arm and seed.
    """
    rows, seen = [], set()
    for d in map(Path, run_dirs):
        cfg = OmegaConf.load(d / "config_resolved.yaml") if (d / "config_resolved.yaml").exists() else None
        if cfg is None:
            raise FileNotFoundError(f"{d / 'config_resolved.yaml'} does not exist: not a training run directory")
        arm, seed = str(cfg.experiment_name), int(cfg.seed)
        if (arm, seed) in seen:
            raise ValueError(f"two runs of arm {arm!r} seed {seed}: {d}")
        seen.add((arm, seed))
        final = _read(d / "eval_final.json")
        start_file = d / "eval_self_label.json" if (d / "eval_self_label.json").exists() else d / "eval_sft.json"
        start = _set_metrics(_read(start_file), "start_") if start_file.exists() else {}
        rows.append({"arm": arm, "seed": seed, "eval_set": final.get("dataset", cfg.data.name),
                     "n": final.get("n_questions")} | _set_metrics(final) | start)
        ood = d / "eval_ood" / "eval.json"
        if not ood.exists():
            if require_ood:
                _read(ood)
            continue
        for name, report in _read(ood)["datasets"].items():
            rows.append({"arm": arm, "seed": seed, "eval_set": name, "n": report.get("n_questions")}
                        | _set_metrics(report))
    return rows


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values (NaN until one is finite)."""
    out = np.full(len(y), np.nan)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1) : i + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size:
            out[i] = seg.mean()
    return out


def _band(x: np.ndarray, per_seed: list[np.ndarray]) -> Band:
    stack = np.vstack(per_seed)  # [seeds, K]
    ok = np.isfinite(stack)
    n = ok.sum(axis=0)
    with np.errstate(all="ignore"):
        mean = np.where(n > 0, np.nansum(stack, axis=0) / np.maximum(n, 1), np.nan)
        low = np.where(n > 0, np.nanmin(np.where(ok, stack, np.inf), axis=0), np.nan)
        high = np.where(n > 0, np.nanmax(np.where(ok, stack, -np.inf), axis=0), np.nan)
    return Band(x, mean, low, high, n)


def curve_bands(run_dirs: Sequence[str | Path], window: int = 6) -> tuple[dict[str, dict[str, Band]],
                                                                           dict[str, dict[str, Band]]]:
    """Training curves of the runs, aggregated per arm over seeds.

    Args:
        run_dirs: training run directories (``config_resolved.yaml``, ``metrics.jsonl``; the
            markers also read ``eval_sft.json`` / ``eval_self_label.json`` and ``eval_final.json``).
        window: trailing moving average over this many RL steps, per seed, before aggregating
            (one step is B x G = 32 sampled completions: its AUROC is noisy); >= 1.

    Returns:
        ``(panels, markers)`` for :func:`calibrl.report.figures.curves_grid`: ``{metric: {arm:
        Band over RL steps}}`` for each key of :data:`CURVES` (x = RL step, values in [0, 1]), and
        ``{metric: {arm: Band}}`` of the held-out in-domain evals at the RL start (x = 0) and after
        the last RL step.

    Raises:
        ValueError: ``window < 1``, or the seeds of an arm have different numbers of RL steps.
        FileNotFoundError: a run without ``config_resolved.yaml`` or ``metrics.jsonl``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    curves: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    marks: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    steps: dict[str, int] = {}
    for d in map(Path, run_dirs):
        cfg = OmegaConf.load(d / "config_resolved.yaml")
        arm = str(cfg.experiment_name)
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rl = sorted((r for r in records if "train/rl_step" in r), key=lambda r: r["train/rl_step"])
        if steps.setdefault(arm, len(rl)) != len(rl):
            raise ValueError(f"arm {arm!r}: runs with {steps[arm]} and {len(rl)} RL steps ({d})")
        for key in CURVES:
            y = np.array([float(r.get(key, np.nan)) for r in rl], dtype=np.float64)
            curves[key][arm].append(_smooth(y, window))
        start_file = d / "eval_self_label.json" if (d / "eval_self_label.json").exists() else d / "eval_sft.json"
        at = [_set_metrics(_read(f)) if f.exists() else {} for f in (start_file, d / "eval_final.json")]
        for key, column in CURVES.items():
            marks[key][arm].append(np.array([np.nan if m.get(column) is None else m[column] for m in at]))
    panels = {key: {arm: _band(np.arange(1, steps[arm] + 1, dtype=np.float64), ys) for arm, ys in by_arm.items()}
              for key, by_arm in curves.items()}
    markers = {key: {arm: _band(np.array([0.0, float(steps[arm])]), ys) for arm, ys in by_arm.items()}
               for key, by_arm in marks.items()}
    return panels, markers


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` with :data:`COLUMNS` (blank for missing values, 6 decimals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v))
                        for k, v in ((k, r.get(k)) for k in COLUMNS)})
    return path


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return ""
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def summary_markdown(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """A markdown table: per (eval set, arm) in first-seen order, ``mean ± sample std`` over seeds
    of each metric (values missing in a seed are left out of its mean), and the seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["eval_set"], r["arm"])].append(r)
    used = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    lines = ["| eval set | arm | seeds | " + " | ".join(used) + " |", "|" + "---|" * (3 + len(used))]
    for (eval_set, arm), rs in groups.items():
        cells = [_mean_std([r[m] for r in rs if r.get(m) is not None]) for m in used]
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {eval_set} | {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m calibrl.report.ablation RUN_DIR ... --out FILE.csv [--allow-missing-ood]
    [--curves FILE.png [--window K]]``; writes FILE.csv and FILE.md (and the curves). Exit 2 with
    one line on a missing file or runs that cannot be aggregated."""
    p = argparse.ArgumentParser(prog="python -m calibrl.report.ablation", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="the CSV to write (its summary goes next to it as .md)")
    p.add_argument("--allow-missing-ood", action="store_true", help="leave out runs without eval_ood/eval.json")
    p.add_argument("--curves", type=Path, default=None, help="also write the training curves to this PNG")
    p.add_argument("--window", type=int, default=6, help="moving average of the curves, in RL steps (default 6)")
    args = p.parse_args(argv)
    try:
        rows = ablation_rows(args.run_dirs, require_ood=not args.allow_missing_ood)
        bands = curve_bands(args.run_dirs, args.window) if args.curves is not None else None
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = write_csv(rows, args.out)
    out.with_suffix(".md").write_text(summary_markdown(rows))
    print(f"{len(rows)} rows -> {out} (summary: {out.with_suffix('.md')})")
    if bands is not None:
        from calibrl.report.figures import curves_grid

        panels, markers = bands
        curves_grid(panels, args.curves, markers=markers, n_cols=2,
                    title=f"training batch, {args.window}-step mean; dots: held-out eval (start, end)")
        print(f"curves -> {args.curves}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
