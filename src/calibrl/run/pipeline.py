"""The main job: validate the composed config, build the parts, run the stages.

:func:`run` is the whole job: :func:`calibrl.run.validate.validate`, then
:func:`calibrl.run.build.build` (device, processes, run directory, seeds, data, reward, policy,
prompts, tracker), then the stages of :mod:`calibrl.run.stages`: on a fresh run the data report,
the raw-model eval (``eval.raw_model``), the SFT warm-up with its eval (or its SFT-cache copy)
and, with ``trainer.self_label.enabled``, the self-labelled confidence warm-up with its eval (or
its cached copy); then the RL loop (continued from ``trainer.resume`` on a resumed run) and the
final eval and checkpoint. The tracker is closed and ``summary.json`` written whatever happens.

Files in the run directory: ``config_resolved.yaml``, ``metrics.jsonl`` (one JSON object per
log call, flushed each time), ``eval_<stage>.jsonl`` (per-sample predictions) and
``eval_<stage>.json`` (the eval report with bootstrap CIs, see :mod:`calibrl.eval.evaluator`) for
the stages ``raw``, ``sft`` (or ``start``), ``self_label``, ``step<i>`` (every
``trainer.eval_every`` RL steps) and ``final``, ``summary.json`` (stage -> eval scalars, the
before/after table; strict JSON, undefined values ``null``),
``checkpoint/`` (final HF model and tokenizer, weights in ``trainer.save_dtype``), ``wandb/``
(offline run), ``checkpoints/step*/`` (resumable checkpoints every ``trainer.save_every`` RL steps,
:mod:`calibrl.run.checkpoint`; ``trainer.resume=auto|<path>`` continues from one).

With several processes (DeepSpeed) rank 0 chooses the run directory and writes every file;
see :mod:`calibrl.rl.grpo` for the data-parallel step.

Exit codes (the process's, through :class:`SystemExit`): non-finite steps (an RL step whose update
was skipped as non-finite is logged as usual but never checkpointed; after
``trainer.max_bad_steps_in_row`` of them in a row, or a non-finite gradient under DeepSpeed, whose
update cannot be undone) stop the run without saving anything, with :data:`EXIT_NON_FINITE` and one
line naming the last good checkpoint and how to resume from it; a SIGTERM checkpoints the step and
stops with ``128 + SIGTERM`` (:mod:`calibrl.run.guards`).
"""

from __future__ import annotations

import signal
from pathlib import Path

from omegaconf import DictConfig

from calibrl.eval.evaluator import report_json
from calibrl.run import stages
from calibrl.run.build import RunParts, build, run_tags
from calibrl.run.guards import EXIT_NON_FINITE, RunStopped, SignalFlag
from calibrl.run.validate import validate

__all__ = ["run", "run_tags", "EXIT_NON_FINITE", "SUMMARY_METRICS"]

SUMMARY_METRICS = (
    "accuracy", "format_rate", "confidence_mean", "ece", "brier", "auroc", "aurc", "confident_error_rate",
    "answer_prob/ece", "answer_prob/auroc", "expected_confidence/ece", "expected_confidence/auroc",
)


def _print_table(results: dict[str, dict[str, float]], name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out eval on {name}")
    table.add_column("metric")
    for stage in results:
        table.add_column(stage, justify="right")
    for m in SUMMARY_METRICS:
        table.add_row(m, *(f"{results[s].get(m, float('nan')):.3f}" for s in results))
    slices = sorted({k.split("/")[1] for r in results.values() for k in r if k.startswith("slice/")})
    for s in slices:
        for m in ("accuracy", "confidence_mean"):
            table.add_row(f"{s} {m}", *(f"{results[st].get(f'slice/{s}/{m}', float('nan')):.3f}" for st in results))
    Console(width=120).print(table)


def _print_report(parts: RunParts, results: dict[str, dict[str, float]], wandb_dir: str | None) -> None:
    """The before/after table (stages other than ``step<i>``) and where the run's files are."""
    _print_table({s: r for s, r in results.items() if not s.startswith("step")}, parts.splits.name)
    print(f"run directory : {parts.run_dir}")
    print(f"metrics file  : {parts.tracker.metrics_path}")
    if parts.settings.trainer.save_checkpoint:
        print(f"checkpoint    : {parts.run_dir / 'checkpoint'}")
    if wandb_dir:
        sync = f"  (sync: wandb sync {wandb_dir})" if parts.settings.logger.mode == "offline" else ""
        print(f"W&B run       : {wandb_dir}{sync}")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, float]]:
    """Run the configured job in ``run_dir`` (module docstring: stages, files, exit codes).

    Returns:
        Stage name (``raw``, ``sft`` or ``start``, ``self_label``, ``step<i>``, ``final``) -> eval
        metrics.

    Raises:
        ConfigError / FileNotFoundError: invalid configuration or a missing local path (raised by
            :func:`calibrl.run.validate.validate` before any data or model is loaded), or data that
            cannot be built (unknown task, unreadable file, missing field; before the model loads).
        SystemExit: a run stopped on non-finite steps (:data:`EXIT_NON_FINITE`) or by SIGTERM
            (``128 + SIGTERM``).
    """
    validate(cfg)
    parts = build(cfg, run_dir)
    resume = parts.resume
    state = stages.RunState(step=resume.global_step if resume else 0, results=dict(resume.results) if resume else {})
    exit_code = 1
    preempted = SignalFlag(signal.SIGTERM)
    try:
        if resume is None:
            stages.log_data(parts, state)
            stages.log_model(parts, state)
            stages.raw_eval(parts, state)
            stages.sft_warm_up(parts, state)
            stages.self_label_warm_up(parts, state)
        rl = stages.setup_rl(parts, state)
        stages.rl_loop(parts, state, rl, preempted)
        stages.final_eval_and_save(parts, state)
        exit_code = 0
    except RunStopped as stop:
        exit_code = stop.code
        raise
    finally:
        preempted.restore()
        wandb_dir = parts.tracker.wandb_dir
        parts.tracker.close(exit_code)
        if parts.dist.is_main:
            (parts.run_dir / "summary.json").write_text(report_json(state.results))  # strict JSON: NaN -> null
    if parts.dist.is_main:
        _print_report(parts, state.results, wandb_dir)
    return state.results
