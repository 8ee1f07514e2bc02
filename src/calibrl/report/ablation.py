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
every metric column, and the number of seeds.
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

from omegaconf import OmegaConf

__all__ = ["COLUMNS", "METRICS", "ablation_rows", "main", "summary_markdown", "write_csv"]

METRICS = (
    "accuracy", "ece", "brier", "auroc", "format_rate", "answer_prob_auroc", "expected_confidence_auroc",
    "expected_confidence_ece", "start_accuracy", "start_auroc", "start_ece",
)
COLUMNS = ("arm", "seed", "eval_set", "n", *METRICS)


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
    """CLI: ``python -m calibrl.report.ablation RUN_DIR ... --out FILE.csv [--allow-missing-ood]``;
    writes FILE.csv and FILE.md. Exit 2 with one line on a missing file."""
    p = argparse.ArgumentParser(prog="python -m calibrl.report.ablation", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="the CSV to write (its summary goes next to it as .md)")
    p.add_argument("--allow-missing-ood", action="store_true", help="leave out runs without eval_ood/eval.json")
    args = p.parse_args(argv)
    try:
        rows = ablation_rows(args.run_dirs, require_ood=not args.allow_missing_ood)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = write_csv(rows, args.out)
    out.with_suffix(".md").write_text(summary_markdown(rows))
    print(f"{len(rows)} rows -> {out} (summary: {out.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
