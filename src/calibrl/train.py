"""Entry point: ``calibrl-train [experiment=NAME] [key=value ...]`` or ``python -m calibrl.train``.

Hydra composes ``conf/config.yaml`` with the overrides; ``--cfg job`` prints the composed config;
``-m`` runs a multirun sweep. A misspelled key, an unknown group option or a bad setting fails
before training starts, with exit code 2 and one line naming it (:func:`calibrl.cli.run_cli`, which
also drops launchers' ``--local_rank`` flags).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from calibrl.cli import console_script
from calibrl.run.validate import validate


@console_script("calibrl-train", config_name="config")
def main(cfg: DictConfig, run_dir: Path) -> None:
    """Check the whole config, then run the job in ``run_dir``."""
    from calibrl.run.pipeline import run

    validate(cfg)
    run(cfg, run_dir)


if __name__ == "__main__":
    main()
