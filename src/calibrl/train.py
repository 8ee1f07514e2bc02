"""Entry point: ``calibrl-train [experiment=NAME] [key=value ...]`` or ``python -m calibrl.train``.

Hydra composes ``conf/config.yaml`` with the overrides; ``--cfg job`` prints the composed config;
``-m`` runs a multirun sweep. Launchers' ``--local_rank``/``--local-rank`` flags are removed before
Hydra parses the command line (ranks are read from the environment). A misspelled key fails
before anything runs, with the valid keys of its parent listed (:mod:`calibrl.cli`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from calibrl.cli import CONF_DIR, VERSION_BASE, strip_launcher_flags, unknown_key_message
from calibrl.config import ConfigError
from calibrl.run.validate import validate


@hydra.main(version_base=VERSION_BASE, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from calibrl.run.pipeline import run

    try:
        validate(cfg)
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, FileNotFoundError) as err:
        # A configuration mistake (found before training starts): one clear line, no traceback.
        print(f"calibrl-train: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry (``calibrl-train``)."""
    sys.argv = [sys.argv[0], *strip_launcher_flags(sys.argv[1:])]
    message = unknown_key_message(sys.argv[1:])
    if message:
        print(f"calibrl-train: {message}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
