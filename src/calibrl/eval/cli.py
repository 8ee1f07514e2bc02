"""Entry point: ``calibrl-eval checkpoint=<run dir | HF dir | preset> [key=value ...]`` or
``python -m calibrl.eval``.

Hydra composes ``conf/eval.yaml`` with the overrides (``--cfg job`` prints it, ``-m`` sweeps);
:func:`calibrl.eval.job.resolve_checkpoint` then fills in what the checkpoint names and
:func:`calibrl.eval.job.run_eval_job` does the work. A misspelled key, an unknown group option or a
bad setting fails before anything is loaded, with exit code 2 and one line naming the problem
(:func:`calibrl.cli.run_cli`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from calibrl.cli import CONF_DIR, check_resolvable, console_script


@console_script("calibrl-eval", config_name="eval")
def main(cfg: DictConfig, out_dir: Path) -> None:
    """Resolve the checkpoint, check the settings, then evaluate into ``out_dir``."""
    from hydra.core.hydra_config import HydraConfig

    from calibrl.eval.job import resolve_checkpoint, run_eval_job, validate_eval_job

    cfg = resolve_checkpoint(cfg, CONF_DIR, list(HydraConfig.get().overrides.task))
    check_resolvable(cfg)  # the checkpoint may have brought a preset with a value to set (checkpoint=hf)
    validate_eval_job(cfg)
    run_eval_job(cfg, out_dir)


if __name__ == "__main__":
    main()
