"""The command-line entry points (``calibrl-train``, ``calibrl-eval``) share everything but the job
they run: :func:`run_cli` is that shared part, :func:`console_script` its decorator form.

1. Launchers' ``--local_rank``/``--local-rank`` flags are dropped (ranks come from the
   environment; Hydra would reject the flag).
2. The overrides are composed once up front, so a misspelled key or an unknown config-group option
   (``model=nonexistent``) fails before anything runs, with one line naming it and exit code 2.
3. Hydra composes the config (``--cfg job``, ``--help``, ``-m`` multirun as usual) and runs the
   job in its run directory. A :class:`~calibrl.config.ConfigError` or ``FileNotFoundError``
   from the job is a configuration mistake: one line on stderr, exit code 2, and the run
   directory is removed if it holds only what Hydra wrote there for this run.

The config directory is ``conf/`` at the repository root, or ``$CALIBRL_CONF_DIR``; importing this
module registers the structured schema those configs name (:func:`calibrl.config.register_schema`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf

from calibrl.config import ConfigError, register_schema

__all__ = [
    "CONF_DIR", "VERSION_BASE", "check_resolvable", "config_error_message", "console_script", "run_cli",
    "strip_launcher_flags",
]

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


def console_script(prog: str, config_name: str) -> Callable[[Callable[[DictConfig, Path], None]], Callable[[], None]]:
    """Decorator, as ``@hydra.main``: ``job(cfg, run_dir)`` becomes the console script ``prog``
    (a function of no arguments) on the config ``config_name`` in :data:`CONF_DIR`; see
    :func:`run_cli`."""

    def wrap(job: Callable[[DictConfig, Path], None]) -> Callable[[], None]:
        def main() -> None:
            run_cli(prog, config_name, job)

        main.__doc__ = f"Console-script entry ``{prog}``: {job.__doc__}"
        return main

    return wrap


def run_cli(prog: str, config_name: str, job: Callable[[DictConfig, Path], None]) -> None:
    """Run ``job(cfg, run_dir)`` as the console script ``prog`` on the config ``config_name``.

    Args:
        prog: the script's name, the prefix of every error line (``calibrl-train``).
        config_name: the primary config in :data:`CONF_DIR` (``config``, ``eval``).
        job: the work; Hydra names the job, and its log file, after ``job``'s module
            (``calibrl.train`` -> ``train.log``).

    Exits with code 2 and one line on stderr when an override names an unknown key or config-group
    option, or when ``job`` raises :class:`~calibrl.config.ConfigError` or ``FileNotFoundError``;
    then a run directory holding only Hydra's own files of this run is removed, with its dated
    parent (``outputs/<date>/``) once that is empty.
    """
    import hydra

    argv = strip_launcher_flags(sys.argv[1:])
    sys.argv = [sys.argv[0], *argv]
    message = config_error_message(argv, config_name)
    if message:
        _refuse(prog, message)

    @functools.wraps(job)  # Hydra unwraps the task to name the job after `job`'s module
    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        # Decided before the job runs: a run dir that already held anything (a resumed run, a
        # log with lines in it) is never removed.
        disposable = hc.mode == RunMode.RUN and _holds_only_hydra_files(run_dir, hc, empty_log=True)
        try:
            check_resolvable(cfg)
            job(cfg, run_dir)
        except (ConfigError, FileNotFoundError) as err:
            if disposable and _holds_only_hydra_files(run_dir, hc, empty_log=False):
                _remove_run_dir(run_dir, OmegaConf.to_container(hc.run, resolve=False)["dir"])
            _refuse(prog, str(err))

    hydra.main(version_base=VERSION_BASE, config_path=str(CONF_DIR), config_name=config_name)(task)()


def check_resolvable(cfg: DictConfig) -> None:
    """Resolve every value of ``cfg`` once, before any work, so that an unset required value or a
    broken interpolation is a configuration error rather than a traceback mid-run.

    Raises:
        ConfigError: a value cannot be resolved; for an interpolation to an unset key
            (``model=hf`` without ``model.name_or_path``: ``name: ${.name_or_path}``) the message
            names the key to set.
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        m = re.search(r"interpolation '\$\{(\.*)([\w.]+)\}'", str(err))
        if m:  # a relative (``${.x}``) or absolute (``${a.x}``) reference
            dots, target = m.groups()
            base = key.split(".")[: -len(dots)] if dots else []
            ref = ".".join([*base, target])
            if OmegaConf.select(cfg, ref, default=None, throw_on_missing=False) is None:
                raise ConfigError(f"{ref} is not set ({key} refers to it); set it on the command line, "
                                  f"e.g. {ref}=...") from err
        first = str(err).splitlines()[0]
        raise ConfigError(f"{key}: {first}") from err


def _refuse(prog: str, message: str) -> NoReturn:
    """A configuration mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(2)


def _holds_only_hydra_files(run_dir: Path, hc: DictConfig, *, empty_log: bool) -> bool:
    """Whether ``run_dir`` holds nothing but what Hydra writes when a job starts: the job's log
    file (empty, if ``empty_log``) and ``<output_subdir>/{config,hydra,overrides}.yaml``."""
    log = f"{hc.job.name}.log"
    subdir = hc.output_subdir
    if subdir is not None and "/" in str(subdir):
        return False
    try:
        if not {p.name for p in run_dir.iterdir()} <= {log, *([str(subdir)] if subdir is not None else [])}:
            return False
        if subdir is not None and (run_dir / subdir).exists():
            if not {p.name for p in (run_dir / subdir).iterdir()} <= {"config.yaml", "hydra.yaml", "overrides.yaml"}:
                return False
        return not (empty_log and (run_dir / log).exists() and (run_dir / log).stat().st_size > 0)
    except OSError:  # gone already (another rank removed it) or unreadable: leave it alone
        return False


def _remove_run_dir(run_dir: Path, pattern: str) -> None:
    """Remove ``run_dir``, then each parent that ``pattern`` (the unresolved ``hydra.run.dir``)
    names by the time, while it is empty: ``outputs/2025-01-31/`` of
    ``outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}_${experiment_name}``. A parent the user named
    (``hydra.run.dir=/tmp/x``: ``/tmp``) is never touched, nor the working directory."""
    cwd = Path.cwd().resolve()
    if run_dir.resolve() in (cwd, *cwd.parents):
        return
    for handler in list(logging.root.handlers):  # Hydra's job log file lives in run_dir
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir):
            logging.root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent, segment in zip(run_dir.parents, reversed(str(pattern).rstrip("/").split("/")[:-1])):
        if "${now:" not in segment:
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def config_error_message(argv: list[str], config_name: str = "config") -> str | None:
    """One line naming the first override in ``argv`` that names a key the config ``config_name``
    (in :data:`CONF_DIR`) does not have, or an option its config group does not have; ``None``
    when every override composes (or composing fails otherwise: Hydra reports that itself).

    With ``-m``/``--multirun`` every value of a sweep (``model=tiny,nope``) is checked.
    ``hydra.*`` keys are left to Hydra. An option whose path has a part starting with ``_``
    (``experiment=paper/_common``) is refused: such files are included by other options.
    """
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if ("=" in a or a.startswith("~")) and not a.startswith("-")
                 and not a.lstrip("+~").startswith("hydra.")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    probes = _sweep_probes(overrides) if multirun else [overrides]
    for probe in probes:
        for o in probe:
            group, _, option = o.lstrip("+").partition("=")
            is_group = (CONF_DIR / group.split("@")[0]).is_dir()
            if is_group and any(part.startswith("_") for part in option.split("/")):
                # `experiment/paper/_common.yaml`: a part other options include, not an option
                return f"{group} option {option!r} is a shared part of other options (its name starts with '_'), not one to choose"
    with initialize_config_dir(str(CONF_DIR), version_base=VERSION_BASE):
        for probe in probes:
            try:
                compose(config_name, overrides=probe)
            except Exception as err:  # noqa: BLE001 - Hydra wraps the cause in several types
                message = _unknown_option_message(err) or _unknown_key_message(err, probe, config_name)
                if message:
                    return message
    return None


def _sweep_probes(overrides: list[str]) -> list[list[str]]:
    """Override lists that together try every value of every sweep once: each sweep at its first
    value, then one list per further value. Empty when a sweep cannot be listed (``interval``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
                   else [o.input_line] for o in parsed]
    except Exception:  # noqa: BLE001 - a syntax error or an interval sweep: Hydra reports it
        return []
    if not all(choices):  # a sweep of no values
        return []
    base = [c[0] for c in choices]
    return [base] + [base[:i] + [v] + base[i + 1:] for i, c in enumerate(choices) for v in c[1:]]


def _unknown_option_message(err: Exception) -> str | None:
    """``unknown model option 'nope'; available: hf, smollm2_135m, tiny`` for Hydra's
    missing-config error on a group option; else ``None``."""
    from hydra.errors import MissingConfigException

    m = re.search(r"Available options in '([^']+)'", str(err))
    if not isinstance(err, MissingConfigException) or not err.missing_cfg_file or not m:
        return None
    group = m.group(1)
    option = err.missing_cfg_file.removeprefix(f"{group}/")
    # Hydra lists only the group's own files; options in sub-folders (experiment=paper/x) count
    # too, except the `_name.yaml` parts they include (not runs of their own).
    folder = CONF_DIR / group
    nested = {p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")
              if p.parent != folder and not p.name.startswith("_")}
    return f"unknown {group} option {option!r}; available: {', '.join(sorted({*(err.options or []), *nested}))}"


def _unknown_key_message(err: Exception, overrides: list[str], config_name: str) -> str | None:
    """If Hydra refused ``overrides`` because one names a key the config does not have, a line
    naming the closest keys and every valid key under its parent; else ``None``."""
    from hydra import compose

    text = f"{err} {err.__cause__}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if not m:
        return None
    key = m.group(1)
    try:
        base = compose(config_name, overrides=[o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key])
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
    if parent and OmegaConf.get_type(node) is dict:  # an open mapping (reward.weights): new keys take a '+'
        return (f"{parent} has no key {leaf!r} yet; add one with a leading '+': +{key}=<value>.{hint} "
                f"Keys under '{parent}' now: {', '.join(keys)}")
    return f"unknown config key {key!r}.{hint} Valid keys under '{parent or '<root>'}': {', '.join(keys)}"
