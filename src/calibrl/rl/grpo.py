"""GRPO-style RL with a calibration-aware reward, on one process or data parallel under DeepSpeed.

Settings: :class:`GRPOTrainer` receives the ``algo``, ``trainer`` and ``objective`` config groups
as their schema dataclasses (:class:`calibrl.config.AlgoConfig`, :class:`~calibrl.config.TrainerConfig`,
:class:`~calibrl.config.ObjectiveConfig`); the names below are their fields.

The algorithm, exactly as implemented (one RL step):

1. **Prompts.** Take the next ``algo.prompts_per_step`` (B) training examples from a seeded,
   reshuffled-every-epoch stream.
2. **Rollouts.** Sample G = ``algo.group_size`` completions per prompt with calibrl's decode
   loop over the HF model (:mod:`calibrl.rl.decode`: one prefill per prompt shared by its G
   samples; temperature ``algo.temperature``, top-p ``algo.top_p``, at most
   ``algo.max_new_tokens`` tokens, stopping once ``</confidence>`` is written). With
   ``trainer.bf16`` and ``trainer.bf16_sampler`` a bf16 copy of the policy, refreshed before
   every step, samples them (:class:`calibrl.rl.rollout.SamplingCopy`; not under ZeRO-3). Out of memory, the step's prompts are
   generated in halves, down to ``trainer.min_generation_batch`` prompts per call
   (:func:`calibrl.rl.rollout.generate_rollout`; counted in ``perf/generation_oom_retries``).
3. **Rewards.** Parse every completion (:func:`calibrl.rewards.parse_completion`), take its
   verdict (:func:`calibrl.rewards.scoring.verdict`: the task's verifier on the parsed answer; with
   ``prompt.abstain_phrase`` an abstention is right exactly on unanswerable questions), compute
   each reward component (``reward.weights`` names them
   and weighs them; their weighted sum is logged as ``rewards/total``). Every reward is checked
   finite; a non-finite reward stops the run (it would be a bug, never a policy signal).
4. **Advantages.** Token advantages from the reward components by the objective combiner
   ``objective.combine`` (:mod:`calibrl.objectives`). ``sum`` (default):
   ``A_i = r_i - mean_group(r)`` of the weighted sum, divided by the group's std (floored) only
   when ``algo.scale_rewards``, on every token; ``normalize_then_sum``: each objective
   (accuracy, calibration, format, abstention) group-normalised on its own, then summed;
   ``segment``: those per-objective advantages on the tokens that produced them (accuracy and
   abstention up to ``</answer>``, calibration after it). The token segments
   (:func:`calibrl.objectives.segment_ids`) are computed only for a combiner whose registry entry
   declares ``needs_segments``; the others get one segment per row. No value model.
5. **Policy loss.** PPO clipped surrogate over completion tokens only (prompt and padding
   masked), ratio ``exp(logp - old_logp)`` clipped to ``[1 - clip_low, 1 + clip_high]``,
   aggregated by ``algo.loss_agg`` (token mean by default), plus ``beta * k3-KL`` to a frozen
   reference model when ``algo.beta > 0`` (the reference is not loaded when ``beta == 0``).
   With ``algo.ppo_epochs == 1`` the batch is used for one optimizer step right after sampling,
   so ``old_logp`` is the current log-prob detached (ratio exactly 1, the clip inactive); with
   more epochs ``old_logp`` is computed once, before the first update. Completions whose
   advantage is 0 on every token contribute no gradient when ``beta == 0`` and are skipped in
   the forward (normalisers still count them, so the loss is unchanged), unless
   ``algo.drop_zero_adv_groups`` leaves whole all-zero groups out of the normalisers (DAPO).
   With ``algo.mask_truncated`` a completion that hit ``algo.max_new_tokens`` without finishing
   (no EOS, no stop string) gets no loss: its tokens leave the loss and both normalisers, as
   DAPO's overlong filtering (arXiv:2503.14476) and TRL's ``mask_truncated_completions``; it
   still has its reward and counts in its group's baseline (step 4). Their share is logged as
   ``train/truncated_fraction`` either way.
6. **Update.** Gradients accumulated over micro-batches of ``trainer.micro_batch_size``
   completions, clipped to ``trainer.max_grad_norm``, AdamW step, LR schedule step. Rows are
   cut into micro-batches by completion length (longest first) when that leaves fewer padded
   tokens to run than the rollout's order does (normalisers are global: same loss and gradient). Forward and
   backward under bf16 autocast when ``trainer.bf16``. A non-finite step is skipped and counted
   in ``train/skipped_steps``: a micro-batch loss that is not finite skips its backward and the
   rest of the step (gradients zeroed, no optimizer or scheduler step), and so does a non-finite
   gradient norm. ``train/bad_steps_in_row`` counts consecutive RL steps with a skipped update;
   the RL loop stops the run at ``trainer.max_bad_steps_in_row`` (:mod:`calibrl.run.stages`).
   Under DeepSpeed nothing can be skipped (every rank must run every micro-batch, and DeepSpeed
   applies the update itself): a non-finite loss makes the gradient norm non-finite, which
   raises ``FloatingPointError`` and stops the run.

Data parallel (``deepspeed=zero1|zero2|zero3|zero3_offload``, W processes): each rank takes ``B / W`` whole prompts of
the step (groups never span ranks), runs every rollout row (no skipping: DeepSpeed's collectives
and fixed accumulation count need the same micro-batches on every rank), normalises the loss by
the global token/sequence counts times W (DeepSpeed averages gradients), and the step's metrics
are computed on the gathered batch. Under ZeRO-3 rollouts are generated inside the engine's
``generation()`` (parameters gathered once per step, see :mod:`calibrl.rl.deepspeed_engine`).

Launch: ``calibrl-train`` (or ``python -m calibrl.train``), e.g.
``calibrl-train experiment=quickstart`` or ``calibrl-train model=tiny debug=default``; several
processes: ``torchrun --nproc_per_node N -m calibrl.train deepspeed=zero2 ...`` (docs/distributed.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from calibrl.config import AlgoConfig, ObjectiveConfig, TrainerConfig
from calibrl.data.prompts import PromptBuilder
from calibrl.data.example import Example
from calibrl.device import autocast, module_device
from calibrl.distributed import DistInfo, all_reduce_sum, gather_objects
from calibrl.metrics import abstention_metrics, calibration_summary
from calibrl.objectives import COMBINERS, segment_ids
from calibrl.rewards import ParsedCompletion, RewardBatch, RewardFunction, reward_metrics
from calibrl.rl.calibration import CALIBRATION_PATHS, CalibrationBatch
from calibrl.rl.engine import Engine
from calibrl.rl.loss import clipped_policy_loss
from calibrl.rl.rollout import Rollout, SamplingCopy, completion_forward, completion_logprobs, generate_rollout
from calibrl.rewards.scoring import score_completions

__all__ = ["GRPOTrainer", "example_stream"]


def _live_groups(advantages: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[max group index + 1]``: the group has a non-zero advantage somewhere
    (``advantages``: ``[N]`` or ``[N, L]``; ``group_index``: ``[N]``)."""
    row_live = (advantages != 0) if advantages.ndim == 1 else (advantages != 0).any(dim=1)
    live = torch.zeros(int(group_index.max()) + 1, dtype=torch.bool)
    return live.index_put_((group_index,), row_live, accumulate=True)


def _zero_adv_group_fraction(advantages: torch.Tensor, group_index: torch.Tensor) -> float:
    """Share of groups whose advantages are 0 on every token of every completion."""
    return float((~_live_groups(advantages, group_index)[torch.unique(group_index)]).float().mean())


def example_stream(examples: Sequence[Example], seed: int) -> Iterator[Example]:
    """Endless stream over ``examples``, reshuffled (seeded) at every pass.

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield examples[i]


class GRPOTrainer:
    """GRPO trainer: one process, or one rank of a data-parallel group (module docstring).

    Args:
        engine: update engine (:mod:`calibrl.rl.engine`); ``engine.module`` is the policy (a
            causal LM) and its ``step`` clips to ``trainer.max_grad_norm``.
        tokenizer: the policy's tokenizer (left padding).
        prompts: builds chat prompts and knows the completion format.
        train_examples: prompts to train on.
        is_correct: verifier verdict ``(answer, example) -> bool``.
        reward_fn: weighted reward components.
        algo: the ``algo`` settings (:class:`calibrl.config.AlgoConfig`).
        trainer: the ``trainer`` settings; the trainer reads ``micro_batch_size``, ``bf16``
            (autocast when there is no ``sampler``, and in the update) and
            ``min_generation_batch`` (:class:`calibrl.config.TrainerConfig`).
        objective: the ``objective`` settings: the combiner's name (:class:`calibrl.config.ObjectiveConfig`).
        reference: frozen reference model, required when ``algo.beta > 0``.
        seed: seed of the prompt stream (the same on every rank).
        grid_step: the confidence grid's step (:mod:`calibrl.rl.confidence_grid`): the grid of the
            ``expected`` path and of the ``train/expected_confidence/...`` readout.
        sampler: a :class:`calibrl.rl.rollout.SamplingCopy` that samples the rollouts (refreshed
            from the policy at every step, no autocast), or ``None``: the policy samples them under
            the ``bf16`` autocast setting.
        dist: this process's rank; with W processes each step's ``prompts_per_step`` prompts are
            split into W equal shares of whole prompts (a group never spans ranks, so group
            baselines need no communication), loss normalisers are global and metrics are
            computed on the gathered batch.

    Raises:
        ValueError: ``beta > 0`` without a reference model, ``group_size < 2``, or
            ``prompts_per_step`` not a multiple of the world size.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        prompts: PromptBuilder,
        train_examples: Sequence[Example],
        is_correct: Callable[[str | None, Example], bool],
        reward_fn: RewardFunction,
        algo: AlgoConfig,
        trainer: TrainerConfig,
        objective: ObjectiveConfig,
        reference: Any = None,
        seed: int = 0,
        dist: DistInfo = DistInfo(),
        sampler: SamplingCopy | None = None,
        grid_step: float = 0.05,
    ) -> None:
        if algo.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2, got {algo.group_size}")
        if algo.prompts_per_step % dist.world_size:
            raise ValueError(
                f"algo.prompts_per_step={algo.prompts_per_step} must be a multiple of the {dist.world_size} "
                "processes (each rank takes whole prompts)"
            )
        if algo.beta > 0 and reference is None:
            raise ValueError("algo.beta > 0 needs a reference model")
        self.engine, self.policy, self.tokenizer, self.prompts = engine, engine.module, tokenizer, prompts
        self.is_correct, self.reward_fn, self.reference = is_correct, reward_fn, reference
        self.algo, self.trainer_cfg, self.objective = algo, trainer, objective
        self.train_examples, self.seed, self.dist, self.sampler = train_examples, seed, dist, sampler
        self.stream = example_stream(train_examples, seed)
        self.consumed = 0  # examples taken from the stream: the data position of a checkpoint
        self.skipped_steps = 0  # optimizer steps skipped as non-finite, over the run
        self.bad_steps_in_row = 0  # consecutive RL steps with a skipped optimizer step
        self.oom_retries = 0  # generate calls of the current step split after running out of memory
        self.autocast_dtype = torch.bfloat16 if trainer.bf16 else None
        self.calibration = CALIBRATION_PATHS.get(objective.calibration)(self, grid_step)
        self.calibration_loss = 0.0  # this rank's calibration-path loss of the last update

    def state_dict(self) -> dict[str, int]:
        """The trainer's own resumable state (the engine saves the model and optimizer):
        ``{"consumed": examples drawn, "skipped_steps": ...}``."""
        return {"consumed": self.consumed, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`: the prompt stream is rebuilt from its seed and advanced
        past the ``consumed`` examples, so the next step sees the prompts it would have seen."""
        self.stream = example_stream(self.train_examples, self.seed)
        for _ in range(state["consumed"]):
            next(self.stream)
        self.consumed, self.skipped_steps = state["consumed"], state["skipped_steps"]

    def generate(self, examples: list[Example]) -> Rollout:
        """Sample G completions for each example (step 2)."""
        with self.engine.generation():
            if self.sampler is not None:
                model, dtype = self.sampler.refresh(self.policy), None
            else:
                model, dtype = self.policy, self.autocast_dtype
            return generate_rollout(
                model,
                self.tokenizer,
                [self.prompts.prompt(e) for e in examples],
                self.algo.group_size,
                max_new_tokens=self.algo.max_new_tokens,
                temperature=self.algo.temperature,
                top_p=self.algo.top_p,
                stop_string=f"</{self.prompts.fmt.confidence}>",
                autocast_dtype=dtype,
                min_prompts=self.trainer_cfg.min_generation_batch,
                on_oom=self._count_oom,
            )

    def _count_oom(self, n_prompts: int) -> None:
        self.oom_retries += 1

    def score(self, rollout: Rollout, examples: list[Example]):
        """Parse, verify and reward every completion (step 3).

        Raises:
            RuntimeError: a non-finite reward (a bug in a component).
        """
        per_completion = [e for e in examples for _ in range(self.algo.group_size)]
        parsed, rewards = score_completions(rollout.texts, per_completion, self.is_correct, self.reward_fn, self.prompts.fmt)
        if not np.all(np.isfinite(rewards.total)):
            raise RuntimeError("non-finite reward reached the RL loop")
        return parsed, rewards

    def _logprobs(self, model: Any, rollout: Rollout, grad: bool) -> torch.Tensor:
        """float32 ``[N, L]`` on the model's device (0 where ``completion_mask`` is 0).

        Under gradient checkpointing (``trainer.gradient_checkpointing``) HF turns the KV cache
        off in training mode, so the shared-prefix forward gives way to the plain one."""
        share = not (grad and self._checkpointing(model))
        with torch.set_grad_enabled(grad), autocast(module_device(model), self.autocast_dtype):
            return completion_logprobs(model, rollout, share_prefix=share)

    @staticmethod
    def _checkpointing(model: Any) -> bool:
        """HF activation checkpointing is on (the KV cache is then off in training mode)."""
        return bool(getattr(model, "is_activation_checkpointing", False))

    def _logprobs_and_calibration_loss(self, mb: Rollout, cal: CalibrationBatch, rows: torch.Tensor,
                                       n_contexts: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's log-probs of micro-batch ``mb`` (``[n, L]``, with gradient) and the
        calibration path's loss of its ``rows`` computed on the same forward's KV cache
        (:meth:`calibrl.rl.calibration.CalibrationPath.loss_on_forward`; ``None``: no context)."""
        with torch.enable_grad(), autocast(module_device(self.policy), self.autocast_dtype):
            fwd = completion_forward(self.policy, mb)
            return fwd.logprobs, self.calibration.loss_on_forward(cal, rows, n_contexts, fwd)

    @staticmethod
    def _bucket_order(rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
        """LongTensor ``[N]``: the order in which to cut ``rollout``'s rows into micro-batches of
        ``micro_batch_size`` rows: by completion length, longest first (stable), or as given,
        whichever leaves fewer tokens to run.

        :func:`completion_logprobs` drops the padding columns that all rows of a micro-batch
        share, so rows of similar lengths together cost less; but it runs each distinct prompt of
        a micro-batch once, so spreading a group over micro-batches costs prompt tokens. The
        estimate sums, over micro-batches, rows x longest completion + distinct prompts x widest
        prompt (tokens). Loss normalisers are global, so the order changes the loss and its
        gradient only by float rounding.
        """
        p, length = rollout.prompt_mask.shape[1], rollout.completion_mask.shape[1]
        ends = (rollout.completion_mask * torch.arange(1, length + 1)).amax(dim=1)  # [N] last token + 1
        prompt_widths = (rollout.prompt_mask * torch.arange(p, 0, -1)).amax(dim=1)  # [N] from the first token

        def tokens(order: torch.Tensor) -> int:
            total = 0
            for rows in order.split(micro_batch_size):
                total += len(rows) * int(ends[rows].max())
                total += len(torch.unique(rollout.group_index[rows])) * int(prompt_widths[rows].max())
            return total

        given = torch.arange(len(rollout))
        by_length = torch.sort(ends, descending=True, stable=True).indices
        return by_length if tokens(by_length) < tokens(given) else given

    def advantages(self, rollout: Rollout, parsed: Sequence[ParsedCompletion], rewards: RewardBatch,
                   cal: CalibrationBatch | None = None) -> torch.Tensor:
        """Token advantages from the reward components (step 4), float ``[B*G, L]``, exactly 0 on
        padding; the objective combiner ``objective.combine`` decides how (see
        :mod:`calibrl.objectives`). Token segments are computed only for a combiner that declares
        ``needs_segments``. Under a calibration path that replaces the reward
        (:mod:`calibrl.rl.calibration`), the scoring-rule components leave the combiner's input and
        the advantage is 0 on the confidence tokens of ``cal``'s rows (from each context's end)."""
        names = list(rewards.components)
        if self.calibration.replaces_reward:
            names = [k for k in names if self.reward_fn.components[k].kind != "scoring_rule"]
        r = torch.as_tensor(np.stack([rewards.components[k] for k in names], axis=1), dtype=torch.float32)
        w = torch.tensor([self.reward_fn.weights[k] for k in names], dtype=torch.float32)
        combiner = COMBINERS.get(self.objective.combine)
        if combiner.needs_segments:
            segments = segment_ids(self.tokenizer, rollout.completion_ids, rollout.completion_mask, rollout.texts,
                                   parsed, self.prompts.fmt.answer)
        else:
            segments = rollout.completion_mask.long() - 1  # one segment: the combiner ignores boundaries
        adv = combiner(r, names, w, rollout.group_index, segments, scale=self.algo.scale_rewards,
                       std_floor=self.algo.std_floor)
        if self.calibration.replaces_reward and cal is not None:
            for i, k in zip(cal.rows.tolist(), cal.ends.tolist()):
                adv[i, k:] = 0.0  # the confidence tokens: this path's loss trains them
        return adv

    def _loss_rows(self, rollout: Rollout, advantages: torch.Tensor) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """The rows the loss sees: ``(rollout, counted, nonzero)``, the rollout with truncated rows'
        completion masks zeroed under ``algo.mask_truncated``, BoolTensors ``[N]``: the row counts in
        the loss normalisers (not in a dropped all-zero group, not truncated), the row has a
        non-zero advantage (and is not truncated)."""
        nonzero = advantages != 0 if advantages.ndim == 1 else (advantages != 0).any(dim=1)
        counted = torch.ones(len(rollout), dtype=torch.bool)
        if self.algo.drop_zero_adv_groups:  # rows of groups with some non-zero advantage
            counted = _live_groups(advantages, rollout.group_index)[rollout.group_index]
        if self.algo.mask_truncated and rollout.truncated is not None and rollout.truncated.any():
            # Overlong filtering: a cut-off row keeps no token in the loss or its normalisers.
            kept = ~rollout.truncated
            rollout = replace(rollout, completion_mask=rollout.completion_mask * kept[:, None])
            counted, nonzero = counted & kept, nonzero & kept
        return rollout, counted, nonzero

    def _active_rows(self, rollout: Rollout, nonzero: torch.Tensor) -> torch.Tensor:
        """LongTensor ``[N']``: the rows to run forward/backward, in micro-batch order
        (:meth:`_bucket_order`). Under DeepSpeed every row runs, so each rank makes the same number
        of collective forward/backward calls and DeepSpeed's fixed accumulation count holds; one
        plain process skips rows whose advantage is all 0 (they add no gradient at beta = 0)."""
        skip = self.algo.beta == 0 and not self.engine.collective
        active = torch.nonzero(nonzero).flatten() if skip else torch.arange(len(rollout))
        if active.numel() == 0:
            return active
        return active[self._bucket_order(rollout.select(active), self.trainer_cfg.micro_batch_size)]

    def _epoch(
        self, sub: Rollout, adv: torch.Tensor, old: list[torch.Tensor] | None, ref: list[torch.Tensor] | None,
        n_tokens: float, n_seqs: float, active: torch.Tensor | None = None, cal: CalibrationBatch | None = None,
        n_contexts: float = 1.0,
    ) -> tuple[float, float, float, float]:
        """One pass over the micro-batches of ``sub`` (advantages ``adv``, old and reference
        log-probs per micro-batch) and one optimizer step: ``(loss, clipped tokens, k3-KL sum,
        grad norm)`` of this rank. A non-finite micro-batch loss (one process) skips its backward
        and the step: gradients zeroed, loss and grad norm NaN. With a calibration batch ``cal``,
        the calibration path's loss of the micro-batch's rows (``active``: ``sub``'s rows in the
        rollout) is computed on the micro-batch's policy forward and joins its backward (a path
        that :attr:`~calibrl.rl.calibration.CalibrationPath.fuses_forward`, without gradient
        checkpointing), or else is backpropagated after the micro-batch's by the path's own
        forwards (chunked, gradients add up; one process only); its sum is kept in
        ``self.calibration_loss``. With one process a non-finite one skips the step like a
        non-finite loss; under DeepSpeed every rank backpropagates it and ``step()`` raises."""
        a, world, mbs = self.algo, self.dist.world_size, self.trainer_cfg.micro_batch_size
        self.engine.zero_grad()
        loss_sum = clipped = kl_sum = 0.0
        self.calibration_loss = 0.0
        use_cal = cal is not None and active is not None  # the calibration path has a loss of its own
        fused = use_cal and self.calibration.fuses_forward and not self._checkpointing(self.policy)
        if use_cal and not fused and world > 1:  # start-up checks refuse the configs that lead here
            raise RuntimeError(f"objective.calibration={self.objective.calibration}: its own forwards and backward "
                               "calls differ between ranks; not under DeepSpeed (is gradient checkpointing on?)")
        for k, c in enumerate(slice(i, i + mbs) for i in range(0, len(sub), mbs)):
            mb = sub.select(c)
            aux = None
            if fused:  # its loss from the policy forward's KV cache, one backward for both
                logp, aux = self._logprobs_and_calibration_loss(mb, cal, active[c], n_contexts)
            else:
                logp = self._logprobs(self.policy, mb, grad=True)  # on the policy's device
            res = clipped_policy_loss(
                logp, old[k] if old is not None else logp.detach(), adv[c].to(logp.device),
                mb.completion_mask.to(logp.device), clip_low=a.clip_low, clip_high=a.clip_high,
                n_tokens=n_tokens, n_seqs=n_seqs, agg=a.loss_agg, max_len=a.max_new_tokens, beta=a.beta,
                ref_logp=ref[k] if ref is not None else None,
            )
            if not self.engine.collective and not torch.isfinite(res.loss):
                # Its backward would only put NaN into every gradient: skip it and the step.
                # (A collective engine must run every micro-batch; its step() raises instead.)
                self.engine.zero_grad()  # the micro-batches before the bad one
                return math.nan, clipped, kl_sum, math.nan
            loss = res.loss
            if aux is not None:
                if not self.engine.collective and not torch.isfinite(aux):  # (collective: step() raises)
                    self.engine.zero_grad()
                    return math.nan, clipped, kl_sum, math.nan
                self.calibration_loss += float(aux.detach())
                loss = loss + aux
            self.engine.backward(loss * world if world > 1 else loss)  # DeepSpeed averages over ranks: x W
            if use_cal and not fused:  # the path's own forwards and backward calls (one process)
                own = self.calibration.backward(cal, active[c], n_contexts)
                if not math.isfinite(own):
                    self.engine.zero_grad()
                    return math.nan, clipped, kl_sum, math.nan
                self.calibration_loss += own
            loss_sum += float(res.loss.detach())
            clipped += float(res.clipped_tokens)
            kl_sum += float(res.kl_sum)
        return loss_sum, clipped, kl_sum, self.engine.step()

    def update(self, rollout: Rollout, advantages: torch.Tensor, cal: CalibrationBatch | None = None) -> dict[str, float]:
        """Clipped policy-gradient update(s) on one rollout batch (steps 5-6).

        Args:
            rollout: ``B*G`` completions.
            advantages: float ``[B*G, L]`` per token (or ``[B*G]`` per completion).
            cal: the step's calibration batch; under a path with a loss of its own, its rows run
                forward even where their advantage is 0, and its loss joins theirs.

        Returns:
            ``loss``, ``clip_fraction``, ``grad_norm``, ``kl`` (mean k3 estimate per
            completion token) when ``beta > 0``, and ``calibration_loss`` (summed over ranks)
            under a path with a loss of its own; ``loss`` and ``grad_norm`` are NaN for an
            update skipped on a non-finite loss.
        """
        a, mbs = self.algo, self.trainer_cfg.micro_batch_size
        rollout, counted, nonzero = self._loss_rows(rollout, advantages)
        own_loss = cal is not None and self.calibration.replaces_reward
        if own_loss:
            nonzero = nonzero | torch.isin(torch.arange(len(rollout)), cal.rows)
        (n_contexts,) = all_reduce_sum([float(len(cal.rows)) if own_loss else 0.0])
        mask = rollout.completion_mask
        n_tokens, n_seqs = all_reduce_sum([float(mask[counted].sum()), float(counted.sum())])  # global counts
        n_tokens, n_seqs = max(n_tokens, 1.0), max(n_seqs, 1.0)
        out = {"loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0} | ({"kl": 0.0} if a.beta > 0 else {})
        if own_loss:  # logged every step (0.0 on a step with nothing to learn)
            out["calibration_loss"] = 0.0
        active = self._active_rows(rollout, nonzero)
        if active.numel() == 0:  # nothing to learn from, nothing that could go wrong
            self.bad_steps_in_row = 0
            return out
        sub, adv = rollout.select(active), advantages[active]
        chunks = [sub.select(slice(i, i + mbs)) for i in range(0, len(sub), mbs)]
        old = [self._logprobs(self.policy, c, grad=False) for c in chunks] if a.ppo_epochs > 1 else None
        ref = [self._logprobs(self.reference, c, grad=False) for c in chunks] if a.beta > 0 else None
        self.policy.train()
        skipped = False
        for _ in range(a.ppo_epochs):
            loss_sum, clipped, kl_sum, grad_norm = self._epoch(sub, adv, old, ref, n_tokens, n_seqs, active,
                                                               cal if own_loss else None, max(n_contexts, 1.0))
            if not math.isfinite(grad_norm):
                self.skipped_steps += 1
                skipped = True
        self.bad_steps_in_row = self.bad_steps_in_row + 1 if skipped else 0
        loss_sum, clipped, kl_sum, cal_loss = all_reduce_sum([loss_sum, clipped, kl_sum, self.calibration_loss])
        out.update(loss=loss_sum, clip_fraction=clipped / n_tokens, grad_norm=grad_norm)
        if own_loss:
            out["calibration_loss"] = cal_loss
        if a.beta > 0:
            out["kl"] = kl_sum / n_tokens
        return out

    def _next_prompts(self) -> list[Example]:
        """This rank's share of the step's ``algo.prompts_per_step`` prompts (step 1): whole
        prompts, so a group never spans ranks."""
        step_examples = [next(self.stream) for _ in range(self.algo.prompts_per_step)]
        self.consumed += len(step_examples)
        share = len(step_examples) // self.dist.world_size
        return step_examples[self.dist.rank * share : (self.dist.rank + 1) * share]

    def step(self) -> dict[str, float]:
        """One RL step (steps 1-6); returns the metrics to log (see ``train/``, ``rewards/``, ``perf/``)."""
        t0 = time.perf_counter()
        self.oom_retries = 0
        examples = self._next_prompts()
        rollout = self.generate(examples)
        t1 = time.perf_counter()
        parsed, rewards = self.score(rollout, examples)
        cal = self.calibration.prepare(rollout, parsed, rewards, examples)
        advantages = self.advantages(rollout, parsed, rewards, cal)
        t2 = time.perf_counter()
        upd = self.update(rollout, advantages, cal)
        t3 = time.perf_counter()
        unanswerable = [e.unanswerable for e in examples for _ in range(self.algo.group_size)]
        # Metrics of the whole step's batch: every rank's rows gathered (exact means over all
        # completions, not means of per-rank means). Rows stay group by group, so row // G is the
        # question of a row in the gathered batch.
        parts = gather_objects({
            "components": rewards.components, "total": rewards.total, "correct": rewards.correct,
            "confidence": rewards.confidence, "format_ok": rewards.format_ok,
            "abstained": np.array([p.abstained for p in parsed], dtype=bool), "unanswerable": np.array(unanswerable, dtype=bool),
            "length": rollout.completion_mask.sum(dim=1).numpy(),
            "truncated": (rollout.truncated if rollout.truncated is not None
                          else torch.zeros(len(rollout), dtype=torch.bool)).numpy(),
            "zero_adv_groups": _zero_adv_group_fraction(advantages, rollout.group_index) * len(examples),
            "adv_abs_sum": float(advantages.abs().sum()), "times": (t1 - t0, t2 - t1, t3 - t2),
            "oom_retries": self.oom_retries,
            "expected_confidence": cal.expected_confidence, "calibration_score": cal.score,
            "branch_q": cal.branch_q, "calibration_target": cal.target,
        })
        return self._metrics(parts, rewards, upd)

    def _calibration_metrics(self, parts: list[dict[str, Any]], correct: np.ndarray) -> dict[str, float]:
        """The grid readout and the calibration path's figures over every rank's rows:
        ``train/expected_confidence/{confidence_mean, confidence_std, overconfidence, ece, brier,
        auroc, coverage}`` (the expected stated confidence, over the rows with a context;
        coverage: their share), and under ``expected``/``branch`` ``train/calibration_score``
        (mean over all rows, the worst value where no context) and ``train/calibration_target_mean``
        (over the rows with a context), under ``branch``
        ``train/branch/{parse_rate, confidence_std_within}`` (share of branches whose confidence
        parsed; mean over contexts of the std of its K parsed confidences)."""
        exp_conf = np.concatenate([p["expected_confidence"] for p in parts])
        ok = np.isfinite(exp_conf)
        summary = calibration_summary(correct, np.where(ok, exp_conf, np.nan), ok)
        keep = ("confidence_mean", "confidence_std", "overconfidence", "ece", "brier", "auroc")
        out = {f"train/expected_confidence/{k}": summary[k] for k in keep}
        out["train/expected_confidence/coverage"] = float(ok.mean())
        if parts[0]["calibration_score"] is not None:
            out["train/calibration_score"] = float(np.concatenate([p["calibration_score"] for p in parts]).mean())
            target = np.concatenate([p["calibration_target"] for p in parts])
            out["train/calibration_target_mean"] = float(target.mean()) if target.size else float("nan")
        qs = [p["branch_q"] for p in parts if p["branch_q"] is not None]
        if self.objective.calibration == "branch":
            q = np.concatenate(qs) if qs else np.zeros(0)
            k = self.objective.branches
            out["train/branch/parse_rate"] = float(np.isfinite(q).mean()) if q.size else float("nan")
            rows = q.reshape(-1, k)
            std = [float(np.std(r[np.isfinite(r)])) for r in rows if np.isfinite(r).sum() >= 2]
            out["train/branch/confidence_std_within"] = float(np.mean(std)) if std else float("nan")
        return out

    def _metrics(self, parts: list[dict[str, Any]], rewards: RewardBatch, upd: dict[str, float]) -> dict[str, float]:
        """The step's metrics from every rank's gathered record ``parts`` (rows group by group, so
        row // G is the question of a row), this rank's ``rewards`` (component names, guard
        counters, summed over ranks here) and the update's results ``upd``."""

        def cat(key: str) -> np.ndarray:
            return np.concatenate([p[key] for p in parts])

        components = {k: np.concatenate([p["components"][k] for p in parts]) for k in rewards.components}
        total, correct, fmt_ok, length = cat("total"), cat("correct"), cat("format_ok"), cat("length")
        groups = total.reshape(-1, self.algo.group_size)
        metrics = reward_metrics(components, total)
        metrics |= {f"train/{k}": v for k, v in calibration_summary(correct, cat("confidence"), fmt_ok).items()}
        metrics |= {f"train/{k}": v for k, v in upd.items()}
        metrics |= self._calibration_metrics(parts, correct)
        if self.prompts.fmt.abstain is not None or cat("unanswerable").any():
            # a group is G samples of one question, so over-abstention is defined every step
            abst = abstention_metrics(np.arange(total.size) // self.algo.group_size, cat("abstained"), correct, fmt_ok,
                                      cat("unanswerable"))
            metrics |= {f"train/abstain/{k}": v for k, v in abst.items()}
        gen_s, score_s, update_s = (max(p["times"][k] for p in parts) for k in range(3))  # the slowest rank
        metrics |= {
            "train/completion_length": float(length.mean()),
            "train/truncated_fraction": float(cat("truncated").mean()),
            "train/zero_std_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),
            "train/zero_adv_groups": sum(p["zero_adv_groups"] for p in parts) / groups.shape[0],
            # per completion token
            "train/advantage_abs_mean": sum(p["adv_abs_sum"] for p in parts) / max(float(length.sum()), 1.0),
            "train/skipped_steps": float(self.skipped_steps),
            "train/bad_steps_in_row": float(self.bad_steps_in_row),
            "train/lr": self.engine.lr(),
            "perf/generate_s": gen_s,
            "perf/score_s": score_s,
            "perf/update_s": update_s,
            "perf/step_s": gen_s + score_s + update_s,
            "perf/rollout_tokens_per_s": float(length.sum()) / max(gen_s, 1e-9),
            "perf/generation_oom_retries": float(sum(p["oom_retries"] for p in parts)),
            **dict(zip(rewards.counters, all_reduce_sum([float(v) for v in rewards.counters.values()]))),  # guard counts
        }
        return metrics
