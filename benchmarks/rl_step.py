"""One RL step, calibrl vs TRL's ``GRPOTrainer``, on the same workload; plus this machine's limits.

Run from the repository root (the default workload takes ~15-25 min on 2 CPU cores)::

    .venv/bin/python benchmarks/rl_step.py                                # SmolLM2-135M, 8 x 8, 128 tokens
    .venv/bin/python benchmarks/rl_step.py --prompts 4 --max-new-tokens 64 --steps 3
    .venv/bin/python benchmarks/rl_step.py --model tiny --steps 1 --warmup 0 --out /tmp/b.json

Each framework runs in its own subprocess (so peak RSS, ``ru_maxrss``, is its own), on a model
loaded the same way (:func:`calibrl.models.load_policy`, fp32 weights), the same chat-formatted
prompts (reasoning-gym ``chain_sum`` through :class:`calibrl.data.PromptBuilder`), group size,
completion cap, temperature/top-p (top-k off), stop string ``</confidence>``, bf16 (autocast in
training; in generation TRL uses autocast and calibrl its bf16 sampling copy, ``trainer.bf16_sampler``),
fused AdamW (lr, schedule, grad clip from ``conf/``), ``beta = 0``, one optimizer step per
rollout batch in micro-batches of ``trainer.micro_batch_size`` completions, and the RLCR reward
(TRL gets one reward function per calibrl reward component, with calibrl's weights). Step k of
both answers the same B prompts: TRL's dataset is calibrl's seeded prompt stream, unshuffled. TRL
settings that differ from its defaults to match calibrl: ``scale_rewards="none"``,
``loss_type="dapo"`` (= calibrl's ``token_mean``), ``epsilon = epsilon_high = 0.2``,
``gradient_checkpointing=False``, ``optim="adamw_torch_fused"``, ``shuffle_dataset=False``,
``use_vllm=False``, ``report_to=[]``, no logging. The results JSON lists every setting of both.

Same work: by default calibrl trains on every completion, as TRL does (calibrl's engine is
marked ``collective``, the switch that makes its loop run every row). As shipped, calibrl skips
completions whose advantage is 0 everywhere (no gradient at ``beta = 0``); ``--skip-zero-adv``
measures that. On the raw SmolLM2 model almost no completion is in the format, every group has
the same reward and the shipped loop would train on nothing, so it is not the default.

Timing. A step is calibrl's ``GRPOTrainer.step()`` (wall clock around it) and TRL's optimizer
step (``on_step_begin`` -> ``on_step_end`` of a ``TrainerCallback``: generation, rewards,
forward/backward of both micro-batches, clip, AdamW). ``--warmup`` steps are dropped, then the
median of ``--steps``. Phases: ``generate`` is calibrl's ``perf/generate_s`` (its whole
``generate`` phase: refreshing the bf16 sampling copy, tokenizing, the decode loop, decoding the
texts) and the wall time inside TRL's calls of the model's ``generate`` (tokenizing and decoding
excluded, so the comparison favours TRL slightly); ``update`` is calibrl's ``perf/update_s`` and TRL's step minus its
``_generate_and_score_completions``; ``other`` is the rest (decoding, parsing, rewards,
advantages, metrics).

Tokens and FLOPs (useful work, the same definition for both frameworks):

- rollout tokens: completion tokens sampled (unpadded, up to and including EOS);
- training tokens ``T_train``: completion tokens of the trained rows plus each distinct prompt's
  tokens once (the least a forward/backward over the step's sequences must process);
- ``N_body`` = non-embedding parameters (decoder layers + final norm), ``N_head`` = the LM head's
  ``vocab x hidden`` (tied to the embedding in SmolLM2; a real matmul, but only on positions
  whose logits are needed, i.e. completion tokens);
- training FLOPs ``= 6 * (N_body * T_train + N_head * T_completion)``;
- generation FLOPs ``= 2 * (N_body * (T_prompt_distinct + T_generated) + N_head * T_generated)``;
- achieved FLOP/s = FLOPs / phase time; attention-score FLOPs are left out (< 5% here).

Peak: the best of large square matmuls (1024, 2048, 4096) in fp32 and bf16 with torch on this
machine (the workers' thread count), and bf16 at the model's own matmul shapes (micro-batch tokens
x hidden x intermediate, x vocab, and a 64-row decode step); the bf16 reference (``bf16_best``)
is the best of all bf16 measurements.

The parent prints the table and writes ``benchmarks/results/rl_step_<date>.json`` (``--out``):
machine (CPU model, cores, load), versions, settings, per-step records and summaries.
``--rounds R`` runs the frameworks R times in alternating order and pools their timed steps (a
shared machine's load drifts; the JSON keeps each round's load average). ``--profile`` adds one
more step per framework (last round) under ``torch.profiler`` (not timed) and writes the top
operators to ``<out stem>_profile_<framework>.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
MODELS = {"smollm2": ["model=smollm2_135m"], "tiny": ["model=tiny"]}


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass
class Workload:
    """What both frameworks run (CLI flags of the same names)."""

    model: str = "smollm2"
    prompts: int = 8
    group_size: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batch_size: int = 32
    bf16: bool = True
    steps: int = 5
    warmup: int = 2
    threads: int = 0
    seed: int = 0
    train_size: int | None = None
    skip_zero_adv: bool = False
    profile: bool = False
    profile_out: str = ""

    def overrides(self) -> list[str]:
        """Hydra overrides of calibrl's own config that give this workload."""
        model = MODELS.get(self.model, ["model=hf", f"model.name_or_path={self.model}"])
        return [
            *model,
            f"algo.group_size={self.group_size}",
            f"algo.prompts_per_step={self.prompts}",
            f"algo.max_new_tokens={self.max_new_tokens}",
            f"algo.temperature={self.temperature}",
            f"algo.top_p={self.top_p}",
            f"trainer.micro_batch_size={self.micro_batch_size}",
            f"trainer.bf16={self.bf16}",
            f"trainer.max_steps={self.warmup + self.steps + int(self.profile)}",
            f"seed={self.seed}",
            "logger.mode=disabled",
            *([f"data.train_size={self.train_size}"] if self.train_size else []),
        ]


def _compose(w: Workload):
    from hydra import compose, initialize_config_dir

    from calibrl.config import register_schema

    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=w.overrides())


# ----------------------------------------------------------------------------- shared worker parts


class GenerateProbe:
    """Wraps ``model.generate`` on the instance: times every call and hands the tokenizer to
    ``generate`` when the caller did not (TRL does not; HF needs it to honour ``stop_strings``).
    It also records whether generation ran in bf16 (under CPU autocast, or on bf16 weights) on
    the models it watches (``watch``): the policy, and calibrl's sampling copy."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.seconds, self.bf16 = 0.0, None
        inner = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("tokenizer", tokenizer)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        model.generate = generate
        self.watch(model)

    def watch(self, model: Any) -> None:
        import torch

        def record(module: Any, args: Any) -> None:
            if not torch.is_grad_enabled():  # generation (and no-grad forwards)
                self.bf16 = torch.is_autocast_enabled("cpu") or module.weight.dtype == torch.bfloat16

        next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_pre_hook(record)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def _param_counts(model: Any) -> dict[str, int]:
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    body = total - emb.numel() - (0 if head is emb else head.numel())
    c = model.config
    return {"n_total": total, "n_body": body, "n_head": head.numel(), "tied_head": head is emb,
            "hidden": c.hidden_size, "intermediate": c.intermediate_size, "vocab": head.shape[0]}


def _load(w: Workload):
    """(cfg, splits, model, tokenizer, prompt builder, reward function), as calibrl-train builds them."""
    import torch
    from omegaconf import OmegaConf

    from calibrl.data.format import completion_format
    from calibrl.data import PromptBuilder, build_splits
    from calibrl.models import ModelSpec, load_policy
    from calibrl.rewards import RewardFunction

    if w.threads > 0:
        torch.set_num_threads(w.threads)
    cfg = _compose(w)
    torch.manual_seed(cfg.seed)
    splits = build_splits(**OmegaConf.to_container(cfg.data, resolve=True))
    model, tokenizer = load_policy(ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True), seed=cfg.seed))
    prompts = PromptBuilder(tokenizer, cfg.prompt.system, completion_format(cfg), cfg.prompt.think_text)
    return cfg, splits, model, tokenizer, prompts, RewardFunction(dict(cfg.reward.weights))


def _step_record(step_s: float, generate_s: float, update_s: float, prompt_mask, completion_mask, trained, group: int,
                 reward: dict[str, float]) -> dict[str, float]:
    """One step's times and token counts (masks ``[N, P]`` / ``[N, L]``, ``trained``: bool ``[N]``)."""
    rows = completion_mask.shape[0]
    groups_trained = trained.view(rows // group, group).any(dim=1)
    prompt_per_group = prompt_mask.view(rows // group, group, -1)[:, 0].sum(dim=1)
    return {
        "step_s": step_s, "generate_s": generate_s, "update_s": update_s,
        "other_s": max(step_s - generate_s - update_s, 0.0),
        "rows": rows, "rows_trained": int(trained.sum()),
        "prompt_tokens": int(prompt_per_group.sum()),  # distinct prompts, each once
        "completion_tokens": int(completion_mask.sum()),
        "train_completion_tokens": int(completion_mask[trained].sum()),
        "train_prompt_tokens": int(prompt_per_group[groups_trained].sum()),
        **reward,
    }


def _reward_stats(rewards: Any, completion_mask) -> dict[str, float]:
    return {
        "reward_mean": float(rewards.total.mean()), "accuracy": float(rewards.correct.mean()),
        "format_rate": float(rewards.format_ok.mean()), "completion_length": float(completion_mask.sum(dim=1).float().mean()),
    }


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=False)


def _profile_rows(prof: Any, path: str, title: str, top: int = 25) -> list[dict[str, Any]]:
    avgs = prof.key_averages()
    Path(path).write_text(f"{title}\n" + avgs.table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
    rows = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total, "calls": e.count}
            for e in rows]


def _finish(w: Workload, framework: str, records: list[dict[str, float]], counts: dict[str, int], probe: GenerateProbe,
            extra: dict[str, Any], load0: tuple[float, ...]) -> dict[str, Any]:
    import torch

    return {
        "framework": framework,
        "warmup_records": records[: w.warmup],
        "records": records[w.warmup : w.warmup + w.steps],
        "params": counts,
        "generation_bf16": probe.bf16,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_avg": {"start": load0, "end": os.getloadavg()},
        **extra,
    }


# ----------------------------------------------------------------------------- calibrl worker


class _Recorder(dict):
    """Wraps the named methods of ``obj`` (on the instance) and keeps each one's last result."""

    def __init__(self, obj: Any, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            setattr(obj, name, self._wrap(name, getattr(obj, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self[f"{name}_args"] = args
            self[name] = fn(*args, **kwargs)
            return self[name]

        return wrapped


def run_calibrl(w: Workload) -> dict[str, Any]:
    """Steps of calibrl's ``GRPOTrainer`` as ``calibrl-train`` builds it (:mod:`calibrl.run.build`
    helpers, settings as the schema dataclasses)."""
    import torch
    from omegaconf import OmegaConf

    from calibrl.config import rl_warmup_steps
    from calibrl.run.build import make_optimizer, make_scheduler
    from calibrl.rl.engine import TorchEngine
    from calibrl.rl.grpo import GRPOTrainer
    from calibrl.rl.rollout import SamplingCopy

    load0 = os.getloadavg()
    cfg, splits, model, tokenizer, prompts, reward_fn = _load(w)
    counts = _param_counts(model)
    probe = GenerateProbe(model, tokenizer)
    algo, t, objective = (OmegaConf.to_object(cfg[k]) for k in ("algo", "trainer", "objective"))
    opt = make_optimizer(model, t.lr, t.weight_decay)
    sched = make_scheduler(t.lr_scheduler, opt, rl_warmup_steps(t), t.max_steps)

    class AllRowsEngine(TorchEngine):
        collective = True  # the loop then trains every row, as TRL does (module docstring)

    engine = (TorchEngine if w.skip_zero_adv else AllRowsEngine)(model, opt, sched, t.max_grad_norm)
    sampler = SamplingCopy(model) if t.bf16 and t.bf16_sampler else None  # as calibrl.run.stages builds it
    if sampler is not None:
        probe.watch(sampler.model)
    trainer = GRPOTrainer(engine, tokenizer, prompts, splits.train, splits.is_correct, reward_fn, algo, t, objective,
                          seed=cfg.seed, sampler=sampler)
    seen = _Recorder(trainer, ("generate", "score", "advantages"))

    records = []
    prof_rows = None
    for i in range(w.warmup + w.steps + int(w.profile)):
        profiling = i == w.warmup + w.steps
        prof = _profiler() if profiling else None
        if prof is not None:
            prof.__enter__()
        probe.take()
        t0 = time.perf_counter()
        metrics = trainer.step()
        step_s = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            prof_rows = _profile_rows(prof, w.profile_out, f"calibrl, one step of {step_s:.1f} s under the profiler")
            continue
        r, adv = seen["generate"], seen["advantages"]
        trained = torch.ones(len(r), dtype=torch.bool) if not w.skip_zero_adv else (adv != 0).reshape(len(r), -1).any(dim=1)
        records.append(_step_record(step_s, metrics["perf/generate_s"], metrics["perf/update_s"], r.prompt_mask, r.completion_mask, trained,
                                    w.group_size, _reward_stats(seen["score"][1], r.completion_mask))
                       | {"example_ids": [e.id for e in seen["generate_args"][0]]})
        print(f"[calibrl] step {i + 1}: {step_s:.2f} s", file=sys.stderr, flush=True)
    extra = {"variant": "skips zero-advantage rows (as shipped)" if w.skip_zero_adv else "trains every row (same work as TRL)",
             "settings": dataclasses.asdict(algo) | {"combine": objective.combine, "micro_batch_size": t.micro_batch_size,
                                                     "bf16": t.bf16, "min_generation_batch": t.min_generation_batch,
                                                     "lr": t.lr, "lr_scheduler": t.lr_scheduler,
                                                     "warmup_steps": rl_warmup_steps(t), "max_grad_norm": t.max_grad_norm,
                                                     "optimizer": "torch.optim.AdamW(fused=True)"}}
    if prof_rows is not None:
        extra["profile_top"] = prof_rows
    return _finish(w, "calibrl", records, counts, probe, extra, load0)


# ----------------------------------------------------------------------------- TRL worker


def run_trl(w: Workload) -> dict[str, Any]:
    """Steps of ``trl.GRPOTrainer`` on the same model, prompts, reward and settings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from calibrl.config import rl_warmup_steps
    from calibrl.rl.grpo import example_stream
    from calibrl.rewards.scoring import score_completions

    load0 = os.getloadavg()
    cfg, splits, model, tokenizer, prompts, reward_fn = _load(w)
    counts = _param_counts(model)
    probe = GenerateProbe(model, tokenizer)
    a, t = cfg.algo, cfg.trainer
    names = list(reward_fn.weights)
    last: dict[str, Any] = {}
    # calibrl's prompt stream, in its order: with shuffle_dataset=False TRL's step k then answers
    # the same B prompts as calibrl's step k, so lengths and rewards differ only by sampling.
    total_steps = w.warmup + w.steps + int(w.profile)
    stream = example_stream(splits.train, cfg.seed)
    examples = [next(stream) for _ in range(w.prompts * total_steps)]

    def scored(completions: list[str], idx: list[int]):
        key = (tuple(completions), tuple(idx))  # TRL calls each reward function on the same batch
        if last.get("key") != key:
            last["key"], last["rewards"] = key, score_completions(completions, [examples[i] for i in idx],
                                                                  splits.is_correct, reward_fn, prompts.fmt)[1]
        return last["rewards"]

    def component(name: str) -> Callable[..., list[float]]:
        def reward(prompts: list[str], completions: list[str], idx: list[int], **_: Any) -> list[float]:
            return [float(v) for v in scored(completions, idx).components[name]]

        reward.__name__ = name
        return reward

    rows = w.prompts * w.group_size
    micro = min(w.micro_batch_size, rows)
    if rows % micro:
        raise ValueError(f"{rows} completions per step must be a multiple of the micro-batch size {micro}")
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,  # one generation batch = one optimizer step
        num_generations=w.group_size,
        max_completion_length=w.max_new_tokens,
        temperature=a.temperature, top_p=a.top_p, top_k=0,
        generation_kwargs={"stop_strings": [f"</{prompts.fmt.confidence}>"]},
        learning_rate=t.lr, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=rl_warmup_steps(t), max_grad_norm=t.max_grad_norm, optim="adamw_torch_fused",
        bf16=w.bf16, gradient_checkpointing=False, use_cpu=True,
        beta=0.0, num_iterations=1, epsilon=a.clip_low, epsilon_high=a.clip_high,
        scale_rewards="std" if a.scale_rewards else "none", loss_type="dapo",
        mask_truncated_completions=a.mask_truncated, reward_weights=[float(reward_fn.weights[k]) for k in names],
        use_vllm=False, report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
        max_steps=total_steps, shuffle_dataset=False, seed=w.seed, data_seed=w.seed, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    dataset = Dataset.from_list([{"prompt": prompts.prompt(e), "idx": i} for i, e in enumerate(examples)])
    times: dict[str, Any] = {"records": [], "prof_rows": None}

    class TimedTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            times["gen_score_s"] = time.perf_counter() - t0
            times["out"] = out
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times["prof"] = _profiler() if state.global_step == w.warmup + w.steps else None
            if times["prof"] is not None:
                times["prof"].__enter__()
            probe.take()
            times["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - times["t0"]
            if times["prof"] is not None:
                times["prof"].__exit__(None, None, None)
                times["prof_rows"] = _profile_rows(times["prof"], w.profile_out, f"TRL, one step of {step_s:.1f} s under the profiler")
                return
            out = times["out"]
            cm = out["completion_mask"].cpu()
            trained = torch.ones(cm.shape[0], dtype=torch.bool)
            times["records"].append(_step_record(step_s, probe.take(), step_s - times["gen_score_s"], out["prompt_mask"].cpu(),
                                                 cm, trained, w.group_size, _reward_stats(last["rewards"], cm))
                                    | {"example_ids": list(dict.fromkeys(examples[i].id for i in last["key"][1]))})
            print(f"[trl] step {state.global_step}: {step_s:.2f} s", file=sys.stderr, flush=True)

    trainer = TimedTrainer(model=model, reward_funcs=[component(k) for k in names], args=args, train_dataset=dataset,
                           processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would clutter the table
    trainer.train()
    if len(times["records"]) < w.warmup + w.steps:
        raise RuntimeError(f"TRL ran {len(times['records'])} of {w.warmup + w.steps} steps")
    extra = {"variant": f"trl {__import__('trl').__version__}, use_vllm=False",
             "accelerator_native_amp": bool(trainer.accelerator.native_amp),
             "settings": {k: v for k, v in args.to_dict().items() if k in TRL_SETTINGS}}
    if times["prof_rows"] is not None:
        extra["profile_top"] = times["prof_rows"]
    return _finish(w, "trl", times["records"], counts, probe, extra, load0)


TRL_SETTINGS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size", "steps_per_generation",
    "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "generation_kwargs", "learning_rate",
    "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm", "optim", "bf16", "gradient_checkpointing",
    "beta", "num_iterations", "epsilon", "epsilon_high", "scale_rewards", "loss_type", "mask_truncated_completions",
    "reward_weights", "use_vllm", "disable_dropout", "multi_objective_aggregation",
)
WORKERS = {"calibrl": run_calibrl, "trl": run_trl}


# ----------------------------------------------------------------------------- machine limits


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0) -> dict[str, Any]:
    """GFLOP/s of ``a @ b`` (square, ``2 n^3`` FLOPs) per dtype and size; ``peak`` is the best."""
    import torch

    out: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per = {}
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            per[n] = _gflops(lambda: a @ b, 2 * n**3, seconds)
        out[name] = {"peak_gflops": max(per.values()), "by_size": per}
    return out


def model_shape_peak(hidden: int, intermediate: int, vocab: int, tokens: int, seconds: float = 1.0) -> dict[str, float]:
    """bf16 GFLOP/s at the model's own matmul shapes (a reachable ceiling for these skinny GEMMs)."""
    import torch

    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    up = torch.randn(hidden, intermediate, dtype=torch.bfloat16)
    head = torch.randn(hidden, vocab, dtype=torch.bfloat16)
    return {
        f"mlp_{tokens}x{hidden}x{intermediate}": _gflops(lambda: x @ up, 2 * tokens * hidden * intermediate, seconds),
        f"head_{tokens}x{hidden}x{vocab}": _gflops(lambda: x @ head, 2 * tokens * hidden * vocab, seconds),
        f"decode_{64}x{hidden}x{intermediate}": _gflops(lambda: x[:64] @ up, 2 * 64 * hidden * intermediate, seconds),
    }


def _gflops(fn: Callable[[], Any], flops: float, seconds: float) -> float:
    for _ in range(2):
        fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    return flops * reps / (time.perf_counter() - t0) / 1e9


# ----------------------------------------------------------------------------- parent: run, summarise, print


def summarise(res: dict[str, Any]) -> dict[str, float]:
    """Medians of the timed steps and throughputs over them (tokens summed / seconds summed)."""
    recs = res["records"]
    if not recs:
        raise RuntimeError(f"{res['framework']}: no timed step recorded")
    p = res["params"]
    total = {k: sum(r[k] for r in recs) for k, v in recs[0].items() if isinstance(v, (int, float))}
    gen_flops = 2 * (p["n_body"] * (total["prompt_tokens"] + total["completion_tokens"]) + p["n_head"] * total["completion_tokens"])
    train_tokens = total["train_prompt_tokens"] + total["train_completion_tokens"]
    train_flops = 6 * (p["n_body"] * train_tokens + p["n_head"] * total["train_completion_tokens"])
    med = {f"{k}_median": statistics.median(r[k] for r in recs) for k in ("step_s", "generate_s", "update_s", "other_s")}
    return {
        **med,
        "steps_per_s": 1.0 / med["step_s_median"],
        "rollout_tokens_per_s": total["completion_tokens"] / total["generate_s"],
        "training_tokens_per_s": train_tokens / total["update_s"],
        "generation_gflops": gen_flops / total["generate_s"] / 1e9,
        "training_gflops": train_flops / total["update_s"] / 1e9,
        "peak_rss_mb": res["peak_rss_mb"],
        **{k: total[k] / len(recs) for k in ("reward_mean", "accuracy", "format_rate", "completion_length",
                                              "rows_trained", "completion_tokens")},
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "calibrl", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags],
        "torch_threads": torch.get_num_threads(), "mem_total_mb": mem, "platform": platform.platform(),
        "load_avg_start": os.getloadavg(), "git_commit": git or None, "hostname": platform.node(),
    }


def _run_workers(jobs: dict[str, Workload], tmp: Path, parallel: bool) -> dict[str, dict[str, Any]]:
    """Each framework in its own Python process (its own peak RSS); one after the other unless
    ``parallel`` (then their timings contend for the CPUs: for smoke tests only)."""
    procs = {}
    for framework, w in jobs.items():
        spec = tmp / f"{framework}_in.json"
        spec.write_text(json.dumps(dataclasses.asdict(w)))
        cmd = [sys.executable, __file__, "--worker", framework, "--worker-io", str(spec), str(tmp / f"{framework}_out.json")]
        # Nothing here needs the network: keep huggingface_hub from trying (telemetry, hub lookups).
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        procs[framework] = subprocess.Popen(cmd, cwd=REPO, env=env)
        if not parallel:
            procs[framework].wait()
    failed = {f: p.wait() for f, p in procs.items()}
    if any(failed.values()):
        raise RuntimeError(f"worker(s) failed: {', '.join(f'{f} (exit {rc})' for f, rc in failed.items() if rc)}")
    return {f: json.loads((tmp / f"{f}_out.json").read_text()) for f in jobs}


def _merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One framework's worker results over rounds: records pooled, the largest peak RSS, every
    round's load averages; the rest from the last round."""
    merged = dict(runs[-1])
    merged["records"] = [rec for run in runs for rec in run["records"]]
    merged["warmup_records"] = [rec for run in runs for rec in run["warmup_records"]]
    merged["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    merged["load_avg"] = [run["load_avg"] for run in runs]
    merged["rounds"] = len(runs)
    return merged


def _table(results: dict[str, dict[str, float]], peak: dict[str, Any]) -> str:
    fws = list(results)
    rows = [
        ("s / RL step (median)", "step_s_median", "{:.2f}"),
        ("  generate s (median)", "generate_s_median", "{:.2f}"),
        ("  update s (median)", "update_s_median", "{:.2f}"),
        ("  other s (median)", "other_s_median", "{:.2f}"),
        ("RL steps / s", "steps_per_s", "{:.4f}"),
        ("rollout tokens / s", "rollout_tokens_per_s", "{:.0f}"),
        ("training tokens / s", "training_tokens_per_s", "{:.0f}"),
        ("generation GFLOP/s", "generation_gflops", "{:.1f}"),
        ("training GFLOP/s", "training_gflops", "{:.1f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("reward mean", "reward_mean", "{:.3f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        ("format rate", "format_rate", "{:.3f}"),
        ("completion length", "completion_length", "{:.1f}"),
        ("rows trained / step", "rows_trained", "{:.1f}"),
    ]
    head = f"{'':26}" + "".join(f"{f:>12}" for f in fws) + (f"{'calibrl/trl':>13}" if len(fws) == 2 else "")
    lines = [head]
    for label, key, fmt in rows:
        vals = [results[f][key] for f in fws]
        ratio = f"{vals[0] / vals[1]:>13.2f}" if len(fws) == 2 and vals[1] else ""
        lines.append(f"{label:26}" + "".join(f"{fmt.format(v):>12}" for v in vals) + ratio)
    if len(fws) == 2:
        lines.append(f"speed-up (TRL s/step / calibrl s/step): {results['trl']['step_s_median'] / results['calibrl']['step_s_median']:.2f}x")
    f32, b16 = peak["fp32"]["peak_gflops"], peak["bf16_best"]
    lines.append(f"matmul peak on this machine: fp32 {f32:.0f} GFLOP/s, bf16 {b16:.0f} GFLOP/s (best of square "
                 f"{peak['bf16']['peak_gflops']:.0f} and model shapes: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in peak["model_shapes_bf16"].items()) + ")")
    for f in fws:
        r = results[f]
        lines.append(f"{f}: training {r['training_gflops']:.1f} GFLOP/s = {100 * r['training_gflops'] / b16:.1f}% of bf16 peak "
                     f"({100 * r['training_gflops'] / f32:.0f}% of fp32); generation {r['generation_gflops']:.1f} GFLOP/s = "
                     f"{100 * r['generation_gflops'] / b16:.1f}% of bf16 peak")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (top of this file) for what is measured and how.")
    d = Workload()
    p.add_argument("--model", default=d.model, help="smollm2 (default, SmolLM2-135M-Instruct), tiny (random tiny Llama) "
                   "or a local HF checkpoint directory")
    p.add_argument("--prompts", type=int, default=d.prompts, help="prompts per RL step (B)")
    p.add_argument("--group-size", type=int, default=d.group_size, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="completion length cap")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="completions per forward/backward")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per worker (0: torch's default)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-size", type=int, default=None, help="training prompts to draw from (default: conf/data)")
    p.add_argument("--skip-zero-adv", action="store_true", help="calibrl as shipped: skip rows with all-zero advantage")
    p.add_argument("--frameworks", default="calibrl,trl", help="comma-separated subset of calibrl,trl")
    p.add_argument("--rounds", type=int, default=1, help="run the frameworks this many times, alternating "
                   "(calibrl, trl, trl, calibrl, ...), and pool the timed steps: evens out a drifting machine load")
    p.add_argument("--parallel", action="store_true", help="run the framework workers at once (timings contend: smoke tests only)")
    p.add_argument("--profile", action="store_true", help="one extra profiled step per framework (torch.profiler)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="seconds per matmul-peak measurement")
    p.add_argument("--peak-sizes", default="1024,2048,4096", help="square matmul sizes for the peak")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/rl_step_<date>.json)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-io", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:  # a subprocess: run one framework, write its JSON
        w = Workload(**json.loads(Path(a.worker_io[0]).read_text()))
        Path(a.worker_io[1]).write_text(json.dumps(WORKERS[a.worker](w)))
        return {}

    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"rl_step_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    frameworks = [f.strip() for f in a.frameworks.split(",") if f.strip()]
    if unknown := set(frameworks) - set(WORKERS):
        p.error(f"unknown framework(s) {sorted(unknown)}; valid: {sorted(WORKERS)}")
    if "trl" in frameworks:
        try:
            import trl  # noqa: F401
        except ImportError:
            p.error("TRL is not installed (pip install trl==1.16.0) or leave it out: --frameworks calibrl")
    fields = {f.name for f in dataclasses.fields(Workload)}
    w = Workload(**{k: v for k, v in vars(a).items() if k in fields})
    if w.threads > 0:
        import torch

        torch.set_num_threads(w.threads)  # the peak is measured with the workers' thread count
    machine = _machine()
    started = time.time()
    peak = matmul_peak(tuple(int(n) for n in a.peak_sizes.split(",")), seconds=a.peak_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = []
        for r in range(a.rounds):  # alternate the frameworks, so a drifting machine load hits both alike
            last = r == a.rounds - 1
            jobs = {f: dataclasses.replace(w, profile=w.profile and last,
                                           profile_out=str(out.with_name(f"{out.stem}_profile_{f}.txt")))
                    for f in (frameworks if r % 2 == 0 else frameworks[::-1])}
            rounds.append(_run_workers(jobs, Path(tmp), a.parallel))
    raw = {f: _merge_rounds([rd[f] for rd in rounds]) for f in frameworks}
    shapes = raw[frameworks[0]]["params"]
    peak["model_shapes_bf16"] = model_shape_peak(shapes["hidden"], shapes["intermediate"], shapes["vocab"],
                                                 tokens=w.micro_batch_size * w.max_new_tokens, seconds=a.peak_seconds)
    peak["bf16_best"] = max(peak["bf16"]["peak_gflops"], *peak["model_shapes_bf16"].values())
    summary = {f: summarise(r) for f, r in raw.items()}
    for s in summary.values():
        s["training_share_of_bf16_peak"] = s["training_gflops"] / peak["bf16_best"]
        s["generation_share_of_bf16_peak"] = s["generation_gflops"] / peak["bf16_best"]
    machine["load_avg_end"] = os.getloadavg()
    report = {
        "benchmark": "rl_step", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "wall_s": time.time() - started, "parallel_workers": a.parallel, "command": " ".join(["benchmarks/rl_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine, "versions": _versions(), "workload": dataclasses.asdict(w),
        "matmul_peak": peak, "summary": summary, "runs": raw,
    }
    if len(summary) == 2:
        report["speedup_trl_over_calibrl_step_s"] = summary["trl"]["step_s_median"] / summary["calibrl"]["step_s_median"]
    out.write_text(json.dumps(report, indent=2, default=str))
    print(_table(summary, peak))
    print(f"load average: start {machine['load_avg_start']}, end {machine['load_avg_end']} ({machine['usable_cpus']} CPUs)")
    print(f"results: {out}")
    return report


if __name__ == "__main__":
    main()
