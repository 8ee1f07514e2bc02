"""Typed schema of the Hydra configuration: the settings types the code receives, and the one
place their defaults are written.

The schema (registered in Hydra's ConfigStore as ``calibrl_schema`` and named first in
``conf/config.yaml``'s defaults) makes a misspelled key or a wrong type fail at composition.
:func:`calibrl.run.validate.validate` then resolves every registry name and checks the values
before any model is loaded.

One settings type per config group. The code is handed these dataclasses, built from the
composed config with ``OmegaConf.to_object`` (e.g. ``OmegaConf.to_object(cfg.algo)`` is an
:class:`AlgoConfig`): :class:`calibrl.rl.grpo.GRPOTrainer` takes :class:`AlgoConfig`,
:class:`TrainerConfig` and :class:`ObjectiveConfig`, :func:`calibrl.rl.sft.sft_warmup`
:class:`TrainerConfig` (its ``sft`` is :class:`SFTConfig`), :func:`calibrl.eval.evaluator.evaluate`
:class:`EvalConfig`. There is no second, mirroring dataclass.

Where the defaults live: here. A group's YAML file names only what its choice sets on top of
these defaults (a DeepSpeed preset its ZeRO stage, the logger its job type, an objective its
combiner; a model, data, prompt or reward choice spells out its content: weights, task, text);
``conf/algo/grpo.yaml``, ``conf/trainer/default.yaml`` and ``conf/deepspeed/none.yaml``
hold only a comment, and ``conf/config.yaml`` / ``conf/eval.yaml`` set no ``eval`` block and no
top-level value the schema already has. Why this way round:
code and tests build these dataclasses directly (``AlgoConfig(group_size=2)``), so with the
numbers in YAML the dataclass would either need every field spelled out at every such call or
carry defaults of its own, which is how ``algo.max_new_tokens`` (64 here, 48 in YAML) and
``trainer.warmup_steps`` (0 here, 2 in YAML) drifted apart. The values runs used then, the YAML
ones, are the defaults now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig


__all__ = [
    "AlgoConfig", "Config", "ConfigError", "EvalConfig", "EvalJobConfig", "LoraConfig", "ModelConfig", "ObjectiveConfig",
    "SAVE_DTYPES", "SFTConfig", "SelfLabelConfig", "TrainerConfig", "register_schema", "rl_warmup_steps",
]


class ConfigError(ValueError):
    """An invalid configuration: unknown registry name, inconsistent or unsafe settings."""


@dataclass
class LoraConfig:
    """``model.lora``: LoRA adapters on the policy through peft (:mod:`calibrl.lora`)."""

    enabled: bool = False
    r: int = 16  # rank of each adapter (> 0)
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter input; 0 keeps rollouts, old and new log-probs one function
    # Names of the linear layers to adapt (a layer matches when its dotted name ends with one);
    # ["all-linear"]: every linear layer but the output head (peft's "all-linear").
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    save_merged: bool = False  # also write the merged full model to <run dir>/checkpoint_merged/


@dataclass
class ModelConfig:
    kind: str = MISSING  # gguf | tiny | hf
    name: str = MISSING
    name_or_path: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    cache_dir: str = "${oc.env:CALIBRL_CACHE,'~/.cache/calibrl'}/models"
    tokenizer_from: Optional[dict[str, Any]] = None
    tiny: Optional[dict[str, Any]] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None
    adapter: Optional[str] = None  # a peft adapter directory loaded on top (calibrl-eval of a LoRA run)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class UnanswerableConfig:
    train_fraction: float = 0.0  # share of rows turned unanswerable (calibrl.data.unanswerable)
    eval_fraction: float = 0.0
    placeholder: str = "x"


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = MISSING  # reasoning_gym | hf
    train_size: int = 2000
    eval_size: int = 500
    train_seed: int = 1
    eval_seed: int = 2
    # reasoning_gym
    task: Optional[str] = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    slice_fields: list[str] = field(default_factory=list)
    # hf (hub id or local .jsonl/.json/.parquet/.csv)
    path: Optional[str] = None
    subset: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = None
    fields: dict[str, Optional[str]] = field(
        default_factory=lambda: {"question": "question", "answer": "answer", "id": None, "slice": None}
    )
    verifier: str = "exact"
    on_bad_row: str = "error"  # error | skip: a malformed row stops the run, or is left out and counted
    unanswerable: UnanswerableConfig = field(default_factory=UnanswerableConfig)


@dataclass
class FormatConfig:
    think: str = "think"
    answer: str = "answer"
    analysis: str = "analysis"
    confidence: str = "confidence"


@dataclass
class PromptConfig:
    system: str = MISSING
    think_text: str = "Let me work it out."
    tags: FormatConfig = field(default_factory=FormatConfig)
    abstain_phrase: Optional[str] = None  # the answer that abstains; null: abstention is off


@dataclass
class RewardConfig:
    weights: dict[str, float] = MISSING
    # Verifier guard (calibrl.rewards.guard): seconds per answer in the worker process (null: in
    # this process, no limit) and the longest answer that is verified (longer: incorrect).
    verifier_timeout_s: Optional[float] = 5.0
    max_answer_chars: int = 8192


@dataclass
class ObjectiveConfig:
    """``objective``: how reward components become advantages (:mod:`calibrl.objectives`)."""

    combine: str = "sum"  # a name in calibrl.objectives.COMBINERS: sum | normalize_then_sum | segment
    # How the calibration objective reaches the confidence tokens (calibrl.rl.calibration.CALIBRATION_PATHS):
    # reward (the scoring rules in the combined GRPO reward, RLCR) | expected (exact expected score over
    # the confidence grid) | branch (K sampled confidences per rollout, leave-one-out baseline).
    calibration: str = "reward"
    # What the confidence is scored against (calibrl.objectives.TARGETS), expected and branch only:
    # correct | group_accuracy | loo_agreement | answer_prob.
    target: str = "correct"
    gamma: float = 1.0  # target mix gamma * correct + (1 - gamma) * target, in [0, 1] (1: correctness only)
    branches: int = 4  # branch: K confidence continuations per rollout (>= 2)
    branch_max_new_tokens: int = 12  # branch: token cap of a confidence continuation
    grid_step: Optional[float] = None  # confidence grid spacing (two decimals); null: trainer.sft.confidence.grid_step


@dataclass
class AlgoConfig:
    """``algo``: the RL algorithm (GRPO-style: G samples per prompt, group-mean baseline, PPO clip,
    optional KL; the exact algorithm is in :mod:`calibrl.rl.grpo`)."""

    name: str = "grpo"
    group_size: int = 8  # G completions per prompt (>= 2)
    prompts_per_step: int = 4  # B prompts per RL step (a multiple of the process count)
    max_new_tokens: int = 48  # completion length cap of rollouts, tokens
    temperature: float = 1.0  # rollout sampling temperature (> 0)
    top_p: float = 1.0  # rollout nucleus sampling, in (0, 1]
    scale_rewards: bool = False  # `sum` combiner: divide by the group std; blows small Brier gaps up (arXiv:2508.11800)
    std_floor: float = 1e-4  # floor of that std
    clip_low: float = 0.2  # PPO clip range [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    beta: float = 0.0  # k3-KL coefficient to a frozen reference; 0: no reference model is loaded
    loss_agg: str = "token_mean"  # token_mean | seq_mean_token_mean | constant (Dr. GRPO), calibrl.rl.loss
    drop_zero_adv_groups: bool = False  # groups with all-zero advantages leave the loss normalisers (DAPO)
    mask_truncated: bool = False  # completions cut off at max_new_tokens get no loss (DAPO overlong filtering)
    ppo_epochs: int = 1  # optimizer steps per rollout batch


@dataclass
class ConfidencePolicyConfig:
    """``trainer.sft.confidence``: the confidence written into SFT demonstrations."""

    policy: str = "uniform"  # constant | uniform | mixed (calibrl.data.prompts.CONFIDENCE_POLICIES)
    value: float = 0.5
    random_fraction: float = 0.5
    grid_step: float = 0.05


@dataclass
class SFTConfig:
    """``trainer.sft``: the format warm-up by supervised fine-tuning (:mod:`calibrl.rl.sft`)."""

    enabled: bool = True
    num_examples: int = 400  # demonstrations built from the first training examples
    epochs: int = 2  # passes over them
    batch_size: int = 8  # demonstrations per optimizer step
    lr: float = 5e-5
    warmup_ratio: float = 0.05  # linear schedule: ceil(ratio * steps) warm-up steps
    cache: bool = False  # reuse a finished warm-up (+ its eval) across runs that share it (calibrl.run.sft_cache)
    confidence: ConfidencePolicyConfig = field(default_factory=ConfidencePolicyConfig)


@dataclass
class SelfLabelConfig:
    """``trainer.self_label``: the self-labelled confidence warm-up after the format SFT
    (:mod:`calibrl.rl.self_label`): the model's own greedy completions, their confidence relabelled
    from the model's own signal, fine-tuned on the confidence tokens."""

    enabled: bool = False
    num_examples: int = 600  # training questions answered greedily (taken after the SFT demonstrations)
    fit_fraction: float = 0.5  # share of them the signal -> accuracy map is fitted on (never trained on), in (0, 1)
    signal: str = "answer_prob"  # answer_prob | agreement (calibrl.rl.self_label.LABEL_SIGNALS)
    n_samples: int = 4  # agreement: sampled answers per question
    # completion (all tokens) | confidence (value tokens only) | verified (all where correct, else value). With
    # loss_on and lr chosen on a validation split (scripts/tune_self_label.py, docs/results.md): confidence
    # tokens alone taught the answer slot to write confidences; lr 5e-5 cost 0.05 validation accuracy, 2e-5
    # none (held out, after the fact: 0.01-0.04 over 3 seeds).
    loss_on: str = "completion"
    epochs: int = 2  # passes over the relabelled completions
    batch_size: int = 8  # relabelled completions per optimizer step
    lr: float = 2e-5
    warmup_ratio: float = 0.05  # linear schedule: ceil(ratio * steps) warm-up steps, as trainer.sft


#: Choices of ``trainer.save_dtype``: the dtype of the final HF checkpoint's weights.
SAVE_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainerConfig:
    """``trainer``: optimisation, precision, devices, evals and checkpoints of the main job."""

    max_steps: int = 36  # RL steps
    lr: float = 7e-6  # 1e-5 and 1.5e-5 lost accuracy or collapsed confidence here (docs/results.md)
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"  # a transformers.get_scheduler name
    warmup_steps: int = 2
    warmup_ratio: Optional[float] = None  # set (e.g. 0.05): ceil(ratio * max_steps) warm-up steps; needs warmup_steps=0
    micro_batch_size: int = 32  # completions per forward/backward
    max_grad_norm: float = 1.0
    bf16: bool = True  # bf16 autocast in generation, forward and backward (SFT, RL, evals)
    # With bf16: rollouts sampled by a bf16 copy of the policy refreshed every step (faster than
    # autocast over fp32 weights); ignored under ZeRO-3 (sharded weights).
    bf16_sampler: bool = True
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute (SFT and RL)
    device: str = "auto"  # auto (cuda:<local rank> when CUDA is available, else cpu) | cpu | cuda
    num_threads: int = 0  # 0: torch's default
    eval_every: int = 0  # RL steps between held-out evals (0: only before and after RL)
    save_checkpoint: bool = True  # the final HF model in <run dir>/checkpoint/
    save_dtype: str = "float32"  # float32 | bfloat16: the weights of that final checkpoint (SAVE_DTYPES)
    save_every: int = 0  # RL steps between resumable checkpoints in <run dir>/checkpoints/ (0: none)
    keep_last: int = 2  # resumable checkpoints kept (older ones are deleted after each save)
    # auto: the newest checkpoint of this run dir (pass hydra.run.dir), if any; <path>: that
    # checkpoint, or the newest one of that run dir (continued there); null: a fresh run.
    resume: Optional[str] = None
    # RL steps in a row whose update was skipped as non-finite (NaN/inf loss or gradient) before
    # the run stops, exit code 3, naming the last good checkpoint (0: never).
    max_bad_steps_in_row: int = 3
    min_generation_batch: int = 1  # out of memory, rollouts are generated in halves down to this many prompts per call
    sft: SFTConfig = field(default_factory=SFTConfig)
    self_label: SelfLabelConfig = field(default_factory=SelfLabelConfig)


@dataclass
class EvalConfig:
    """``eval``: held-out evaluation (:mod:`calibrl.eval.evaluator`), used before/after RL, every
    ``trainer.eval_every`` steps and by ``calibrl-eval``, so the same settings give the same
    numbers. :func:`calibrl.eval.evaluator.check_eval_config` checks the values."""

    batch_size: int = 64  # questions per generate call (each with n_samples completions)
    max_new_tokens: int = 64  # completion length cap, tokens
    do_sample: bool = False  # sample instead of greedy decoding (required when n_samples > 1)
    temperature: float = 1.0  # used when do_sample
    n_samples: int = 1  # completions per question; > 1 needs do_sample and adds voting
    n_bins: int = 10  # ECE / reliability bins
    confident_threshold: float = 0.9  # a wrong answer stated at >= this confidence is a confident error
    window: int = 16  # tokens per window of the lowest-window probability signal
    intrinsic: bool = True  # also report answer-token and lowest-window probabilities (one more forward)
    n_bootstrap: int = 1000  # resamples per bootstrap CI (0: point estimates only)
    ci_level: float = 0.95  # CI coverage, in (0, 1)
    # Seeds sampling (in a forked RNG: training's is untouched) and the bootstrap. Composed, it is
    # the job's `seed`; an EvalConfig built directly in code must be given one (seed=0).
    seed: int = II("seed")
    # Example fields to slice by: `slice` (the dataset's slice label), `unanswerable`, or a name in
    # calibrl.data.example.Example.fields (num_terms, task, ...).
    slice_by: list[str] = field(default_factory=lambda: ["slice"])
    raw_model: bool = False  # main job only: also evaluate the raw model before the SFT warm-up
    # Expected stated confidence sum_v p(v) v over the grid 0, step, ..., 1 (two decimals) at the
    # confidence tag (calibrl.rl.confidence_grid); null: not computed.
    grid_step: Optional[float] = 0.05


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    stage: int = 0  # ZeRO stage (calibrl.rl.deepspeed_engine)
    offload: bool = False  # stage 3: parameters and optimizer state in CPU memory
    fp16: bool = False  # refused: bf16 autocast is trainer.bf16
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl


@dataclass
class LoggerConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "calibrl"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    job_type: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    prompt: PromptConfig = MISSING
    reward: RewardConfig = MISSING
    objective: ObjectiveConfig = MISSING
    algo: AlgoConfig = MISSING
    trainer: TrainerConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    experiment_name: str = "default"


@dataclass
class EvalJobConfig:
    """Schema of ``calibrl-eval`` (``conf/eval.yaml``)."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING  # the in-domain eval set
    prompt: PromptConfig = MISSING
    reward: RewardConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_sets: dict[str, DataConfig] = field(default_factory=dict)  # out-of-domain sets
    in_domain: bool = True  # also evaluate the in-domain set `data` (false: only the eval_sets)
    checkpoint: Optional[str] = None  # run directory | HF model directory | model preset | None
    use_run_config: bool = True
    bf16: bool = True  # bf16 autocast in generation and the confidence signals' forward
    device: str = "auto"  # auto | cpu | cuda (as trainer.device)
    num_threads: int = 0
    plots: bool = True
    seed: int = 0
    experiment_name: str = "eval"


def register_schema() -> None:
    """Register :class:`Config` as ``calibrl_schema`` and :class:`EvalJobConfig` as
    ``calibrl_eval_schema`` (idempotent)."""
    ConfigStore.instance().store(name="calibrl_schema", node=Config)
    ConfigStore.instance().store(name="calibrl_eval_schema", node=EvalJobConfig)


def rl_warmup_steps(trainer: TrainerConfig | DictConfig) -> int:
    """Warm-up steps of the RL learning-rate schedule: ``ceil(trainer.warmup_ratio *
    trainer.max_steps)`` when the ratio is set (as Hugging Face ``TrainingArguments``), else
    ``trainer.warmup_steps`` (:func:`calibrl.run.validate.validate` refuses both)."""
    if trainer.warmup_ratio is None:
        return trainer.warmup_steps
    return math.ceil(trainer.warmup_ratio * trainer.max_steps)
