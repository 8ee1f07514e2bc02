"""The named stages of the main job, run in this order by :func:`calibrl.run.pipeline.run` on the
parts :func:`calibrl.run.build.build` made:

1. :func:`log_data`, :func:`log_model` and :func:`raw_eval` (a fresh run only): the count of
   skipped malformed data rows (``data.on_bad_row=skip``), the policy's parameter counts and,
   with ``eval.raw_model``, an eval of the raw model (``raw``).
2. :func:`sft_warm_up` (a fresh run only): the format warm-up (:mod:`calibrl.rl.sft`), or its
   stored copy from the SFT cache (``trainer.sft.cache``, :mod:`calibrl.run.sft_cache`), then an
   eval (``sft``; ``start`` without a warm-up).
   :func:`self_label_warm_up` (a fresh run with ``trainer.self_label.enabled``): the
   self-labelled confidence warm-up (:mod:`calibrl.rl.self_label`; the greedy answers come from
   the evaluator), or its stored copy from the cache, then an eval (``self_label``).
3. :func:`setup_rl` then :func:`rl_loop`: the GRPO trainer (:mod:`calibrl.rl.grpo`) on its update
   engine, restored from ``trainer.resume``; one RL step per iteration, with the guards of
   :mod:`calibrl.run.guards` (evals ``step<i>``, resumable checkpoints, non-finite and SIGTERM stops).
4. :func:`final_eval_and_save`: the final eval (``final``) and the HF checkpoint (in
   ``trainer.save_dtype``).

Global step: SFT optimizer steps are steps ``1..S``, self-label steps ``S+1..S+K`` (K = 0 when it
is off), RL steps ``S+K+1..S+K+R``; evals are logged at the step they follow (0 for the raw model,
S after the SFT warm-up, S+K after the self-labelled one, S+K+R at the end). Each eval ``<stage>``
writes ``eval_<stage>.jsonl`` (per-sample predictions) and ``eval_<stage>.json`` (the report with
bootstrap CIs, :mod:`calibrl.eval.evaluator`) to the run directory (rank 0).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from calibrl.config import rl_warmup_steps
from calibrl.data.example import Example
from calibrl.distributed import all_reduce_sum
from calibrl.eval.evaluator import evaluate, report_json, write_predictions
from calibrl.lora import AdapterReference, is_peft, merged_model, parameter_counts
from calibrl.models import honour_umask
from calibrl.rl.engine import Engine, TorchEngine
from calibrl.rl.calibration import resolve_grid_step
from calibrl.rl.grpo import GRPOTrainer
from calibrl.rl.rollout import SamplingCopy
from calibrl.rl.self_label import (
    LABEL_SIGNALS, Answered, LabelSignal, build_label_set, num_self_label_steps, self_label_items, self_label_warmup,
)
from calibrl.rl.sft import num_sft_steps, sft_warmup
from calibrl.run.build import RunParts, load_warmed_up, make_optimizer, make_scheduler
from calibrl.run.checkpoint import save_checkpoint
from calibrl.run.guards import EXIT_NON_FINITE, Cadence, RunStopped, SignalFlag, non_finite_message
from calibrl.run.sft_cache import SFTCacheEntry, load_sft_cache, save_sft_cache, self_label_cache_dir, sft_cache_dir

__all__ = [
    "RL", "RunState", "answer_items", "final_eval_and_save", "log_data", "log_model", "raw_eval", "rl_loop", "run_eval",
    "save_final_model", "self_label_warm_up", "setup_rl", "sft_warm_up",
]

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the stages advance.

    Attributes:
        step: global step of the last logged record.
        results: eval stage name -> flat eval scalars, for the evals done so far.
        engine: the update engine, from :func:`setup_rl` on (``None`` before).
    """

    step: int = 0
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    engine: Engine | None = None


@dataclass
class RL:
    """The RL stage's objects (:func:`setup_rl`).

    Attributes:
        trainer: the GRPO trainer.
        engine: its update engine (the policy, optimizer and scheduler).
        reference: the frozen reference model (``algo.beta > 0``; a LoRA run's is
            :class:`calibrl.lora.AdapterReference`), or ``None``.
        first: the first RL step to run (1, or the step after the resumed checkpoint's).
    """

    trainer: GRPOTrainer
    engine: Engine
    reference: Any
    first: int


def _full_parameters(state: RunState) -> contextlib.AbstractContextManager[Any]:
    """Full policy parameters on every rank (collective under ZeRO-3; a no-op otherwise)."""
    return state.engine.generation() if state.engine is not None else contextlib.nullcontext()


def run_eval(parts: RunParts, state: RunState, stage: str) -> None:
    """Evaluate the policy on the eval set: ``eval_<stage>.jsonl`` and ``eval_<stage>.json`` in
    the run directory, ``state.results[stage]``, and ``eval/<dataset>/...`` logged at ``state.step``."""
    splits, name = parts.splits, parts.splits.name
    with _full_parameters(state), tqdm(total=len(splits.eval), desc=f"eval [{stage}]", unit="question", leave=False) as bar:
        result = evaluate(
            parts.model, parts.tokenizer, parts.prompts, splits.eval, splits.is_correct, parts.reward_fn,
            parts.settings.eval, dataset=name, autocast_dtype=parts.autocast_dtype, progress=bar.update,
            dist=parts.dist,
        )
    if parts.dist.is_main:
        write_predictions(result, parts.run_dir / f"eval_{stage}.jsonl")
        (parts.run_dir / f"eval_{stage}.json").write_text(report_json(result.report))
    state.results[stage] = result.scalars()
    parts.tracker.log({f"eval/{name}/{k}": v for k, v in state.results[stage].items()}, step=state.step)


def log_data(parts: RunParts, state: RunState) -> None:
    """Log ``data/skipped_rows`` once, at the start of a fresh run that skips malformed rows."""
    if parts.settings.data.on_bad_row == "skip":
        parts.tracker.log({"data/skipped_rows": float(parts.splits.skipped_rows)}, step=state.step)


def log_model(parts: RunParts, state: RunState) -> None:
    """At the start of a fresh run: the policy's parameter counts (peft's own count for a LoRA
    policy, :func:`calibrl.lora.parameter_counts`) in the log and on stdout, and as
    ``model/trainable_params`` and ``model/total_params`` in the W&B summary (not in
    ``metrics.jsonl``, which holds the curves)."""
    trainable, total = parameter_counts(parts.model)
    line = f"policy: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)"
    log.info(line)
    if parts.dist.is_main:
        print(line)
    parts.tracker.summary({"model/trainable_params": trainable, "model/total_params": total})


def raw_eval(parts: RunParts, state: RunState) -> None:
    """With ``eval.raw_model``: evaluate the raw model (stage ``raw``, step 0)."""
    if parts.settings.eval.raw_model:
        run_eval(parts, state, "raw")


def _from_cache(parts: RunParts, state: RunState, cached: SFTCacheEntry, what: str) -> None:
    """Take a warm-up (``what``, for the messages) and its eval from the cache: the warmed-up
    model replaces ``parts.model``, the warm-up's records and the eval are logged again, and the
    RNG states are restored, so the RL trajectory equals that of a run that did the warm-up."""
    log.info("%s and its eval loaded from the cache %s", what, cached.path)
    print(f"{what}: loaded from the cache {cached.path}")
    parts.model = load_warmed_up(parts.cfg, parts.settings, cached.path / "checkpoint", parts.device)
    for record in cached.records:
        parts.tracker.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    state.step = cached.last_step
    if parts.dist.is_main:
        cached.copy_eval_files(parts.run_dir)
    state.results[cached.stage] = cached.eval_scalars
    parts.tracker.log({f"eval/{parts.splits.name}/{k}": v for k, v in cached.eval_scalars.items()}, step=state.step)
    cached.restore_rng()


def _train_sft(parts: RunParts, state: RunState) -> list[dict[str, float]]:
    """Run the warm-up (global steps 1..S, logged as ``sft/...``); returns its log records."""
    t = parts.settings.trainer
    total = num_sft_steps(len(parts.splits.train), t.sft)
    opt = make_optimizer(parts.model, t.sft.lr, t.weight_decay)
    sched = make_scheduler("linear", opt, math.ceil(t.sft.warmup_ratio * total), total)
    records: list[dict[str, float]] = []
    with tqdm(total=total, desc="SFT warm-up", unit="step") as bar:

        def on_step(i: int, metrics: dict[str, float]) -> None:
            parts.tracker.log(metrics, step=i)
            records.append({"step": i, **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}")

        state.step = sft_warmup(parts.model, parts.tokenizer, parts.prompts, parts.splits.train, t, opt, sched, on_step,
                                seed=parts.settings.seed)
    return records


def sft_warm_up(parts: RunParts, state: RunState) -> None:
    """The SFT warm-up (``trainer.sft.enabled``) and the eval after it (``sft``, or ``start``
    without a warm-up); with ``trainer.sft.cache`` both are loaded from, or stored to, the cache."""
    sft = parts.settings.trainer.sft
    cache_at = sft_cache_dir(parts.cfg) if sft.enabled and sft.cache else None
    cached = load_sft_cache(cache_at) if cache_at is not None else None
    if cached is not None:
        _from_cache(parts, state, cached, "SFT warm-up")
        return
    records = _train_sft(parts, state) if sft.enabled else []
    run_eval(parts, state, "sft" if sft.enabled else "start")
    if cache_at is not None and parts.dist.is_main:
        save_sft_cache(cache_at, parts.model, parts.tokenizer, records, state.results["sft"], parts.run_dir)


def answer_items(
    parts: RunParts, items: list[Example], label_signal: LabelSignal, progress: Callable[[int], None] | None = None,
) -> list[Answered]:
    """Greedy answers of the policy to ``items`` through the evaluator (``eval`` settings: token
    cap, batch size; one greedy completion each, with the answer-token probability when
    ``label_signal`` needs it) and, when it needs them, ``trainer.self_label.n_samples`` sampled
    answers each (temperature 1, seeded with ``seed``; the caller's RNG is left as it was).
    ``progress`` receives the questions done, once per pass."""
    s = parts.settings
    base = dataclasses.replace(s.eval, n_bootstrap=0, slice_by=[], grid_step=None)

    def rows_by_id(settings: Any) -> dict[str, list[dict[str, Any]]]:
        rows = evaluate(
            parts.model, parts.tokenizer, parts.prompts, items, parts.splits.is_correct, parts.reward_fn, settings,
            dataset=parts.splits.name, autocast_dtype=parts.autocast_dtype, progress=progress, dist=parts.dist,
        ).predictions
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            out.setdefault(row["id"], []).append(row)
        return out

    greedy = rows_by_id(dataclasses.replace(base, n_samples=1, do_sample=False,
                                            intrinsic=label_signal.needs_answer_prob))
    sampled: dict[str, list[dict[str, Any]]] = {}
    if label_signal.needs_samples:
        sampled = rows_by_id(dataclasses.replace(base, n_samples=s.trainer.self_label.n_samples, do_sample=True,
                                                 temperature=1.0, intrinsic=False))
    answered = []
    for e in items:
        (row,) = greedy[e.id]
        prob = math.nan if row["answer_prob"] is None else row["answer_prob"]
        answered.append(Answered(e, row["completion"], bool(row["correct"]), prob,
                                 tuple(r["answer"] for r in sampled.get(e.id, []))))
    return answered


def _train_self_label(parts: RunParts, state: RunState) -> list[dict[str, float]]:
    """Answer, relabel and fine-tune (:mod:`calibrl.rl.self_label`; global steps S+1..S+K, logged
    as ``self_label/...``), then log the label-set metrics and the times at the last step; returns
    the log records. (:func:`calibrl.run.build.build` checked that the training set holds the
    questions.)"""
    s, t = parts.settings, parts.settings.trainer
    sl, start = t.self_label, time.perf_counter()
    items = self_label_items(parts.splits.train, t.sft.num_examples, sl.num_examples)
    label_signal = LABEL_SIGNALS.get(sl.signal)
    passes = 2 if label_signal.needs_samples else 1
    with tqdm(total=passes * len(items), desc="self-label answers", unit="question", leave=False) as bar:
        answered = answer_items(parts, items, label_signal, progress=bar.update)
    answer_s = time.perf_counter() - start
    labels = build_label_set(answered, sl, t.sft.confidence.grid_step, parts.prompts.fmt, s.seed)
    m = labels.metrics
    log.info("self-label: fit on %d of %d items, %d relabelled completions, %d dropped (not well formed or no signal)",
             m["self_label/fit_points"], m["self_label/n_fit"], m["self_label/n_label"], m["self_label/n_dropped"])
    total = num_self_label_steps(len(labels.items), sl)
    opt = make_optimizer(parts.model, sl.lr, t.weight_decay)
    sched = make_scheduler("linear", opt, math.ceil(sl.warmup_ratio * total), total)
    records: list[dict[str, float]] = []
    first = state.step
    with tqdm(total=total, desc="self-label warm-up", unit="step") as bar:

        def on_step(i: int, metrics: dict[str, float]) -> None:
            parts.tracker.log(metrics, step=first + i)
            records.append({"step": first + i, **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['self_label/loss']:.3f}")

        state.step += self_label_warmup(parts.model, parts.tokenizer, parts.prompts, labels.items, t, opt, sched,
                                        on_step, seed=s.seed)
    summary = m | {"perf/self_label_answer_s": answer_s, "perf/self_label_s": time.perf_counter() - start}
    parts.tracker.log(summary, step=state.step)
    return [*records, {"step": state.step, **summary}]


def self_label_warm_up(parts: RunParts, state: RunState) -> None:
    """With ``trainer.self_label.enabled``: the self-labelled confidence warm-up and the eval after
    it (``self_label``); with ``trainer.sft.cache`` both are loaded from, or stored to, the cache
    (:func:`calibrl.run.sft_cache.self_label_cache_dir`)."""
    t = parts.settings.trainer
    if not t.self_label.enabled:
        return
    cache_at = self_label_cache_dir(parts.cfg) if t.sft.cache else None
    cached = load_sft_cache(cache_at) if cache_at is not None else None
    if cached is not None:
        _from_cache(parts, state, cached, "self-labelled warm-up")
        return
    records = _train_self_label(parts, state)
    run_eval(parts, state, "self_label")
    if cache_at is not None and parts.dist.is_main:
        save_sft_cache(cache_at, parts.model, parts.tokenizer, records, state.results["self_label"], parts.run_dir,
                       stage="self_label")


def _engine(parts: RunParts, opt: torch.optim.Optimizer, sched: Any) -> Engine:
    """The update engine: DeepSpeed (``deepspeed.enabled``) or one plain torch process."""
    s, t = parts.settings, parts.settings.trainer
    if not s.deepspeed.enabled:
        return TorchEngine(parts.model, opt, sched, t.max_grad_norm)
    from calibrl.rl.deepspeed_engine import DeepSpeedEngine, deepspeed_config

    rows = s.algo.prompts_per_step // parts.dist.world_size * s.algo.group_size  # completions per rank and step
    ds = s.deepspeed
    return DeepSpeedEngine(parts.model, opt, sched, deepspeed_config(
        stage=ds.stage, offload=ds.offload, fp16=ds.fp16, micro_batch_size=t.micro_batch_size,
        accumulation_steps=math.ceil(rows / t.micro_batch_size), max_grad_norm=t.max_grad_norm,
    ))


def setup_rl(parts: RunParts, state: RunState) -> RL:
    """Build the RL stage: reference model (``algo.beta > 0``; with LoRA the policy with its
    adapters off), bf16 sampling copy
    (``trainer.bf16_sampler``), optimizer, schedule, engine and trainer; a resumed run restores
    engine, reference, trainer and RNG states from its checkpoint. Sets ``state.engine``."""
    s, a, t, model = parts.settings, parts.settings.algo, parts.settings.trainer, parts.model
    reference = None
    if a.beta > 0 and is_peft(model):  # the base model: the policy with its adapters off, no copy
        reference = AdapterReference(model)
    elif a.beta > 0:  # a full frozen copy on every rank, also under ZeRO-3 (taken before DeepSpeed shards the policy)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    # Like the reference, copied before DeepSpeed wraps the policy; ZeRO-3 shards it: none there.
    zero3 = s.deepspeed.enabled and s.deepspeed.stage == 3
    sampler = SamplingCopy(model) if t.bf16 and t.bf16_sampler and not zero3 else None
    opt = make_optimizer(model, t.lr, t.weight_decay)
    engine = _engine(parts, opt, make_scheduler(t.lr_scheduler, opt, rl_warmup_steps(t), t.max_steps))
    trainer = GRPOTrainer(
        engine, parts.tokenizer, parts.prompts, parts.splits.train, parts.splits.is_correct, parts.reward_fn,
        a, t, s.objective, reference, seed=s.seed, dist=parts.dist, sampler=sampler,
        grid_step=resolve_grid_step(s.objective.grid_step, t.sft.confidence.grid_step),
    )
    state.engine = engine
    resume = parts.resume
    if resume is None:
        if parts.dist.world_size > 1:
            # The warm-up is replicated on every rank (same seed, same weights); from here each
            # rank samples rollouts for its own prompts and needs its own random stream.
            torch.manual_seed(s.seed + 1_000_003 * parts.dist.rank)
        return RL(trainer, engine, reference, first=1)
    engine.load(resume.path)
    if isinstance(reference, torch.nn.Module):
        reference.load_state_dict(torch.load(resume.path / "reference.pt", weights_only=True))
    trainer.load_state_dict(resume.trainer)
    resume.restore_rng()  # last: the run continues exactly where the saved one was
    return RL(trainer, engine, reference, first=resume.rl_step + 1)


def _stop_non_finite(parts: RunParts, rl_step: int, why: str, bar: Any) -> None:
    """Stop the run on non-finite steps: one line naming the last good checkpoint.

    Raises:
        RunStopped: always, with :data:`~calibrl.run.guards.EXIT_NON_FINITE`.
    """
    message = non_finite_message(parts.run_dir, rl_step, why)
    log.error(message)
    bar.close()  # the progress bar's last redraw would come after the message otherwise
    if parts.dist.is_main:
        print(f"calibrl-train: {message}", file=sys.stderr)
    raise RunStopped(EXIT_NON_FINITE)


def _checkpoint(parts: RunParts, state: RunState, rl: RL, rl_step: int) -> None:
    """Save a resumable checkpoint after ``rl_step`` (:mod:`calibrl.run.checkpoint`)."""
    at = save_checkpoint(
        parts.run_dir, rl.engine, global_step=state.step, rl_step=rl_step, trainer_state=rl.trainer.state_dict(),
        wandb_id=parts.tracker.run_id, records=parts.tracker.records, results=state.results,
        keep_last=parts.settings.trainer.keep_last,
        reference=rl.reference if isinstance(rl.reference, torch.nn.Module) else None,  # a LoRA run's is the policy's
    )
    log.info("checkpoint at RL step %d: %s", rl_step, at)


def _after_step(parts: RunParts, state: RunState, rl: RL, i: int, preempted: SignalFlag, bar: Any) -> None:
    """The guards after RL step ``i`` (logged already): non-finite stop, eval, checkpoint, SIGTERM.

    Raises:
        RunStopped: too many non-finite steps in a row, or a SIGTERM on any rank (after the
            checkpoint, exit code ``128 + SIGTERM``).
    """
    t = parts.settings.trainer
    cadence = Cadence(t.max_steps, t.eval_every, t.save_every, t.max_bad_steps_in_row)
    bad = rl.trainer.bad_steps_in_row
    if cadence.too_many_bad(bad):
        _stop_non_finite(parts, i, f"{bad} RL steps in a row had a non-finite loss or gradient "
                                   f"(trainer.max_bad_steps_in_row={t.max_bad_steps_in_row})", bar)
    if cadence.eval_due(i):
        run_eval(parts, state, f"step{i}")
    stop = all_reduce_sum([float(preempted.raised)])[0] > 0  # a signal to any rank stops all
    if cadence.save_due(i, stop) and bad:
        log.warning("RL step %d skipped its update as non-finite: not checkpointed", i)
    elif cadence.save_due(i, stop):
        _checkpoint(parts, state, rl, i)
    if stop:
        saved = f"checkpoint saved at RL step {i}" if not bad else f"RL step {i} was non-finite: not saved"
        print(f"SIGTERM: {saved}; resume with trainer.resume={parts.run_dir}")
        raise RunStopped(128 + signal.SIGTERM)


def rl_loop(parts: RunParts, state: RunState, rl: RL, preempted: SignalFlag) -> None:
    """RL steps ``rl.first .. trainer.max_steps``, each logged (with ``train/rl_step``) at the
    next global step, then guarded (:func:`_after_step`).

    Raises:
        RunStopped: a non-finite stop (also a non-finite gradient under DeepSpeed, whose update
            was applied and cannot be undone) or a SIGTERM.
    """
    max_steps = parts.settings.trainer.max_steps
    with tqdm(total=max_steps, initial=rl.first - 1, desc="RL", unit="step") as bar:
        for i in range(rl.first, max_steps + 1):
            try:
                metrics = rl.trainer.step()
            except FloatingPointError as err:  # DeepSpeed: the update was applied already
                _stop_non_finite(parts, i, str(err), bar)
            state.step += 1
            parts.tracker.log(metrics | {"train/rl_step": i}, step=state.step)
            bar.update(1)
            bar.set_postfix(
                acc=f"{metrics['train/accuracy']:.2f}", conf=f"{metrics['train/confidence_mean']:.2f}",
                fmt=f"{metrics['train/format_rate']:.2f}", r=f"{metrics['rewards/total/mean']:.2f}",
            )
            _after_step(parts, state, rl, i, preempted, bar)


def save_final_model(model: Any, tokenizer: Any, path: Path, dtype: str) -> None:
    """Save the HF model and tokenizer to ``path`` with weights in ``dtype`` (``float32`` or
    ``bfloat16``, ``trainer.save_dtype``). The in-memory ``model`` keeps its dtype: a converted
    copy of its state dict is saved (tied weights stay one tensor) and ``config.json`` names
    ``dtype``; float32, the policy's own dtype, is saved as it is. A peft model saves its adapter
    only (``adapter_config.json``, ``adapter_model.safetensors``; no ``config.json``)."""
    if dtype == "float32":
        model.save_pretrained(path)
    else:
        target = getattr(torch, dtype)
        by_storage: dict[tuple[int, torch.Size], torch.Tensor] = {}  # tied weights share a storage
        state = {
            k: by_storage.setdefault((v.data_ptr(), v.shape), v.to(target)) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
        model.save_pretrained(path, state_dict=state)
        if not is_peft(model):
            config = copy.deepcopy(model.config)  # save_pretrained wrote the in-memory model's dtype
            config.dtype = dtype
            config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    honour_umask(path)


def final_eval_and_save(parts: RunParts, state: RunState) -> None:
    """The final eval (``final``), the final HF checkpoint in ``<run dir>/checkpoint/``
    (``trainer.save_checkpoint``, weights in ``trainer.save_dtype``; rank 0, full parameters
    gathered; a LoRA run's is its adapter, and with ``model.lora.save_merged`` the merged model
    goes to ``<run dir>/checkpoint_merged/``) and the ``final/...`` summary."""
    run_eval(parts, state, "final")
    t = parts.settings.trainer
    if t.save_checkpoint:
        with _full_parameters(state):
            if parts.dist.is_main:
                save_final_model(parts.model, parts.tokenizer, parts.run_dir / "checkpoint", t.save_dtype)
                if is_peft(parts.model) and parts.settings.model.lora.save_merged:
                    save_final_model(merged_model(parts.model), parts.tokenizer, parts.run_dir / "checkpoint_merged",
                                     t.save_dtype)
    parts.tracker.summary({f"final/{k}": v for k, v in state.results["final"].items()})
