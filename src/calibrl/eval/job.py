"""The ``calibrl-eval`` job: evaluate one checkpoint on in-domain and out-of-domain eval sets.

``checkpoint`` is one of:

- a **run directory** written by ``calibrl-train`` (holds ``config_resolved.yaml`` and
  ``checkpoint/``). With ``use_run_config=true`` (default) the run's model, data (the in-domain
  set), prompt, reward, ``eval`` settings, seed and ``trainer.bf16`` are used, so the
  in-domain numbers equal the run's final eval; ``key=value`` overrides given on the command line
  for those keys are applied on top.
  A LoRA run's ``checkpoint/`` is its adapter: the run's base model is loaded with the adapter
  on top (``model.adapter``).
- an **HF model directory** (holds ``config.json``): loaded as ``model.kind=hf``; a LoRA run's
  merged model (``checkpoint_merged/``) is one.
- a **peft adapter directory** (holds ``adapter_config.json``): its base model
  (``base_model_name_or_path``) with the adapter on top.
- a **model preset** name from ``conf/model/`` (e.g. ``smollm2_135m``), or ``null`` for the
  composed ``model`` group.

Files written to the output directory: ``eval.json`` (per eval set, the report of
:mod:`calibrl.eval.evaluator` with bootstrap CIs), ``predictions.jsonl`` (one line per sample, all
sets), ``metrics.jsonl`` (the flat ``eval/<dataset>/...`` scalars, as training logs them),
``plots/<dataset>_reliability.png`` (one reliability diagram per confidence signal, bin counts
shown) and ``plots/<dataset>_confidence_hist.png`` (stated confidence of correct vs wrong
answers), ``config_resolved.yaml``; with a logger on, the same scalars, images and a predictions
table go to W&B.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from calibrl.config import ConfigError, EvalConfig
from calibrl.data.format import completion_format
from calibrl.data import PromptBuilder, build_splits
from calibrl.eval.signals import SIGNALS
from calibrl.device import DEVICES, resolve_device
from calibrl.eval.evaluator import EvalResult, check_eval_config, check_slice_fields, evaluate, report_json, signal_values
from calibrl.lora import adapter_base, is_adapter_dir
from calibrl.models import ModelSpec, load_policy
from calibrl.rewards import RewardFunction
from calibrl.tracking import Tracker

__all__ = ["RUN_KEYS", "resolve_checkpoint", "validate_eval_job", "run_eval_job"]

log = logging.getLogger(__name__)

# Keys a run directory supplies (use_run_config=true); `model` is replaced by its checkpoint.
RUN_KEYS = ("data", "prompt", "reward", "eval", "seed")
# Config groups of conf/eval.yaml (a bare `group=choice` override picks a preset file).
GROUPS = ("model", "data", "prompt", "reward", "logger", "eval_sets")


def _is_run_dir(path: Path) -> bool:
    return (path / "config_resolved.yaml").is_file()


def resolve_checkpoint(cfg: DictConfig, conf_dir: Path, cli_overrides: list[str]) -> DictConfig:
    """Return a copy of ``cfg`` whose ``model`` (and, for a run directory, the :data:`RUN_KEYS`
    and ``bf16``) describe what ``cfg.checkpoint`` names (see module docstring).

    Command-line overrides keep the last word: a group chosen on the command line (e.g.
    ``data=jsonl``) is kept instead of the run's, and every dotted ``key=value`` override under
    ``model`` or the taken keys (e.g. ``eval.n_samples=4``, ``model.chat_template=...``) is
    applied again on top.

    Args:
        conf_dir: the config directory (for model presets).
        cli_overrides: the command line's overrides (Hydra syntax).

    Raises:
        FileNotFoundError: ``checkpoint`` is neither a run directory, an HF model directory nor a
            preset, or a run directory without a saved checkpoint.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [o for o in OverridesParser.create().parse_overrides(cli_overrides)
                 if o.package is None and not o.is_delete()]
    chosen_groups = {o.key_or_group for o in overrides if "." not in o.key_or_group and o.key_or_group in GROUPS}
    cfg = cfg.copy()
    ckpt = cfg.checkpoint
    if ckpt is None:
        return cfg
    path = Path(ckpt).expanduser()
    presets = sorted(p.stem for p in (conf_dir / "model").glob("*.yaml"))
    taken: tuple[str, ...] = ("model",)
    if _is_run_dir(path):
        weights = path / "checkpoint"
        if not (weights / "config.json").is_file() and not is_adapter_dir(weights):
            raise FileNotFoundError(
                f"checkpoint {ckpt!r} is a run directory without a saved model ({weights} is missing): "
                "trained with trainer.save_checkpoint=false, or the run did not finish"
            )
        run = OmegaConf.load(path / "config_resolved.yaml")
        if is_adapter_dir(weights):  # a LoRA run: its base model, with the saved adapter on top
            model = OmegaConf.to_container(run.model) | {"adapter": str(weights.resolve()), "lora": {"enabled": False}}
        else:
            model = {"kind": "hf", "name": f"{run.model.name}-run", "name_or_path": str(weights.resolve()),
                     "trust_remote_code": run.model.trust_remote_code, "chat_template": run.model.chat_template}
        if cfg.use_run_config:
            taken = ("model", *(k for k in RUN_KEYS if k not in chosen_groups), "bf16")
            for key in taken[1:-1]:
                _replace(cfg, key, run[key])
            cfg.bf16 = run.trainer.bf16
        _replace(cfg, "model", model)
    elif (path / "config.json").is_file():
        _replace(cfg, "model", {"kind": "hf", "name": path.resolve().name, "name_or_path": str(path.resolve())})
    elif is_adapter_dir(path):  # a peft adapter directory: on the base model it names
        try:
            base = adapter_base(path)
        except ValueError as err:
            raise FileNotFoundError(f"checkpoint {ckpt!r}: {err}; evaluate its run directory instead") from err
        _replace(cfg, "model", {"kind": "hf", "name": path.resolve().name, "name_or_path": base,
                                "adapter": str(path.resolve())})
    elif ckpt in presets:
        _replace(cfg, "model", OmegaConf.load(conf_dir / "model" / f"{ckpt}.yaml"))
    else:
        raise FileNotFoundError(
            f"checkpoint {ckpt!r} is not a run directory (with config_resolved.yaml and checkpoint/), "
            f"an HF model directory (with config.json), a peft adapter directory (with adapter_config.json) "
            f"or a model preset ({', '.join(presets)})"
        )
    for o in overrides:
        if o.key_or_group.split(".")[0] in taken and o.key_or_group not in GROUPS:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    return cfg


def _replace(cfg: DictConfig, key: str, value: Any) -> None:
    """Set ``cfg[key]`` to ``value`` as a whole (not merged into the old node, so e.g. a run's
    reward weights do not gain the default's components), keeping the node's schema type."""
    node_type = OmegaConf.get_type(cfg, key)
    if dataclasses.is_dataclass(node_type):
        # A run written by an older calibrl may hold keys the schema has since dropped; they are
        # reported and left out (keys added since take their defaults). Interpolations are kept
        # as written (a preset's `${.name_or_path}` resolves in its new place).
        raw = OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else dict(value)
        known = {f.name for f in dataclasses.fields(node_type)}
        dropped = sorted(str(k) for k in raw if k not in known)
        if dropped:
            log.warning("run config: %s.%s no longer exist(s); ignored", key, ", ".join(dropped))
        value = OmegaConf.merge(OmegaConf.structured(node_type), {k: v for k, v in raw.items() if k in known})
    cfg[key] = value


def _eval_sets(cfg: DictConfig) -> dict[str, DictConfig]:
    """The sets to evaluate, by name: the in-domain ``data`` (unless ``in_domain=false``), then
    ``eval_sets``.

    Raises:
        ConfigError: a name used twice, or nothing to evaluate.
    """
    sets = {cfg.data.name: cfg.data} if cfg.get("in_domain", True) else {}
    for key, node in cfg.eval_sets.items():
        if node.name in sets:
            raise ConfigError(
                f"eval_sets.{key}: eval set name {node.name!r} is used twice; give it another one with "
                f"eval_sets.{key}.name=<name>"
            )
        sets[node.name] = node
    if not sets:
        raise ConfigError("nothing to evaluate: in_domain=false and no eval_sets")
    return sets


def validate_eval_job(cfg: DictConfig) -> EvalConfig:
    """Check a resolved eval job before any model or data is loaded.

    Returns:
        The eval settings (the ``eval`` group as its schema dataclass).

    Raises:
        ConfigError: an unknown registry name, an invalid ``eval.*`` setting or an unknown
            ``logger.mode``.
        FileNotFoundError: a local data path that does not exist.
    """
    from calibrl.data.sources import SOURCES, VERIFIERS

    try:
        completion_format(cfg)
        RewardFunction.from_config(OmegaConf.to_container(cfg.reward, resolve=True))
        settings: EvalConfig = OmegaConf.to_object(cfg.eval)
        check_eval_config(settings)
        for name, node in _eval_sets(cfg).items():
            SOURCES.get(node.source)
            if node.source == "hf":
                VERIFIERS.get(node.verifier)
                if not node.path:
                    raise ValueError(f"eval set {name!r}: source=hf needs a path")
                if node.path.startswith((".", "/", "~")) and not Path(node.path).expanduser().exists():
                    raise FileNotFoundError(f"eval set {name!r}: data path {node.path!r} does not exist")
    except (KeyError, ValueError) as err:
        raise ConfigError(err.args[0]) from err
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"unknown logger.mode {cfg.logger.mode!r}; valid choices: disabled, offline, online")
    if cfg.device not in DEVICES:
        raise ConfigError(f"unknown device {cfg.device!r}; valid choices: {', '.join(DEVICES)}")
    return settings


def _plots(result: EvalResult, settings: EvalConfig, plot_dir: Path) -> dict[str, Path]:
    from calibrl.eval.plots import confidence_histogram, reliability_grid

    correct = np.array([r["correct"] for r in result.predictions], dtype=np.float64)
    panels = {}
    labels = ("verbalized", "answer-token prob.", "lowest-window prob.", "expected stated conf.")
    for signal, label in zip(SIGNALS, labels, strict=True):
        q = signal_values(result.predictions, signal)
        keep = np.isfinite(q)
        if keep.any():
            panels[label] = (q[keep], correct[keep])
    if not panels:
        log.warning("eval set %s: no well-formed completion, no reliability diagram", result.dataset)
        return {}
    name = result.dataset
    verbalized = panels.get("verbalized")
    out = {f"{name}/reliability": reliability_grid(
        panels, plot_dir / f"{name}_reliability.png", n_bins=settings.n_bins,
        title=f"{name}: reliability by confidence signal")}
    if verbalized is not None:
        out[f"{name}/confidence_hist"] = confidence_histogram(
            *verbalized, plot_dir / f"{name}_confidence_hist.png", title=f"{name}: stated confidence")
    return out


def _print_summary(results: dict[str, EvalResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(m: dict[str, float] | None) -> str:
        if not m or not np.isfinite(m["value"]):
            return "n/a"
        ci = f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if np.isfinite(m.get("ci_low", np.nan)) else ""
        return f"{m['value']:.3f}{ci}"

    console = Console(width=200)
    for name, res in results.items():
        r = res.report
        table = Table(title=f"{name}: {r['n_questions']} questions x {r['n_samples']} samples, "
                            f"accuracy {fmt(r['accuracy'])}, format {fmt(r['format_rate'])}")
        cols = ("ece", "brier", "auroc", "aurc", "confident_error_rate", "confidence_mean")
        table.add_column("signal")
        table.add_column("n", justify="right")
        for c in cols:
            table.add_column(c, justify="right")
        for signal, m in r["signals"].items():
            table.add_row(signal, str(m["n"]), *(fmt(m.get(c)) for c in cols))
        console.print(table)
        if r.get("voting"):  # one row per method: accuracy of the voted answer, its calibration
            vt = Table(title=f"{name}: voting over the {r['n_samples']} samples of each question")
            for c in ("method", "accuracy", *cols):
                vt.add_column(c, justify="left" if c == "method" else "right")
            for method, m in r["voting"].items():
                vt.add_row(method, fmt(m["accuracy"]), *(fmt(m[c]) if c in m else "" for c in cols))
            console.print(vt)
        for field_name, labels in r["slices"].items():
            st = Table(title=f"{name} by {field_name} (verbalized confidence)")
            for c in ("slice", "samples", "accuracy", "confidence_mean", "ece", "confident_error_rate"):
                st.add_column(c, justify="left" if c == "slice" else "right")
            for label, s in labels.items():
                v = s["signals"].get("verbalized", {})
                st.add_row(label, str(s["count"]), fmt(s["accuracy"]),
                           *(fmt(v.get(c)) for c in ("confidence_mean", "ece", "confident_error_rate")))
            console.print(st)


def run_eval_job(cfg: DictConfig, out_dir: Path) -> dict[str, EvalResult]:
    """Evaluate the model of a resolved eval job (see :func:`resolve_checkpoint`) on every eval
    set and write the files listed in the module docstring to ``out_dir``.

    Returns:
        Eval set name -> result.

    Raises:
        ConfigError / FileNotFoundError: see :func:`validate_eval_job`; also an eval set that
            cannot be built (unknown task, unreadable file, missing field, ``eval.slice_by`` field
            it does not have; checked before the model is loaded) or a model that cannot be
            loaded.
    """
    settings = validate_eval_job(cfg)
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError(err.args[0]) from err
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    splits = {}
    for name, node in _eval_sets(cfg).items():
        try:
            splits[name] = build_splits(**OmegaConf.to_container(node, resolve=True) | {"train_size": 0})
            check_slice_fields(splits[name].eval, settings.slice_by, name)
        except (KeyError, ValueError) as err:  # a data mistake: bad task, file, field or size
            raise ConfigError(f"eval set {name!r}: {err.args[0]}") from err
        except ConnectionError as err:  # a hub data set with no network
            raise ConfigError(f"eval set {name!r}: {err} (no network here? point its path at a local copy)") from err
    try:
        model, tokenizer = load_policy(ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed))
    except (OSError, ValueError) as err:  # e.g. an HF directory without tokenizer files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model {cfg.model.name_or_path or cfg.model.name!r} could not be loaded: {first}") from err
    model.to(device).eval()
    fmt = completion_format(cfg)
    prompts = PromptBuilder(tokenizer, cfg.prompt.system, fmt, cfg.prompt.think_text)
    reward_fn = RewardFunction.from_config(OmegaConf.to_container(cfg.reward, resolve=True))
    autocast = torch.bfloat16 if cfg.bf16 else None
    lg = cfg.logger
    tracker = Tracker(out_dir, resolved, mode=lg.mode, project=lg.project, entity=lg.entity, group=lg.group,
                      name=lg.name or f"eval-{out_dir.name}", tags=list(lg.tags) or ["eval"], job_type=lg.job_type)
    results: dict[str, EvalResult] = {}
    exit_code = 1
    try:
        for name, split in splits.items():
            with tqdm(total=len(split.eval), desc=f"eval {name}", unit="question") as bar:
                results[name] = evaluate(model, tokenizer, prompts, split.eval, split.is_correct, reward_fn,
                                         settings, dataset=name, autocast_dtype=autocast, progress=bar.update)
        scalars = {f"eval/{name}/{k}": v for name, res in results.items() for k, v in res.scalars().items()}
        tracker.log(scalars, step=0)
        tracker.summary(scalars)
        with (out_dir / "predictions.jsonl").open("w") as f:
            for res in results.values():
                for row in res.predictions:
                    f.write(json.dumps(row) + "\n")
        (out_dir / "eval.json").write_text(report_json(
            {"checkpoint": cfg.checkpoint, "model": resolved["model"], "settings": resolved["eval"],
             "datasets": {name: res.report for name, res in results.items()}}))
        images: dict[str, Path] = {}
        if cfg.plots:
            for res in results.values():
                images |= _plots(res, settings, out_dir / "plots")
        tracker.log_media(images, {"predictions": [r for res in results.values() for r in res.predictions]})
        exit_code = 0
    finally:
        wandb_dir = tracker.wandb_dir
        tracker.close(exit_code)
    _print_summary(results)
    print(f"output directory : {out_dir}")
    print(f"eval report      : {out_dir / 'eval.json'}")
    print(f"predictions      : {out_dir / 'predictions.jsonl'}")
    for key, path in sorted(images.items()):
        print(f"{key:<17}: {path}")
    if wandb_dir:
        print(f"W&B run          : {wandb_dir}")
    return results

