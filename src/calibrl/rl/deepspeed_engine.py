"""The DeepSpeed ZeRO update engine (:class:`calibrl.rl.engine.Engine` protocol).

The DeepSpeed config is *derived* from calibrl's settings (:func:`deepspeed_config`), never
written by hand next to them, so the two cannot disagree:

=================================  ================================================================
calibrl setting                    DeepSpeed key
=================================  ================================================================
``deepspeed.stage`` (0-3)           ``zero_optimization.stage``
``deepspeed.offload``               ``offload_param`` + ``offload_optimizer`` to CPU (stage 3 only)
``trainer.micro_batch_size``        ``train_micro_batch_size_per_gpu``
``trainer.max_grad_norm``           ``gradient_clipping``
micro-batches per rank and step     ``gradient_accumulation_steps`` (the loop runs every rollout
                                    row under DeepSpeed, so the count is fixed: rows per rank /
                                    micro-batch, rounded up)
``trainer.bf16``                    not passed: bf16 is torch autocast around forward/backward with
                                    fp32 master weights, the same numerics as one process
=================================  ================================================================

fp16 is refused: it does not exist on CPU, and on GPUs calibrl trains with bf16 autocast.

ZeRO-3 (parameters sharded): generation and evaluation run inside :meth:`DeepSpeedEngine.generation`,
which gathers the full parameters once and lifts ZeRO-3's per-module hooks (DeepSpeed's
``unwrap_model_for_generation``), so ranks generate independently. The frozen reference model
(``algo.beta > 0``) is *not* sharded: each rank keeps a full copy in inference mode (no gradients,
no optimizer state, ``requires_grad=False``), made from the warmed-up policy before DeepSpeed
partitions it. The final HF checkpoint is written from gathered parameters.

Data parallelism contract (the caller's part): each rank's micro-batch losses are normalised by
the *global* token (or sequence) count and multiplied by the world size, because DeepSpeed
averages gradients over ranks; then W processes with micro-batch b give the update of one process
with 2b (tested to 1e-6 on CPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from calibrl.lora import is_peft

__all__ = ["DeepSpeedEngine", "deepspeed_config"]

_TAG = "deepspeed"


def deepspeed_config(
    *, stage: int, offload: bool, micro_batch_size: int, accumulation_steps: int, max_grad_norm: float,
    fp16: bool = False, device: str = "cpu",
) -> dict[str, Any]:
    """The DeepSpeed config for these calibrl settings (table in the module docstring).

    Raises:
        ValueError: ``stage`` not in 0-3, ``offload`` below stage 3, ``fp16`` (with the CPU
            reason on ``device="cpu"``), ``micro_batch_size < 1`` or ``max_grad_norm <= 0``.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage must be 0, 1, 2 or 3, got {stage}")
    if offload and stage != 3:
        raise ValueError(f"deepspeed.offload needs stage 3 (parameters and optimizer to CPU), got stage {stage}")
    if fp16:
        raise ValueError(
            "deepspeed.fp16=true: fp16 is not available on CPU; use trainer.bf16=true (bf16 autocast)"
            if device == "cpu" else "deepspeed.fp16=true is not supported; use trainer.bf16=true (bf16 autocast)"
        )
    if micro_batch_size < 1 or accumulation_steps < 1 or not max_grad_norm > 0:
        raise ValueError(
            "micro_batch_size and accumulation_steps must be >= 1 and max_grad_norm > 0, got "
            f"{micro_batch_size}, {accumulation_steps}, {max_grad_norm}"
        )
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        # calibrl's own torch optimizer (AdamW) under ZeRO, also with CPU offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the policy, its optimizer and LR scheduler.

    Args:
        module: the policy.
        optimizer: a torch optimizer over its parameters.
        scheduler: LR scheduler stepped by DeepSpeed once per step, or ``None``.
        config: from :func:`deepspeed_config`.
    """

    collective = True

    def __init__(self, module: Any, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict[str, Any]) -> None:
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        # Calls go through DeepSpeed's forward (ZeRO-3 resets its backward bookkeeping there; a
        # direct call of the inner model loses gradients accumulated over micro-batches); other
        # attributes (generate, config, train/eval) fall through to the model.
        self.module = self.engine
        self.stage = int(config["zero_optimization"]["stage"])

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised over the whole step: no division by accumulation steps.
        # DeepSpeed counts micro-steps in its own step(): it applies the update on the last one.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> float:
        """The update applied by the last micro-batch's :meth:`backward`; its gradient norm.

        Raises:
            RuntimeError: the micro-batches since the last step were not exactly
                ``gradient_accumulation_steps`` (the update was not applied, or applied early).
            FloatingPointError: the gradient norm is not finite. DeepSpeed has applied the step
                already (it only skips steps on fp16 overflow), so the weights cannot be trusted.
        """
        if not self.engine.was_step_applied() or self.engine.micro_steps % self.engine.gradient_accumulation_steps():
            raise RuntimeError(
                f"{self.engine.micro_steps} micro-batches so far, not a multiple of gradient_accumulation_steps="
                f"{self.engine.gradient_accumulation_steps()}: the DeepSpeed update did not line up with the step"
            )
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} under DeepSpeed; the step was applied")
        return grad_norm

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Full parameters for generation and evaluation (collective: every rank enters it).

        Stages 0-2 keep full parameters on every rank: nothing to do. Stage 3 uses DeepSpeed's
        ``unwrap_model_for_generation``: the sharded parameters are all-gathered **once** and
        ZeRO-3's per-module fetch/release hooks are taken off for the duration, so each rank
        then generates on its own with plain forward passes (no collective per token, so ranks
        that sample different lengths, or evaluate different numbers of questions, cannot
        deadlock); on exit the hooks are put back and the parameters re-partitioned. Cost: every
        rank holds the full policy in memory while inside (the parameters only, no optimizer
        state). Inside, no gradients may be taken through the policy.
        """
        if self.stage != 3:
            yield
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine):
            yield

    def save(self, directory: Path) -> None:
        """DeepSpeed checkpoint (model, optimizer shards, scheduler) under ``directory/deepspeed``
        (collective: every rank writes its shards); of a LoRA policy (:mod:`calibrl.lora`) the
        trainable adapter weights only."""
        # A LoRA policy's frozen base is reloaded from the model files: only the adapters are saved.
        self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False,
                                    exclude_frozen_parameters=is_peft(self.engine.module))

    def load(self, directory: Path) -> None:
        """Load what :meth:`save` wrote (collective).

        Raises:
            FileNotFoundError: no DeepSpeed checkpoint in ``directory``.
        """
        path, _ = self.engine.load_checkpoint(str(directory), tag=_TAG, load_module_strict=not is_peft(self.engine.module))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
