"""The main job: build the parts from a composed config and run SFT warm-up -> eval -> RL -> eval.

Global step: SFT optimizer steps are steps ``1..S``, RL steps ``S+1..S+R``; evals are logged at
the step they follow (0 for the raw model, S after the warm-up, S+R at the end), so train and
eval records at the same step are both kept.

Files in the run directory: ``config_resolved.yaml``, ``metrics.jsonl`` (one JSON object per
log call, flushed each time), ``eval_<stage>.jsonl`` (per-sample predictions), ``eval_<stage>.json``
(the eval report with bootstrap CIs, see :mod:`calibrl.eval.evaluator`), ``summary.json``
(the before/after table), ``checkpoint/`` (final HF model and tokenizer), ``wandb/`` (offline run),
``checkpoints/step*/`` (resumable checkpoints every ``trainer.save_every`` RL steps,
:mod:`calibrl.run.checkpoint`; ``trainer.resume=auto|<path>`` continues from one).

With several processes (DeepSpeed) rank 0 chooses the run directory and writes every file;
see :mod:`calibrl.rl.grpo` for the data-parallel step.

Non-finite steps: an RL step whose update was skipped as non-finite (:mod:`calibrl.rl.grpo`) is
logged as usual but never checkpointed; after ``trainer.max_bad_steps_in_row`` of them in a row
(or a non-finite gradient under DeepSpeed, whose update cannot be undone) the run stops without
saving anything, with exit code :data:`EXIT_NON_FINITE` and one line naming the last good
checkpoint and how to resume from it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from calibrl.run.checkpoint import CheckpointState, find_checkpoint, load_checkpoint, save_checkpoint
from calibrl.config import ConfigError, rl_warmup_steps
from calibrl.data.format import completion_format
from calibrl.run.validate import validate
from calibrl.data import PromptBuilder, build_splits
from calibrl.data.sources import DataSplits
from calibrl.device import default_backend, resolve_device
from calibrl.distributed import all_reduce_sum, broadcast_object, dist_info, init_distributed
from calibrl.eval.evaluator import EvalSettings, check_slice_fields, evaluate, report_json, write_predictions
from calibrl.models import ModelSpec, load_policy
from calibrl.rewards import RewardFunction
from calibrl.rl.engine import TorchEngine
from calibrl.rl.grpo import GRPOSettings, GRPOTrainer
from calibrl.rl.rollout import SamplingCopy
from calibrl.rl.sft import SFTSettings, num_sft_steps, sft_warmup
from calibrl.run.sft_cache import load_sft_cache, save_sft_cache, sft_cache_dir
from calibrl.tracking import Tracker, redact

__all__ = ["run", "EXIT_NON_FINITE", "SUMMARY_METRICS"]

log = logging.getLogger(__name__)

EXIT_NON_FINITE = 3  # the run stopped on non-finite steps (2: a configuration error, 143: SIGTERM)

SUMMARY_METRICS = (
    "accuracy", "format_rate", "confidence_mean", "ece", "brier", "auroc", "aurc", "confident_error_rate",
    "answer_prob/ece", "answer_prob/auroc",
)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _settings(cls: type, *nodes: DictConfig, **explicit: Any) -> Any:
    """Build the settings dataclass ``cls`` by field name: ``explicit`` first, then the first
    config node that has the field (so a renamed field fails loudly instead of shifting)."""
    values = dict(explicit)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            node = next((n for n in nodes if f.name in n), None)
            if node is None:
                raise KeyError(f"no config value for {cls.__name__}.{f.name}")
            values[f.name] = node[f.name]
    return cls(**values)


def _scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters (~5x faster step on CPU than the default).
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, fused=True
    )


def _load_checkpoint(path: Path, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code)


def run_tags(cfg: DictConfig) -> list[str]:
    """W&B tags of a run, so the dashboard can group and filter arms: ``logger.tags``, the
    experiment name, the objective combiner (``combine:<name>``) and the reward components with
    a non-zero weight (``reward:<a>+<b>+...``, sorted), without duplicates."""
    components = sorted(k for k, w in cfg.reward.weights.items() if w != 0)
    tags = [*cfg.logger.tags, cfg.experiment_name, f"combine:{cfg.objective.combine}", "reward:" + "+".join(components)]
    return list(dict.fromkeys(tags))


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


class _SignalFlag:
    """Records that ``signum`` arrived instead of dying on it (installed in the main thread only;
    elsewhere it never fires); :meth:`restore` puts the previous handler back."""

    def __init__(self, signum: int) -> None:
        self.signum, self.raised, self._old = signum, False, None
        try:
            self._old = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(self.signum, self._old)
            self._old = None


def _non_finite_stop(run_dir: Path, rl_step: int, why: str) -> str:
    """The one-line message of a run stopped on non-finite steps: why, the last good checkpoint
    (the newest one: a non-finite step is never saved) and how to resume from it."""
    last = find_checkpoint(run_dir)
    where = (f"last good checkpoint: {last} (resume with trainer.resume={last}, e.g. with a lower trainer.lr)"
             if last is not None else "no checkpoint was saved (trainer.save_every=N saves one every N RL steps)")
    return f"stopped at RL step {rl_step}: {why}; nothing saved after it; {where}"


def _resume_state(resume: str | None, run_dir: Path) -> CheckpointState | None:
    """The checkpoint ``trainer.resume`` names: ``None`` -> none; ``auto`` -> the newest one of
    ``run_dir`` if any; a path -> that checkpoint or the newest one of that run dir.

    Raises:
        ConfigError: a path with no checkpoint in it.
    """
    if resume is None:
        return None
    found = find_checkpoint(run_dir if resume == "auto" else Path(resume).expanduser())
    if found is None and resume != "auto":
        raise ConfigError(f"trainer.resume={resume}: no checkpoint there (a checkpoints/step* dir or a run dir holding one)")
    return load_checkpoint(found) if found is not None else None


def run(cfg: DictConfig, run_dir: Path) -> dict[str, dict[str, float]]:
    """Run the configured job in ``run_dir``.

    Returns:
        Stage name (``raw``, ``sft``, ``final``) -> eval metrics.

    Raises:
        ConfigError / FileNotFoundError: invalid configuration or a missing local path (raised by
            :func:`calibrl.run.validate.validate` before any data or model is loaded), or data that
            cannot be built (unknown task, unreadable file, missing field; before the model loads).
    """
    validate(cfg)
    try:
        device = resolve_device(cfg.trainer.device, dist_info().local_rank)
    except ValueError as err:
        raise ConfigError(err.args[0]) from err
    if device.type == "cpu":
        # read by DeepSpeed when it is first imported (transformers may import it too)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = default_backend(device) if cfg.deepspeed.backend == "auto" else cfg.deepspeed.backend
    info = init_distributed(backend, always=cfg.deepspeed.enabled)
    if info.world_size > 1 and not cfg.deepspeed.enabled:
        raise ConfigError(f"{info.world_size} processes need a DeepSpeed preset (deepspeed=zero1, zero2, zero3 or zero3_offload)")
    if cfg.algo.prompts_per_step % info.world_size:
        raise ConfigError(
            f"algo.prompts_per_step={cfg.algo.prompts_per_step} must be a multiple of the {info.world_size} processes"
        )
    run_dir = broadcast_object(Path(run_dir))  # rank 0's: every rank shares one run directory
    resume = _resume_state(cfg.trainer.resume, run_dir)
    if resume is not None:
        run_dir = resume.path.parent.parent  # continue in the checkpoint's run dir and metrics file
        print(f"resuming from {resume.path} (RL step {resume.rl_step}, global step {resume.global_step})")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    _seed_everything(cfg.seed)
    # Credentials an interpolation put into the config (${oc.env:WANDB_API_KEY}) are never written.
    resolved = redact(OmegaConf.to_container(cfg, resolve=True))
    if info.is_main:
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))

    eval_settings = EvalSettings.from_config(cfg.eval)
    try:
        splits: DataSplits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
        check_slice_fields(splits.eval, eval_settings.slice_by, splits.name)
    except (KeyError, ValueError) as err:  # a data mistake: bad task, file, field or size
        raise ConfigError(f"data: {err.args[0]}") from err
    log.info("data %s: %d train / %d eval examples", splits.name, len(splits.train), len(splits.eval))
    reward_fn = RewardFunction.from_config(OmegaConf.to_container(cfg.reward, resolve=True))  # weights + verifier guard
    spec = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed)
    model, tokenizer = load_policy(spec)
    model.to(device)
    if cfg.trainer.gradient_checkpointing:  # activations recomputed in backward: less memory, ~1/3 more compute
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    fmt = completion_format(cfg)
    prompts = PromptBuilder(tokenizer, cfg.prompt.system, fmt, cfg.prompt.think_text)
    autocast = torch.bfloat16 if cfg.trainer.bf16 else None
    lg = cfg.logger
    tracker = Tracker(
        run_dir, resolved, mode=lg.mode, project=lg.project, entity=lg.entity, group=lg.group,
        name=lg.name or f"{cfg.experiment_name}-{run_dir.name}", tags=run_tags(cfg),
        job_type=lg.job_type, resume_records=resume.records if resume else None,
        run_id=resume.wandb_id if resume else None, writer=info.is_main,
    )
    results: dict[str, dict[str, float]] = dict(resume.results) if resume else {}
    step = resume.global_step if resume else 0
    engine = None  # the update engine, from the RL stage on

    def full_parameters() -> Any:
        """Full policy parameters on every rank (collective under ZeRO-3; a no-op otherwise)."""
        return engine.generation() if engine is not None else contextlib.nullcontext()

    def run_eval(stage: str) -> None:
        with full_parameters(), tqdm(total=len(splits.eval), desc=f"eval [{stage}]", unit="question", leave=False) as bar:
            result = evaluate(
                model, tokenizer, prompts, splits.eval, splits.is_correct, reward_fn, eval_settings,
                dataset=splits.name, autocast_dtype=autocast, progress=bar.update, dist=info,
            )
        if info.is_main:
            write_predictions(result, run_dir / f"eval_{stage}.jsonl")
            (run_dir / f"eval_{stage}.json").write_text(report_json(result.report))
        results[stage] = result.scalars()
        tracker.log({f"eval/{splits.name}/{k}": v for k, v in results[stage].items()}, step=step)

    exit_code = 1
    preempted = _SignalFlag(signal.SIGTERM)
    try:
        if resume is None and cfg.data.on_bad_row == "skip":
            tracker.log({"data/skipped_rows": float(splits.skipped_rows)}, step=step)
        if resume is None:
            if cfg.eval.raw_model:
                run_eval("raw")
            sft_cfg = cfg.trainer.sft
            cache_at = sft_cache_dir(cfg) if sft_cfg.enabled and sft_cfg.cache else None
            cached = load_sft_cache(cache_at) if cache_at is not None else None
            if cached is not None:
                log.info("SFT warm-up and its eval loaded from the cache %s", cached.path)
                print(f"SFT warm-up: loaded from the cache {cached.path}")
                model = _load_checkpoint(cached.path / "checkpoint", cfg.model.trust_remote_code).to(device)
                for record in cached.records:
                    tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
                step = cached.last_step
                if info.is_main:
                    cached.copy_eval_files(run_dir)
                results["sft"] = cached.eval_scalars
                tracker.log({f"eval/{splits.name}/{k}": v for k, v in cached.eval_scalars.items()}, step=step)
                cached.restore_rng()  # the RL trajectory then equals that of a run that did the warm-up
            else:
                records: list[dict[str, float]] = []
                if sft_cfg.enabled:
                    ss = _settings(
                        SFTSettings, sft_cfg, cfg.trainer,
                        confidence_policy=sft_cfg.confidence.policy,
                        confidence_kwargs={k: v for k, v in sft_cfg.confidence.items() if k != "policy"},
                        seed=cfg.seed,
                    )
                    total = num_sft_steps(len(splits.train), ss)
                    opt = _optimizer(model, sft_cfg.lr, cfg.trainer.weight_decay)
                    sched = _scheduler("linear", opt, math.ceil(sft_cfg.warmup_ratio * total), total)
                    with tqdm(total=total, desc="SFT warm-up", unit="step") as bar:

                        def on_sft_step(i: int, metrics: dict[str, float]) -> None:
                            tracker.log(metrics, step=i)
                            records.append({"step": i, **metrics})
                            bar.update(1)
                            bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")

                        step = sft_warmup(model, tokenizer, prompts, splits.train, ss, opt, sched, on_sft_step)
                    del opt, sched
                run_eval("sft" if sft_cfg.enabled else "start")
                if cache_at is not None and info.is_main:
                    save_sft_cache(cache_at, model, tokenizer, records, results["sft"], run_dir)

        a, t = cfg.algo, cfg.trainer
        settings = _settings(GRPOSettings, a, t, cfg.objective)
        # A full frozen copy on every rank, also under ZeRO-3 (taken before DeepSpeed shards the policy).
        reference = copy.deepcopy(model).eval().requires_grad_(False) if a.beta > 0 else None
        # Like the reference, copied before DeepSpeed wraps the policy; ZeRO-3 shards it: none there.
        zero3 = cfg.deepspeed.enabled and cfg.deepspeed.stage == 3
        sampler = SamplingCopy(model) if t.bf16 and t.bf16_sampler and not zero3 else None
        opt = _optimizer(model, t.lr, t.weight_decay)
        sched = _scheduler(t.lr_scheduler, opt, rl_warmup_steps(t), t.max_steps)
        if cfg.deepspeed.enabled:
            from calibrl.rl.deepspeed_engine import DeepSpeedEngine, deepspeed_config

            rows = a.prompts_per_step // info.world_size * a.group_size  # completions per rank and step
            ds = cfg.deepspeed
            engine = DeepSpeedEngine(model, opt, sched, deepspeed_config(
                stage=ds.stage, offload=ds.offload, fp16=ds.fp16, micro_batch_size=t.micro_batch_size,
                accumulation_steps=math.ceil(rows / t.micro_batch_size), max_grad_norm=t.max_grad_norm,
            ))
        else:
            engine = TorchEngine(model, opt, sched, t.max_grad_norm)
        trainer = GRPOTrainer(
            engine, tokenizer, prompts, splits.train, splits.is_correct, reward_fn, settings, reference, seed=cfg.seed,
            dist=info, sampler=sampler,
        )
        if info.world_size > 1 and resume is None:
            # The warm-up is replicated on every rank (same seed, same weights); from here each
            # rank samples rollouts for its own prompts and needs its own random stream.
            torch.manual_seed(cfg.seed + 1_000_003 * info.rank)
        first = 1
        if resume is not None:
            engine.load(resume.path)
            if reference is not None:
                reference.load_state_dict(torch.load(resume.path / "reference.pt", weights_only=True))
            trainer.load_state_dict(resume.trainer)
            resume.restore_rng()  # last: the run continues exactly where the saved one was
            first = resume.rl_step + 1

        def checkpoint(i: int) -> None:
            at = save_checkpoint(
                run_dir, engine, global_step=step, rl_step=i, trainer_state=trainer.state_dict(),
                wandb_id=tracker.run_id, records=tracker.records, results=results, keep_last=t.keep_last,
                reference=reference,
            )
            log.info("checkpoint at RL step %d: %s", i, at)

        def stop_non_finite(i: int, why: str, bar: Any) -> None:
            message = _non_finite_stop(run_dir, i, why)
            log.error(message)
            bar.close()  # the progress bar's last redraw would come after the message otherwise
            if info.is_main:
                print(f"calibrl-train: {message}", file=sys.stderr)
            raise SystemExit(EXIT_NON_FINITE)

        with tqdm(total=t.max_steps, initial=first - 1, desc="RL", unit="step") as bar:
            for i in range(first, t.max_steps + 1):
                try:
                    metrics = trainer.step()
                except FloatingPointError as err:  # DeepSpeed: the update was applied already
                    exit_code = EXIT_NON_FINITE
                    stop_non_finite(i, str(err), bar)
                step += 1
                tracker.log(metrics | {"train/rl_step": i}, step=step)
                bar.update(1)
                bar.set_postfix(
                    acc=f"{metrics['train/accuracy']:.2f}", conf=f"{metrics['train/confidence_mean']:.2f}",
                    fmt=f"{metrics['train/format_rate']:.2f}", r=f"{metrics['rewards/total/mean']:.2f}",
                )
                bad = trainer.bad_steps_in_row
                if t.max_bad_steps_in_row and bad >= t.max_bad_steps_in_row:
                    exit_code = EXIT_NON_FINITE
                    stop_non_finite(i, f"{bad} RL steps in a row had a non-finite loss or gradient "
                                       f"(trainer.max_bad_steps_in_row={t.max_bad_steps_in_row})", bar)
                if t.eval_every and i % t.eval_every == 0 and i < t.max_steps:
                    run_eval(f"step{i}")
                stop = all_reduce_sum([float(preempted.raised)])[0] > 0  # a signal to any rank stops all
                save = (t.save_every and i % t.save_every == 0) or stop
                if save and bad:
                    log.warning("RL step %d skipped its update as non-finite: not checkpointed", i)
                elif save:
                    checkpoint(i)
                if stop:
                    saved = f"checkpoint saved at RL step {i}" if not bad else f"RL step {i} was non-finite: not saved"
                    print(f"SIGTERM: {saved}; resume with trainer.resume={run_dir}")
                    exit_code = 128 + signal.SIGTERM
                    raise SystemExit(exit_code)
        run_eval("final")
        if t.save_checkpoint:
            with full_parameters():
                if info.is_main:
                    model.save_pretrained(run_dir / "checkpoint")
                    tokenizer.save_pretrained(run_dir / "checkpoint")
        tracker.summary({f"final/{k}": v for k, v in results["final"].items()})
        exit_code = 0
    finally:
        preempted.restore()
        wandb_dir = tracker.wandb_dir
        tracker.close(exit_code)
        if info.is_main:
            (run_dir / "summary.json").write_text(json.dumps(results, indent=2))
    if not info.is_main:
        return results

    _print_table({s: r for s, r in results.items() if not s.startswith("step")}, splits.name)
    print(f"run directory : {run_dir}")
    print(f"metrics file  : {tracker.metrics_path}")
    if cfg.trainer.save_checkpoint:
        print(f"checkpoint    : {run_dir / 'checkpoint'}")
    if wandb_dir:
        print(f"W&B run       : {wandb_dir}" + (f"  (sync: wandb sync {wandb_dir})" if cfg.logger.mode == "offline" else ""))
    return results
