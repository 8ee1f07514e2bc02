"""Entry point: ``calibrl-eval checkpoint=<run dir | HF dir | preset> [key=value ...]`` or
``python -m calibrl.eval``.

Hydra composes ``conf/eval.yaml`` with the overrides (``--cfg job`` prints it, ``-m`` sweeps);
:func:`calibrl.eval.job.resolve_checkpoint` then fills in what the checkpoint names and
:func:`calibrl.eval.job.run_eval_job` does the work. A misspelled key or a bad setting fails before
anything is loaded, with exit code 2 and one line naming the problem.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from calibrl.config import ConfigError
from calibrl.cli import CONF_DIR, VERSION_BASE, strip_launcher_flags, unknown_key_message


@hydra.main(version_base=VERSION_BASE, config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from calibrl.eval.job import resolve_checkpoint, run_eval_job, validate_eval_job

    try:
        cfg = resolve_checkpoint(cfg, CONF_DIR, list(HydraConfig.get().overrides.task))
        validate_eval_job(cfg)
        run_eval_job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, FileNotFoundError) as err:
        # A configuration mistake (all are found before the model loads): one line, no traceback.
        print(f"calibrl-eval: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry (``calibrl-eval``)."""
    sys.argv = [sys.argv[0], *strip_launcher_flags(sys.argv[1:])]
    message = unknown_key_message(sys.argv[1:], config_name="eval")
    if message:
        print(f"calibrl-eval: {message}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
