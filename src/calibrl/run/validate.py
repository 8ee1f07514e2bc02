"""Start-up validation of the main job's composed config: every registry name resolved, every
value checked, local paths and model files found, before any data or model is loaded.

:func:`validate` runs three checks in turn: :func:`_resolve_names` (registries and the settings
objects that check themselves), :func:`_value_problems` (one message per bad value, naming the
key; :func:`_self_label_problems` for ``trainer.self_label``) and :func:`_check_paths`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from calibrl.config import SAVE_DTYPES, ConfigError
from calibrl.data.format import completion_format
from calibrl.device import DEVICES

__all__ = ["validate"]


def _local_path(path: str) -> bool:
    # What the loaders treat as a local path rather than a hub id.
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".jsonl", ".json", ".parquet", ".csv")


def _resolve_names(cfg: DictConfig) -> None:
    """Resolve every registry name and build the reward function, the eval settings and the
    DeepSpeed config (each checks its own values).

    Raises:
        ConfigError: an unknown name (the message lists the valid choices) or a bad value.
    """
    from calibrl.data.prompts import CONFIDENCE_POLICIES
    from calibrl.data.sources import SOURCES, VERIFIERS
    from calibrl.eval.evaluator import check_eval_config
    from calibrl.objectives import COMBINERS, objective_of
    from calibrl.rewards import RewardFunction
    from calibrl.rl.calibration import check_calibration_settings
    from calibrl.rl.loss import LOSS_AGG

    try:
        completion_format(cfg)
        RewardFunction.from_config(OmegaConf.to_container(cfg.reward, resolve=True))
        COMBINERS.get(cfg.objective.combine)
        for component in cfg.reward.weights:
            objective_of(component)
        LOSS_AGG.get(cfg.algo.loss_agg)
        SOURCES.get(cfg.data.source)
        if cfg.data.source == "hf":
            VERIFIERS.get(cfg.data.verifier)
        CONFIDENCE_POLICIES.get(cfg.trainer.sft.confidence.policy)
        check_calibration_settings(cfg)
        if cfg.trainer.self_label.enabled:
            _resolve_self_label(cfg)
        check_eval_config(OmegaConf.to_object(cfg.eval))
        if cfg.deepspeed.enabled:
            from calibrl.rl.deepspeed_engine import deepspeed_config

            deepspeed_config(stage=cfg.deepspeed.stage, offload=cfg.deepspeed.offload, fp16=cfg.deepspeed.fp16,
                             micro_batch_size=cfg.trainer.micro_batch_size, accumulation_steps=1,
                             max_grad_norm=cfg.trainer.max_grad_norm)
    except (KeyError, ValueError) as err:
        raise ConfigError(err.args[0]) from err


def _resolve_self_label(cfg: DictConfig) -> None:
    """The self-label signal and ``loss_on`` names, the confidence grid its labels are rounded to,
    and scikit-learn (its isotonic regression).

    Raises:
        KeyError / ValueError: an unknown name (listing the valid ones) or a bad grid step.
        ConfigError: scikit-learn is not installed.
    """
    import importlib.util

    from calibrl.rl.confidence_grid import ConfidenceGrid
    from calibrl.rl.self_label import LABEL_SIGNALS, LOSS_ON

    sl = cfg.trainer.self_label
    LABEL_SIGNALS.get(sl.signal)
    if sl.loss_on not in LOSS_ON:
        raise ValueError(
            f"unknown trainer.self_label.loss_on {sl.loss_on!r}; valid choices: {', '.join(sorted(LOSS_ON))}")
    try:
        ConfidenceGrid(cfg.trainer.sft.confidence.grid_step)  # the self-labels are rounded to it
    except ValueError as err:
        raise ValueError(f"trainer.sft.confidence.grid_step: {err}") from err
    if importlib.util.find_spec("sklearn") is None:
        raise ConfigError("trainer.self_label needs scikit-learn (its isotonic regression): pip install scikit-learn")


def _self_label_problems(cfg: DictConfig) -> list[tuple[bool, str]]:
    """``(failed, message)`` for the values of ``trainer.self_label`` (only when it is enabled)."""
    from calibrl.rl.self_label import LABEL_SIGNALS

    sl, sft = cfg.trainer.self_label, cfg.trainer.sft
    if not sl.enabled:
        return []
    needed = sft.num_examples + sl.num_examples
    sampled = sl.signal in LABEL_SIGNALS and LABEL_SIGNALS.get(sl.signal).needs_samples
    return [
        (not sft.enabled,
         "trainer.self_label.enabled=true needs trainer.sft.enabled=true (the format must be taught first)"),
        (not 0 < sl.fit_fraction < 1, f"trainer.self_label.fit_fraction must be in (0, 1), got {sl.fit_fraction}"),
        (sl.num_examples < 4, f"trainer.self_label.num_examples must be >= 4, got {sl.num_examples}"),
        (sampled and sl.n_samples < 2,
         f"trainer.self_label.signal={sl.signal} needs trainer.self_label.n_samples >= 2, got {sl.n_samples}"),
        (sl.epochs < 1, f"trainer.self_label.epochs must be >= 1, got {sl.epochs}"),
        (sl.batch_size < 1, f"trainer.self_label.batch_size must be >= 1, got {sl.batch_size}"),
        (not 0 <= sl.warmup_ratio <= 1, f"trainer.self_label.warmup_ratio must be in [0, 1], got {sl.warmup_ratio}"),
        (needed > cfg.data.train_size,
         f"trainer.sft.num_examples={sft.num_examples} + trainer.self_label.num_examples={sl.num_examples} = {needed} "
         f"training examples, more than data.train_size={cfg.data.train_size} (the self-label questions come after "
         "the SFT demonstrations)"),
    ]


def _lora_problems(cfg: DictConfig) -> list[tuple[bool, str]]:
    """``(failed, message)`` for ``model.adapter`` (refused in training) and, when LoRA is on, the
    values of ``model.lora`` and the ZeRO-3 policy (refused)."""
    from calibrl.lora import check_lora_settings

    problems = [(
        bool(cfg.model.adapter),
        f"model.adapter={cfg.model.adapter!r} is for calibrl-eval (a LoRA run's adapter, loaded for inference); "
        "calibrl-train trains new adapters with model.lora.enabled=true, or full weights from a merged model "
        "(model=hf model.name_or_path=<run dir>/checkpoint_merged)",
    )]
    if not cfg.model.lora.enabled:
        return problems
    try:
        check_lora_settings(OmegaConf.to_object(cfg.model.lora))
    except ValueError as err:
        problems.append((True, err.args[0]))
    problems.append((
        cfg.deepspeed.enabled and cfg.deepspeed.stage == 3,
        "model.lora.enabled=true is not supported with ZeRO-3: the KL reference (the policy with its adapters off) "
        "and the merged bf16 sampling copy need the whole frozen base on every rank, and the adapters' optimizer "
        "state is small; use deepspeed=zero2",
    ))
    return problems


def _value_problems(cfg: DictConfig) -> list[tuple[bool, str]]:
    """``(failed, message)`` for every value check; each message names its key."""
    checks = [
        (cfg.data.source == "hf" and not cfg.data.path, "data.source=hf needs data.path (a hub id or a local file)"),
        (cfg.data.source == "reasoning_gym" and not cfg.data.task, "data.source=reasoning_gym needs data.task"),
        (cfg.model.kind not in ("gguf", "tiny", "hf"), f"unknown model.kind {cfg.model.kind!r}; valid choices: gguf, hf, tiny"),
        (cfg.logger.mode not in ("offline", "online", "disabled"),
         f"unknown logger.mode {cfg.logger.mode!r}; valid choices: disabled, offline, online"),
        (cfg.algo.name != "grpo", f"unknown algo.name {cfg.algo.name!r}; valid choices: grpo"),
        (cfg.trainer.device not in DEVICES, f"unknown trainer.device {cfg.trainer.device!r}; valid choices: {', '.join(DEVICES)}"),
        (cfg.deepspeed.backend not in ("auto", "gloo", "nccl"),
         f"unknown deepspeed.backend {cfg.deepspeed.backend!r}; valid choices: auto, gloo, nccl"),
        (cfg.algo.temperature <= 0, "algo.temperature must be > 0 (rollouts are sampled)"),
        (not 0 < cfg.algo.top_p <= 1, f"algo.top_p must be in (0, 1], got {cfg.algo.top_p}"),
        (cfg.trainer.max_steps < 0, "trainer.max_steps must be >= 0"),
        (cfg.trainer.save_dtype not in SAVE_DTYPES,
         f"unknown trainer.save_dtype {cfg.trainer.save_dtype!r}; valid choices: {', '.join(sorted(SAVE_DTYPES))}"),
        (cfg.trainer.save_every < 0, "trainer.save_every must be >= 0 (0: no resumable checkpoints)"),
        (cfg.trainer.keep_last < 1, "trainer.keep_last must be >= 1"),
        (cfg.trainer.max_bad_steps_in_row < 0, "trainer.max_bad_steps_in_row must be >= 0 (0: never stop)"),
        (cfg.trainer.min_generation_batch < 1, "trainer.min_generation_batch must be >= 1"),
        (cfg.data.on_bad_row not in ("error", "skip"),
         f"unknown data.on_bad_row {cfg.data.on_bad_row!r}; valid choices: error, skip"),
        (cfg.trainer.warmup_ratio is not None and cfg.trainer.warmup_steps != 0,
         f"trainer.warmup_ratio={cfg.trainer.warmup_ratio} and trainer.warmup_steps={cfg.trainer.warmup_steps} are "
         "both set; set one (trainer.warmup_steps=0 to use the ratio, trainer.warmup_ratio=null to use the steps)"),
        (cfg.trainer.warmup_ratio is not None and not 0 <= cfg.trainer.warmup_ratio <= 1,
         f"trainer.warmup_ratio must be in [0, 1], got {cfg.trainer.warmup_ratio}"),
        ("abstention" in cfg.reward.weights and cfg.prompt.abstain_phrase is None,
         "reward.weights.abstention needs prompt.abstain_phrase (the answer that abstains), e.g. prompt=tags_abstain"),
        (cfg.data.unanswerable.train_fraction > 0 and cfg.prompt.abstain_phrase is None,
         "data.unanswerable.train_fraction > 0 needs prompt.abstain_phrase: the model must be able to abstain "
         "on the unanswerable items it is trained on (e.g. prompt=tags_abstain)"),
    ]
    for key, low in (
        ("algo.group_size", 2),
        ("algo.prompts_per_step", 1),
        ("algo.max_new_tokens", 1),
        ("algo.ppo_epochs", 1),
        ("trainer.micro_batch_size", 1),
        ("data.eval_size", 1),
        ("data.train_size", 1),
    ):
        checks.append((OmegaConf.select(cfg, key) < low, f"{key} must be >= {low}, got {OmegaConf.select(cfg, key)}"))
    return checks + _self_label_problems(cfg) + _lora_problems(cfg)


def _check_paths(cfg: DictConfig) -> None:
    """Local model and data paths exist; the model's files (or the package that has them) are there.

    Raises:
        FileNotFoundError: a local path or model file that does not exist.
        ConfigError: a key in ``model.tokenizer_from`` that is not a model setting.
    """
    for key, path in (("model.name_or_path", cfg.model.kind == "hf" and cfg.model.name_or_path),
                      ("data.path", cfg.data.source == "hf" and cfg.data.path)):
        if path and _local_path(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{key} {path!r} does not exist")
    from calibrl.models import ModelSpec, check_model_files

    try:
        check_model_files(ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True)))
    except TypeError as err:  # a key in model.tokenizer_from that is not a model setting
        raise ConfigError(f"model.tokenizer_from: {err}") from err


def validate(cfg: DictConfig) -> None:
    """Resolve every registry name, check every value, and check local paths, before any heavy
    work.

    Raises:
        ConfigError: an unknown registry name (the message lists the valid choices) or
            inconsistent settings (the message names the key).
        FileNotFoundError: a local model or data path that does not exist.
    """
    _resolve_names(cfg)
    for failed, message in _value_problems(cfg):
        if failed:
            raise ConfigError(message)
    _check_paths(cfg)
