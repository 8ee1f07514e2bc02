"""Shared pieces of the command-line entry points (``calibrl-train``, ``calibrl-eval``): where the
Hydra configs live, the launcher flags to drop, and the one-line message for a misspelled key.

The config directory is ``conf/`` at the repository root, or ``$CALIBRL_CONF_DIR``; importing this
module registers the structured schema those configs name (:func:`calibrl.config.register_schema`).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from calibrl.config import register_schema

__all__ = ["CONF_DIR", "VERSION_BASE", "strip_launcher_flags", "unknown_key_message"]

CONF_DIR = Path(os.environ.get("CALIBRL_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))
VERSION_BASE = "1.3"

# Every config under CONF_DIR names the structured schema first in its defaults: whoever can find
# the configs can compose them.
register_schema()


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
