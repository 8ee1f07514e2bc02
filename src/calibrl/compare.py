"""``calibrl-compare RUN_DIR... [--out DIR]``: one table of held-out metrics per arm.

Runs are grouped into arms by ``experiment_name`` in their ``config_resolved.yaml``; each run is
one seed. From every run's per-sample predictions of an eval stage (``eval_<stage>.jsonl``,
default ``final``) the metrics are computed with the functions training and ``calibrl-eval`` use
(:mod:`calibrl.metrics`): accuracy over all samples (a format failure is wrong); ECE (10 uniform
bins), Brier score, AUROC, mean and std of the stated confidence over the well-formed ones.

Each cell is ``mean ± std`` over the arm's seeds (std with ``ddof=1``; ``±`` omitted for one
seed) followed by ``[low, high]``, the 95% percentile-bootstrap interval of the metric on the
arm's pooled samples (all seeds together, resampled by sample; it reflects the finite eval set,
not seed-to-seed variation, which the std shows). The table is printed and written as
``comparison.md`` and ``comparison.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from calibrl.metrics import auroc, bootstrap_ci, brier_score, expected_calibration_error

__all__ = ["COLUMNS", "load_arms", "compare", "main"]

# accuracy and format rate are over all samples; the rest over the well-formed ones
COLUMNS = ("accuracy", "format_rate", "ece", "brier", "auroc", "confidence_mean", "confidence_std")
_WELL_FORMED = {
    "ece": expected_calibration_error,
    "brier": brier_score,
    "auroc": auroc,
    "confidence_mean": lambda q, c: float(np.mean(q)),
    "confidence_std": lambda q, c: float(np.std(q)),
}


def load_arms(run_dirs: Sequence[Path], stage: str = "final") -> dict[str, list[tuple[int, list[dict]]]]:
    """Group runs into arms: ``{experiment_name: [(seed, prediction rows), ...]}``, seeds sorted.

    Raises:
        FileNotFoundError: a run directory without ``config_resolved.yaml`` or without the
            stage's predictions (e.g. a run that has not finished).
    """
    arms: dict[str, list[tuple[int, list[dict]]]] = {}
    for d in map(Path, run_dirs):
        cfg_path, preds = d / "config_resolved.yaml", d / f"eval_{stage}.jsonl"
        for p in (cfg_path, preds):
            if not p.is_file():
                raise FileNotFoundError(f"{d}: no {p.name} (not a finished calibrl-train run directory?)")
        cfg = OmegaConf.load(cfg_path)
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        arms.setdefault(str(cfg.experiment_name), []).append((int(cfg.seed), rows))
    return {arm: sorted(runs, key=lambda r: r[0]) for arm, runs in sorted(arms.items())}


def _metrics(rows: list[dict]) -> dict[str, float]:
    correct = np.array([r["correct"] for r in rows], dtype=np.float64)
    ok = np.array([r["format_ok"] for r in rows], dtype=bool)
    out = {"accuracy": float(correct.mean()), "format_rate": float(ok.mean())}
    q = np.array([r["confidence"] for r in rows if r["format_ok"]], dtype=np.float64)
    for name, fn in _WELL_FORMED.items():
        out[name] = fn(q, correct[ok]) if ok.any() else math.nan
    return out


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


def compare(arms: dict[str, list[tuple[int, list[dict]]]], n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per arm: ``arm``, ``seeds``, and per column ``<col>_mean``, ``<col>_std`` (NaN for
    one seed), ``<col>_ci_low``, ``<col>_ci_high`` (see module docstring)."""
    table = []
    for arm, runs in arms.items():
        per_seed = [_metrics(rows) for _, rows in runs]
        ci = _pooled_ci([r for _, rows in runs for r in rows], n_resamples, seed)
        row: dict = {"arm": arm, "seeds": " ".join(str(s) for s, _ in runs)}
        for col in COLUMNS:
            values = np.array([m[col] for m in per_seed], dtype=np.float64)
            row[f"{col}_mean"] = float(np.mean(values))
            row[f"{col}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = ci[col]
        table.append(row)
    return table


def to_markdown(table: list[dict]) -> str:
    """The table as Markdown (``mean ± std [ci_low, ci_high]`` cells)."""

    def cell(r: dict, col: str) -> str:
        std = "" if math.isnan(r[f"{col}_std"]) else f" ± {r[f'{col}_std']:.3f}"
        return f"{r[f'{col}_mean']:.3f}{std} [{r[f'{col}_ci_low']:.3f}, {r[f'{col}_ci_high']:.3f}]"

    lines = ["| arm | seeds | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    lines += [f"| {r['arm']} | {r['seeds']} | " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry (``calibrl-compare``)."""
    parser = argparse.ArgumentParser(prog="calibrl-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="calibrl-train run directories")
    parser.add_argument("--out", type=Path, default=Path("."), help="where comparison.md/.csv go")
    parser.add_argument("--stage", default="final", help="eval stage to compare (final, sft, ...)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    try:
        arms = load_arms(args.run_dirs, args.stage)
    except FileNotFoundError as err:
        print(f"calibrl-compare: {err}", file=sys.stderr)
        sys.exit(2)
    table = compare(arms, args.n_bootstrap, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table)
    (args.out / "comparison.md").write_text(md)
    with (args.out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(md)
    print(f"written: {args.out / 'comparison.md'}, {args.out / 'comparison.csv'}")


if __name__ == "__main__":
    main()
