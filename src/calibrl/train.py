"""Entry point: ``calibrl-train [experiment=NAME] [key=value ...]`` or ``python -m calibrl.train``.

Hydra composes ``conf/config.yaml`` with the overrides; ``--cfg job`` prints the composed config;
``-m`` runs a multirun sweep. Launchers' ``--local_rank``/``--local-rank`` flags are removed before
Hydra parses the command line (ranks are read from the environment). A misspelled key fails
before anything runs, with the valid keys of its parent listed.

The config directory is ``conf/`` at the repository root, or ``$CALIBRL_CONF_DIR``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from calibrl.config import ConfigError, register_schema, validate

CONF_DIR = Path(os.environ.get("CALIBRL_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
VERSION_BASE = "1.3"

register_schema()


@hydra.main(version_base=VERSION_BASE, config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from calibrl.pipeline import run

    try:
        validate(cfg)
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, FileNotFoundError) as err:
        # A configuration mistake (found before training starts): one clear line, no traceback.
        print(f"calibrl-train: {err}", file=sys.stderr)
        sys.exit(2)


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank``/``--local-rank`` flags that launchers append."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", arg):
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
            continue
        out.append(arg)
    return out


def unknown_key_message(overrides: list[str], config_name: str = "config") -> str | None:
    """If a ``key=value`` override names a key the config ``config_name`` (in ``CONF_DIR``) does
    not have, a message naming the closest keys and every valid key under its parent; else
    ``None``."""
    from hydra import compose, initialize_config_dir

    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "-", "hydra."))]
    with initialize_config_dir(str(CONF_DIR), version_base=VERSION_BASE):
        try:
            compose(config_name, overrides=plain)
            return None
        except Exception as err:  # noqa: BLE001 - Hydra wraps the cause in several types
            text = f"{err} {err.__cause__}"
        m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
        if not m:
            return None
        key = m.group(1)
        try:
            base = compose(config_name, overrides=[o for o in plain if o.split("=", 1)[0] != key])
        except Exception:  # noqa: BLE001
            return None
    parent, _, leaf = key.rpartition(".")
    # A misspelled section (`evl.n_samples`): report the first part that does not exist.
    while parent and not isinstance(OmegaConf.select(base, parent), DictConfig):
        key = parent
        parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return None
    keys = sorted(str(k) for k in node.keys())
    close = difflib.get_close_matches(leaf, keys, n=3)
    prefix = f"{parent}." if parent else ""
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return f"unknown config key {key!r}.{hint}\nValid keys under '{parent or '<root>'}': {', '.join(keys)}"


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
