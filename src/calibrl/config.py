"""Typed schema of the Hydra configuration.

The schema (registered in Hydra's ConfigStore as ``calibrl_schema`` and named first in
``conf/config.yaml``'s defaults) makes a misspelled key or a wrong type fail at composition.
:func:`calibrl.run.validate.validate` then resolves every registry name and checks the values
before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig


__all__ = ["Config", "ConfigError", "EvalJobConfig", "register_schema", "rl_warmup_steps"]


class ConfigError(ValueError):
    """An invalid configuration: unknown registry name, inconsistent or unsafe settings."""


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
    combine: str = "sum"


@dataclass
class AlgoConfig:
    name: str = "grpo"
    group_size: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    scale_rewards: bool = False
    std_floor: float = 1e-4
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    loss_agg: str = "token_mean"
    drop_zero_adv_groups: bool = False
    mask_truncated: bool = False  # completions cut off at max_new_tokens get no loss (calibrl.rl.grpo)
    ppo_epochs: int = 1


@dataclass
class ConfidencePolicyConfig:
    policy: str = "uniform"
    value: float = 0.5
    random_fraction: float = 0.5
    grid_step: float = 0.05


@dataclass
class SFTConfig:
    enabled: bool = True
    num_examples: int = 400
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-5
    warmup_ratio: float = 0.05
    cache: bool = False
    confidence: ConfidencePolicyConfig = field(default_factory=ConfidencePolicyConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 36
    lr: float = 7e-6
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    warmup_ratio: Optional[float] = None  # set: ceil(ratio * max_steps) warm-up steps (then warmup_steps must be 0)
    micro_batch_size: int = 32
    max_grad_norm: float = 1.0
    bf16: bool = True
    bf16_sampler: bool = True  # with bf16: rollouts from a bf16 copy of the policy (not under ZeRO-3)
    gradient_checkpointing: bool = False  # recompute activations in backward (HF gradient checkpointing)
    device: str = "auto"  # auto (cuda:<local rank> when CUDA is available, else cpu) | cpu | cuda
    num_threads: int = 0  # 0: torch's default
    eval_every: int = 0  # 0: only before and after RL
    save_checkpoint: bool = True
    save_every: int = 0  # RL steps between resumable checkpoints (0: none)
    keep_last: int = 2  # resumable checkpoints kept
    resume: Optional[str] = None  # null | auto | <checkpoint or run dir>
    max_bad_steps_in_row: int = 3  # stop after this many non-finite RL steps in a row (0: never)
    min_generation_batch: int = 1  # out of memory, generation is retried in halves down to this many prompts
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    n_samples: int = 1
    n_bins: int = 10
    confident_threshold: float = 0.9
    window: int = 16
    intrinsic: bool = True
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    seed: int = II("seed")
    slice_by: list[str] = field(default_factory=lambda: ["slice"])
    raw_model: bool = False


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
    objective: ObjectiveConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_sets: dict[str, DataConfig] = field(default_factory=dict)  # out-of-domain sets
    checkpoint: Optional[str] = None  # run directory | HF model directory | model preset | None
    use_run_config: bool = True
    bf16: bool = True
    bf16_sampler: bool = True  # with bf16: rollouts from a bf16 copy of the policy (not under ZeRO-3)
    gradient_checkpointing: bool = False  # recompute activations in backward (HF gradient checkpointing)
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


def rl_warmup_steps(trainer: DictConfig) -> int:
    """Warm-up steps of the RL learning-rate schedule: ``ceil(trainer.warmup_ratio *
    trainer.max_steps)`` when the ratio is set (as Hugging Face ``TrainingArguments``), else
    ``trainer.warmup_steps`` (:func:`calibrl.run.validate.validate` refuses both)."""
    if trainer.warmup_ratio is None:
        return trainer.warmup_steps
    return math.ceil(trainer.warmup_ratio * trainer.max_steps)
