"""Turn a composed config into the typed parts of a run: :func:`build` -> :class:`RunParts`.

Nothing here trains or evaluates; the stages (:mod:`calibrl.run.stages`) run the parts. What
:func:`build` does, in this order (the order fixes the random streams a run draws from): resolve
the device and join the process group (checking the process count against the DeepSpeed preset
and ``algo.prompts_per_step``), agree on rank 0's run directory, resolve ``trainer.resume``
(a resumed run continues in its checkpoint's run directory), create the run directory, set the
torch thread count, seed Python, NumPy and torch with ``seed``, write ``config_resolved.yaml``
(credentials redacted), build the data splits, the reward function, the policy and tokenizer
(on the device, HF activation checkpointing on with ``trainer.gradient_checkpointing``), the prompt
builder and the tracker (``metrics.jsonl`` and W&B).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from calibrl.config import Config, ConfigError
from calibrl.data import PromptBuilder, build_splits
from calibrl.data.format import completion_format
from calibrl.data.sources import DataSplits
from calibrl.device import default_backend, resolve_device
from calibrl.distributed import DistInfo, broadcast_object, dist_info, init_distributed
from calibrl.eval.evaluator import check_slice_fields
from calibrl.lora import apply_lora, load_adapter
from calibrl.models import ModelSpec, load_policy
from calibrl.rewards import RewardFunction
from calibrl.rl.self_label import self_label_items
from calibrl.run.checkpoint import CheckpointState
from calibrl.run.guards import resume_state
from calibrl.tracking import Tracker, redact

__all__ = [
    "RunParts", "build", "keep_changed_config", "load_warmed_up", "make_optimizer", "make_scheduler", "place_policy",
    "run_tags",
]

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """Everything a run is made of, built once by :func:`build`.

    Attributes:
        cfg: the composed config (its resolved form keys the SFT cache, goes to the tracker).
        settings: the same config as its schema dataclasses, the settings the stages read
            (:class:`calibrl.config.Config`: ``settings.algo`` is an ``AlgoConfig``, ...).
        run_dir: the run directory (rank 0's on every rank; a resumed run's checkpoint's).
        device: this process's torch device.
        dist: this process's rank and the world size.
        splits: train and eval examples and the verifier.
        reward_fn: the weighted reward components (with the verifier guard).
        model: the policy, an HF causal LM in fp32 on ``device`` (a ``peft.PeftModel`` with
            ``model.lora.enabled``); trained in place (the SFT cache stage replaces it with the
            stored warmed-up model).
        tokenizer: its tokenizer (left padding).
        prompts: builds chat prompts and knows the completion format.
        tracker: ``metrics.jsonl`` and W&B (rank 0 writes).
        resume: the checkpoint to continue from, or ``None`` for a fresh run.
        autocast_dtype: ``torch.bfloat16`` with ``trainer.bf16`` (evals' autocast), else ``None``.
    """

    cfg: DictConfig
    settings: Config
    run_dir: Path
    device: torch.device
    dist: DistInfo
    splits: DataSplits
    reward_fn: RewardFunction
    model: Any
    tokenizer: Any
    prompts: PromptBuilder
    tracker: Tracker
    resume: CheckpointState | None
    autocast_dtype: torch.dtype | None


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``model``."""
    # fused: one kernel over all parameters (~5x faster step on CPU than the default).
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, fused=True
    )


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """The ``transformers.get_scheduler`` schedule ``name`` over ``total`` steps (at least 1)."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def run_tags(cfg: DictConfig) -> list[str]:
    """W&B tags of a run, so the dashboard can group and filter arms: ``logger.tags``, the
    experiment name, the objective combiner (``combine:<name>``) and the reward components with
    a non-zero weight (``reward:<a>+<b>+...``, sorted), without duplicates."""
    components = sorted(k for k, w in cfg.reward.weights.items() if w != 0)
    tags = [*cfg.logger.tags, cfg.experiment_name, f"combine:{cfg.objective.combine}", "reward:" + "+".join(components)]
    return list(dict.fromkeys(tags))


def _processes(settings: Config) -> tuple[torch.device, DistInfo]:
    """This process's device and its place in the process group (joined here).

    Raises:
        ConfigError: an unknown device, several processes without DeepSpeed, or
            ``algo.prompts_per_step`` not a multiple of the process count.
    """
    try:
        device = resolve_device(settings.trainer.device, dist_info().local_rank)
    except ValueError as err:
        raise ConfigError(err.args[0]) from err
    if device.type == "cpu":
        # read by DeepSpeed when it is first imported (transformers may import it too)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds = settings.deepspeed
    info = init_distributed(default_backend(device) if ds.backend == "auto" else ds.backend, always=ds.enabled)
    if info.world_size > 1 and not ds.enabled:
        raise ConfigError(f"{info.world_size} processes need a DeepSpeed preset (deepspeed=zero1, zero2, zero3 or zero3_offload)")
    if settings.algo.prompts_per_step % info.world_size:
        raise ConfigError(
            f"algo.prompts_per_step={settings.algo.prompts_per_step} must be a multiple of the {info.world_size} processes"
        )
    return device, info


def _splits(cfg: DictConfig, settings: Config) -> DataSplits:
    """The data splits, with the eval set's ``eval.slice_by`` fields checked, and, with
    ``trainer.self_label.enabled``, enough training rows for its questions.

    Raises:
        ConfigError: a data mistake (unknown task, unreadable file, missing field, bad size, too
            few training rows for ``trainer.sft.num_examples + trainer.self_label.num_examples``),
            or a hub data set that cannot be reached.
    """
    try:
        splits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
        check_slice_fields(splits.eval, settings.eval.slice_by, splits.name)
        t = settings.trainer
        if t.self_label.enabled:  # enough training rows for its questions after the SFT demonstrations
            self_label_items(splits.train, t.sft.num_examples, t.self_label.num_examples)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"data: {err.args[0]}") from err
    except ConnectionError as err:  # a hub data set with no network (datasets raises it after retrying)
        raise ConfigError(f"data: {err} (no network here? point data.path at a local copy)") from err
    log.info("data %s: %d train / %d eval examples", splits.name, len(splits.train), len(splits.eval))
    return splits


def place_policy(model: Any, device: torch.device, gradient_checkpointing: bool) -> Any:
    """``model`` on ``device``, with HF activation checkpointing switched on when
    ``gradient_checkpointing`` (activations recomputed in backward: less memory, ~1/3 more
    compute). Every policy a run trains goes through here: the loaded one and the SFT cache's."""
    model.to(device)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _model_spec(cfg: DictConfig) -> ModelSpec:
    return ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed)


def _policy(cfg: DictConfig, settings: Config, device: torch.device) -> tuple[Any, Any]:
    """The policy (fp32, on ``device``; a peft model with ``model.lora.enabled``) and its tokenizer.

    Raises:
        ConfigError: a ``model.lora.target_modules`` name that matches no linear layer (the
            message lists the model's).
    """
    model, tokenizer = load_policy(_model_spec(cfg))
    if settings.model.lora.enabled:
        try:
            model = apply_lora(model, settings.model.lora)
        except ValueError as err:
            raise ConfigError(err.args[0]) from err
    return place_policy(model, device, cfg.trainer.gradient_checkpointing), tokenizer


def load_warmed_up(cfg: DictConfig, settings: Config, path: Path, device: torch.device) -> Any:
    """A stored warmed-up policy (an SFT cache entry's ``checkpoint/``) on ``device``, ready to
    train on: a full HF checkpoint, or with ``model.lora.enabled`` a peft adapter directory loaded
    (trainable) on the base model."""
    from transformers import AutoModelForCausalLM

    if settings.model.lora.enabled:
        base, _ = load_policy(_model_spec(cfg))
        model = load_adapter(base, path, trainable=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, trust_remote_code=settings.model.trust_remote_code,
        )
    return place_policy(model, device, settings.trainer.gradient_checkpointing)


def _run_dir(run_dir: Path, settings: Config, info: DistInfo) -> tuple[Path, CheckpointState | None]:
    """Rank 0's run directory (created) and the checkpoint to resume from; a resumed run
    continues in its checkpoint's run directory and metrics file.

    Raises:
        ConfigError: ``trainer.resume`` names a path with no checkpoint.
    """
    run_dir = broadcast_object(Path(run_dir))  # rank 0's: every rank shares one run directory
    resume = resume_state(settings.trainer.resume, run_dir)
    if resume is not None:
        run_dir = resume.path.parent.parent
        print(f"resuming from {resume.path} (RL step {resume.rl_step}, global step {resume.global_step})")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, resume


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def keep_changed_config(run_dir: Path, resolved: dict[str, Any], rl_step: int) -> list[str]:
    """Before a resumed run writes its ``config_resolved.yaml``: when the run's existing one
    differs from ``resolved`` in anything but ``trainer.resume``, keep it as
    ``config_resolved.before_resume_step<rl_step>.yaml`` (the metrics before the resume were made
    with it) and log a warning naming the changed keys.

    Returns:
        The changed keys (dotted), sorted; empty when nothing but ``trainer.resume`` changed or the
        run dir has no ``config_resolved.yaml``.
    """
    path = run_dir / "config_resolved.yaml"
    if not path.is_file():
        return []
    old, new = _flat(OmegaConf.to_container(OmegaConf.load(path))), _flat(resolved)
    changed = sorted(k for k in old.keys() | new.keys() if k != "trainer.resume" and old.get(k) != new.get(k))
    if changed:
        kept = run_dir / f"config_resolved.before_resume_step{rl_step}.yaml"
        path.replace(kept)
        log.warning("resumed with a changed config (%s); the config of the steps before is kept in %s",
                    ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed), kept.name)
    return changed


def build(cfg: DictConfig, run_dir: Path) -> RunParts:
    """Build the parts of the run that ``cfg`` (a composed, validated main config) describes, in
    ``run_dir`` (see the module docstring for what is done, in which order).

    Raises:
        ConfigError: an unknown device, a process count that does not fit, a ``trainer.resume``
            path without a checkpoint, or data that cannot be built (before the model loads).
    """
    settings: Config = OmegaConf.to_object(cfg)
    device, info = _processes(settings)
    run_dir, resume = _run_dir(run_dir, settings, info)
    if settings.trainer.num_threads > 0:
        torch.set_num_threads(settings.trainer.num_threads)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    # Credentials an interpolation put into the config (${oc.env:WANDB_API_KEY}) are never written.
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    if info.is_main:
        if resume is not None:
            keep_changed_config(run_dir, resolved, resume.rl_step)
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    splits = _splits(cfg, settings)
    reward_fn = RewardFunction.from_config(OmegaConf.to_container(cfg.reward, resolve=True))  # weights + verifier guard
    model, tokenizer = _policy(cfg, settings, device)
    prompts = PromptBuilder(tokenizer, cfg.prompt.system, completion_format(cfg), cfg.prompt.think_text)
    lg = cfg.logger
    tracker = Tracker(
        run_dir, resolved, mode=lg.mode, project=lg.project, entity=lg.entity, group=lg.group,
        name=lg.name or f"{cfg.experiment_name}-{run_dir.name}", tags=run_tags(cfg),
        job_type=lg.job_type, resume_records=resume.records if resume else None,
        run_id=resume.wandb_id if resume else None, writer=info.is_main,
    )
    return RunParts(
        cfg, settings, run_dir, device, info, splits, reward_fn, model, tokenizer, prompts, tracker, resume,
        torch.bfloat16 if settings.trainer.bf16 else None,
    )
