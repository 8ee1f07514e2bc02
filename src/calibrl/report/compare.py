"""``calibrl-compare``: tables, curves, trade-off plot, reliability diagrams and an HTML report
that compare the arms of an experiment, each arm over its seeds.

Usage::

    calibrl-compare RUN_DIR... [--out DIR] [--by KEY]... [--allow-partial]
    calibrl-compare --wandb ENTITY/PROJECT --group G [--wandb-report] [--out DIR] [--by KEY]...

This module is the command line (:func:`main`, also ``python -m calibrl.report``); the work is
done by the modules of :mod:`calibrl.report`, one per step of the data path:

- :mod:`calibrl.report.load`: run directories, or every run of a W&B group (``--wandb ENTITY/PROJECT
  --group G``; no per-sample predictions, so no bootstrap intervals, no ``confidence_std`` and no
  reliability diagrams), read into typed :class:`~calibrl.report.load.Run` records with their eval
  points (``raw``/``start``/``sft`` before RL, ``step<N>``, ``final``). ``--dataset`` picks one
  eval dataset of runs that evaluated several.
- :mod:`calibrl.report.aggregate`: arms by the ``--by`` config keys (repeatable; default
  ``experiment_name``), per-arm statistics over seeds with pooled bootstrap intervals
  (``--n-bootstrap``, ``--seed``), best values over eval points, curves.
- :mod:`calibrl.report.render` (with :mod:`calibrl.report.figures` and
  :mod:`calibrl.report.html`): ``comparison.md``/``.csv`` of the ``--stage`` eval (default
  ``final``; also printed), ``comparison_best.md``/``.csv`` (also printed), ``runs.csv``,
  ``curves.png``, ``tradeoff.png``, ``reliability_<stage>.png`` and ``report.html``, in ``--out``.

**Unfinished runs.** A run without the ``--stage`` eval (no ``eval_final.jsonl`` locally, no
``final/*`` summary on W&B) is an error unless ``--allow-partial``: then it contributes to the
curves and the trade-off plot only, and the report lists it as excluded from the tables and
reliability diagrams.

**W&B report.** ``--wandb-report`` also creates a W&B Report (:mod:`calibrl.report.wandb_report`)
when the optional package ``wandb_workspaces`` is importable; without it, it prints how to group
the runs in the W&B UI.

Errors: unusable input raises :class:`~calibrl.report.load.CompareError` (no network or API key
for ``--wandb`` included); the command prints it on one line and exits 2, as it does when the W&B
report cannot be created. Wrong options are argparse errors (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from calibrl.report.aggregate import DEFAULT_BY, group_runs
from calibrl.report.load import CompareError, Run, load_run, load_wandb_runs
from calibrl.report.render import write_comparison
from calibrl.report.wandb_report import WANDB_UI_HOWTO, wandb_report

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default: the current directory)")
    parser.add_argument("--stage", default="final", help="eval stage of the main table (final, sft, step<N>, ...)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def _read_runs(args: argparse.Namespace) -> tuple[list[Run], str]:
    """The runs the arguments name and where they came from; unfinished runs refused unless
    ``--allow-partial``.

    Raises:
        CompareError: as the loaders, or a run without the ``--stage`` eval.
    """
    if args.wandb:
        runs, source = load_wandb_runs(args.wandb, args.group, args.dataset), f"W&B {args.wandb}, group {args.group}"
    else:
        runs, source = [load_run(d, args.dataset) for d in args.run_dirs], "local run directories"
    if not args.allow_partial and (partial := [r for r in runs if not r.point(args.stage)]):
        raise CompareError(
            f"{partial[0].name}: no {args.stage} eval (no eval_{args.stage}.jsonl / {args.stage} eval record; "
            f"{len(partial)} such run(s)): unfinished? --allow-partial admits them to the curves only")
    return runs, source


def _print_written(written: Mapping[str, Path], stage: str) -> None:
    for name, heading in (("comparison.md", f"{stage} eval"), ("comparison_best.md", "best eval")):
        if name in written:
            print(f"{heading}:\n{written[name].read_text()}")
    print("written: " + ", ".join(str(p) for p in written.values()))


def _report_to_wandb(path: str, group: str, by: Sequence[str]) -> None:
    """Create the W&B Report and print its URL, or print how to build it by hand without
    ``wandb_workspaces``; exit 2 with a one-line error when W&B refuses."""
    import wandb

    try:
        print(f"W&B report: {wandb_report(path, group, by)}")
    except ImportError:
        print(WANDB_UI_HOWTO.format(path=path, group=group, keys=", ".join(by)))
    except (wandb.errors.Error, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        print(f"calibrl-compare: W&B report not created: {type(err).__name__}: {reason}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry (``calibrl-compare``); see the module docstring for what it does.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: code 2 on unusable input (one-line error on stderr) or wrong options.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.run_dirs) == bool(args.wandb):
        parser.error("give run directories, or --wandb ENTITY/PROJECT --group G (not both)")
    if args.wandb and not args.group:
        parser.error("--wandb needs --group")
    if args.wandb_report and not args.wandb:
        parser.error("--wandb-report needs --wandb")
    by = tuple(args.by or DEFAULT_BY)
    try:
        runs, source = _read_runs(args)
        written = write_comparison(group_runs(runs, by), args.out, stage=args.stage, n_resamples=args.n_bootstrap,
                                   seed=args.seed, source=source)
    except CompareError as err:
        print(f"calibrl-compare: {err}", file=sys.stderr)
        sys.exit(2)
    _print_written(written, args.stage)
    if args.wandb_report:
        _report_to_wandb(args.wandb, args.group, by)


if __name__ == "__main__":
    main()
