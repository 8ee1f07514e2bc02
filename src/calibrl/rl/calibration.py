"""Calibration paths: how the calibration objective reaches the confidence tokens.

``objective.calibration`` (registry :data:`CALIBRATION_PATHS`) picks one; the math is in
:mod:`calibrl.objectives.calibration`. Every path also measures, each RL step, the model's
confidence distribution over the grid (:mod:`calibrl.rl.confidence_grid`) at the confidence tag of
every well-formed rollout, before the update, and logs the *expected stated confidence*
``sum_v p(v) v`` with its calibration metrics (``train/expected_confidence/...``).

``reward`` (default; RLCR, arXiv:2507.16806)
    The scoring-rule components (``reward.weights.brier`` ...) are part of the GRPO reward; every
    token, the confidence tokens included, gets the combiner's advantage. Nothing is added here.

``expected`` (ConfTuner's tokenized Brier, arXiv:2508.18847)
    The GRPO reward keeps only the non-calibration components (correctness, format,
    abstention), and a well-formed rollout's GRPO advantage is removed from its *confidence
    tokens* (from the first token after ``<confidence>`` to the end). Their training signal is
    instead the loss ``L_cal = -(1/M) sum_m E_m``, ``E_m`` the exact expected score of the
    scoring rules (weights from ``reward.weights``) under the model's probabilities ``p_m(v)`` of
    writing each grid value, against the target ``t_m``, the mass off the grid scored at the
    rules' worst value (:func:`calibrl.objectives.calibration.expected_score`), M the number of
    well-formed rollouts of the step (all ranks). (Renormalised over the grid instead, the loss
    left the off-grid mass free: a first run of this arm lost format, 0.998 -> 0.844.) It is added to the policy loss of the
    micro-batch that holds the rollout (its gradient joins theirs). The grid's prefix tree runs on
    the KV cache of the micro-batch's policy forward (:func:`calibrl.rl.confidence_grid.grid_logprobs_on_cache`:
    only the context's last token and the tree's 36 tokens are new), and one backward takes both
    losses; under gradient checkpointing, where that cache is off, the contexts run again on
    their own (:func:`calibrl.rl.confidence_grid.grid_logprobs_tree`, chunked, see Memory). Both
    give the same loss and gradient up to float rounding (tested).

``branch`` (the answer fixed, as Rewarding Doubt, arXiv:2503.02623)
    The same GRPO reward and masking as ``expected``. For each well-formed rollout, K =
    ``objective.branches`` confidence continuations are sampled from its context (temperature
    ``algo.temperature``, at most ``objective.branch_max_new_tokens`` tokens, stopping at the
    closing tag) and scored against its target; an unparseable branch scores the rule's worst
    value. Branch k's advantage is ``w * (S_k - mean_{j != k} S_j)``
    (:func:`calibrl.objectives.calibration.loo_advantages`, no std division), on its own tokens
    only; their clipped policy loss, normalised by the step's branch tokens, is added to the
    micro-batch's loss.

Format failures: a rollout whose confidence is missing or unparseable has no context; it gets
no calibration loss, keeps its GRPO advantage on every token (its format reward is lower, so its
format part is negative on all of them), and its logged calibration score is the scoring rule's
worst value, never better than any well-formed rollout's (``train/calibration_score``).

Memory: a path's own loss that runs forwards of its own (``branch``; ``expected`` under gradient
checkpointing) is run and backpropagated in chunks of :data:`CONTEXTS_PER_CHUNK` contexts, after
the micro-batch's policy-loss backward (gradients add up), so its graph never holds more than one
chunk. ``expected`` on the policy forward's cache adds the tree tokens of the micro-batch's
contexts (``trainer.micro_batch_size`` rows at most) to that forward's graph.

DeepSpeed: ``expected`` runs under every ZeRO stage: its loss is part of each micro-batch's one
forward and backward, scaled like the policy loss (global normaliser M, times the world size, as
DeepSpeed averages gradients), and a rank whose micro-batch has no context runs a tree weighted 0
so that every rank makes the same model calls (ZeRO-3 gathers parameters per module call); two
processes give the update of one (tested).

Limits (refused at start-up, :func:`check_calibration_settings`): ``branch``, and ``expected``
under gradient checkpointing, run extra forwards and backward calls whose count differs between
ranks, so not under DeepSpeed yet; ``branch`` needs ``algo.ppo_epochs == 1`` (its branches are
on-policy samples of the step).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from calibrl.data.example import Example
from calibrl.device import autocast, module_device
from calibrl.distributed import all_reduce_sum
from calibrl.objectives.calibration import TARGETS, calibration_target, expected_score, loo_advantages
from calibrl.registry import Registry
from calibrl.rewards import ParsedCompletion, RewardBatch
from calibrl.rewards.parsing import parse_confidence
from calibrl.rewards.scoring_rules import SCORING_RULES
from calibrl.rewards.spans import span_tokens, token_char_ends
from calibrl.rl.confidence_grid import (
    ConfidenceGrid,
    confidence_contexts,
    context_ids,
    expected_confidence,
    grid_distribution,
    grid_logprobs_on_cache,
    grid_logprobs_tree,
)
from calibrl.rl.loss import clipped_policy_loss
from calibrl.rl.rollout import CompletionForward, Rollout, completion_logprobs, sample_from_ids

if TYPE_CHECKING:
    from calibrl.rl.grpo import GRPOTrainer

#: Contexts per forward/backward of a path's own loss, where it runs forwards of its own
#: (``branch``: its K continuations; ``expected`` under gradient checkpointing only: each context
#: plus its grid's prefix tree, 36 more tokens for the 0.05 grid and SmolLM2).
CONTEXTS_PER_CHUNK = 8

__all__ = ["CALIBRATION_PATHS", "CONTEXTS_PER_CHUNK", "CalibrationBatch", "CalibrationPath", "check_calibration_settings", "resolve_grid_step"]


@dataclass
class CalibrationBatch:
    """What a calibration path prepared for one RL step's rollout (N rows).

    Attributes:
        rows: LongTensor ``[M]``, the rows with a confidence context (well formed).
        ends: LongTensor ``[M]``, their context lengths in completion tokens.
        target: float64 ``[M]`` in [0, 1], the probability each confidence is scored against.
        branch: ``branch`` only: the ``M * K`` confidence continuations (group ``m`` = context m).
        branch_adv: ``branch`` only: float ``[M * K]`` advantages.
        branch_tokens: ``branch`` only: global count of branch tokens (loss normaliser).
        expected_confidence: float64 ``[N]``, ``sum_v p(v) v`` before the update; NaN for rows
            without a context.
        score: float64 ``[N]`` (paths that replace the reward): the calibration score of each
            rollout, the weighted expected score before the update (``expected``) or the mean
            score of its branches (``branch``), the rules' worst value for rows without a
            context; ``None`` for ``reward``.
        branch_q: ``branch`` only: float64 ``[M * K]`` the branches' parsed confidences (NaN:
            unparseable).
        rollout: the step's rollout (the contexts' source).
    """

    rows: torch.Tensor
    ends: torch.Tensor
    target: np.ndarray
    branch: Rollout | None = None
    branch_adv: torch.Tensor | None = None
    branch_tokens: float = 1.0
    expected_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0))
    score: np.ndarray | None = None
    branch_q: np.ndarray | None = None
    rollout: Rollout | None = None


def resolve_grid_step(objective_step: float | None, sft_step: float) -> float:
    """The confidence grid's step: ``objective.grid_step``, or the SFT grid when that is null."""
    return sft_step if objective_step is None else objective_step


def check_calibration_settings(cfg: Any) -> None:
    """Start-up checks of ``objective.calibration`` and its settings (a composed run config).

    Raises:
        KeyError: unknown path or target (the message lists the known ones).
        ValueError: ``gamma`` outside [0, 1]; ``branches < 2``; ``branch_max_new_tokens < 1``; a grid
            step that is not two decimals dividing 1, or that differs from the grid the SFT warm-up
            teaches (``trainer.sft.confidence.grid_step``, when SFT is on); ``expected``/``branch``
            without a scoring rule in ``reward.weights``, or (``branch``) with
            ``algo.ppo_epochs > 1``; a target or ``gamma`` other than the defaults under ``reward``;
            under DeepSpeed: ``branch``, or ``expected`` with ``trainer.gradient_checkpointing``.
    """
    from calibrl.rewards.components import COMPONENTS

    obj = cfg.objective
    path = CALIBRATION_PATHS.get(obj.calibration)
    TARGETS.get(obj.target)  # an unknown name raises, listing the known ones
    if not (0.0 <= float(obj.gamma) <= 1.0):
        raise ValueError(f"objective.gamma must be in [0, 1], got {obj.gamma}")
    if obj.branches < 2:
        raise ValueError(f"objective.branches must be >= 2 (a leave-one-out baseline needs K >= 2), got {obj.branches}")
    if obj.branch_max_new_tokens < 1:
        raise ValueError(f"objective.branch_max_new_tokens must be >= 1, got {obj.branch_max_new_tokens}")
    sft_step = cfg.trainer.sft.confidence.grid_step
    step = resolve_grid_step(obj.grid_step, sft_step)
    try:
        ConfidenceGrid(step)
    except ValueError as err:  # named after the setting the bad step came from
        key = "objective.grid_step" if obj.grid_step is not None else "trainer.sft.confidence.grid_step"
        raise ValueError(f"{key}: {err}") from err
    if obj.grid_step is not None and cfg.trainer.sft.enabled and abs(obj.grid_step - sft_step) > 1e-9:
        raise ValueError(
            f"objective.grid_step={obj.grid_step} does not match the confidence grid the SFT warm-up teaches "
            f"(trainer.sft.confidence.grid_step={sft_step}); leave objective.grid_step null to use it"
        )
    if path is RewardPath:
        if obj.target != "correct" or float(obj.gamma) != 1.0:
            raise ValueError("objective.target and objective.gamma apply to objective.calibration=expected|branch; "
                             "the reward path scores the sampled verdict")
        return
    rules = [k for k, w in cfg.reward.weights.items() if COMPONENTS.get(k).kind == "scoring_rule" and w > 0]
    if not rules:
        raise ValueError(f"objective.calibration={obj.calibration} needs a scoring rule with a positive weight in "
                         "reward.weights (e.g. reward=rlcr: brier)")
    if cfg.deepspeed.enabled and path is BranchPath:
        raise ValueError("objective.calibration=branch is not supported under DeepSpeed yet (its extra forwards and "
                         "backward calls differ between ranks); run it on one process")
    if cfg.deepspeed.enabled and cfg.trainer.gradient_checkpointing:
        raise ValueError("objective.calibration=expected with trainer.gradient_checkpointing is not supported under "
                         "DeepSpeed (without the KV cache its loss needs forwards and backward calls of its own, "
                         "whose count differs between ranks)")
    if path is BranchPath and cfg.algo.ppo_epochs != 1:
        raise ValueError("objective.calibration=branch needs algo.ppo_epochs=1 (branches are on-policy samples)")


def _answer_probs(tokenizer: Any, rollout: Rollout, parsed: Sequence[ParsedCompletion], logp: torch.Tensor) -> np.ndarray:
    """Answer-token probability of every row: ``exp(mean log p)`` over the tokens covering the
    answer text (as :func:`calibrl.eval.signals.answer_probability`); NaN without an answer span."""
    out = np.full(len(rollout), np.nan)
    for i, p in enumerate(parsed):
        if p.answer_span is None:
            continue
        n = int(rollout.completion_mask[i].sum())
        toks = span_tokens(token_char_ends(tokenizer, rollout.completion_ids[i, :n].tolist()), p.answer_span)
        if toks:
            out[i] = float(np.exp(logp[i, toks].double().mean()))
    return out


class CalibrationPath:
    """Base: the ``reward`` path's behaviour (nothing added), plus the grid readout every path logs.

    Args:
        trainer: the :class:`calibrl.rl.grpo.GRPOTrainer` (tokenizer, models, settings).
        grid_step: the confidence grid's step (:func:`resolve_grid_step`).
    """

    #: The scoring-rule components leave the GRPO reward and the confidence tokens' GRPO advantage
    #: is replaced by this path's loss.
    replaces_reward = False
    #: The grid readout is a no-grad forward in :meth:`prepare`; ``expected`` takes it from its
    #: own gradient forward instead (the same pre-update policy: no optimizer step has run yet).
    readout_in_prepare = True
    #: The path's loss can be computed on the KV cache of the micro-batch's policy forward
    #: (:meth:`loss_on_forward`) and backpropagated with the policy loss, instead of by
    #: :meth:`backward`'s own forwards (which the trainer still uses where that cache is off).
    fuses_forward = False

    def __init__(self, trainer: "GRPOTrainer", grid_step: float) -> None:
        self.t, self.grid_step = trainer, grid_step
        comps = trainer.reward_fn.components
        self.rules = {comps[k].rule: w for k, w in trainer.reward_fn.weights.items()
                      if comps[k].kind == "scoring_rule" and w > 0}
        self.worst = sum(w * SCORING_RULES.get(r).low for r, w in self.rules.items())

    @functools.cached_property
    def grid(self) -> ConfidenceGrid:
        """The confidence grid (built on first use: a trainer driven by hand may have no prompts)."""
        return ConfidenceGrid.for_format(self.grid_step, self.t.prompts.fmt)

    @functools.cached_property
    def candidates(self) -> list[list[int]]:
        """The grid's candidate token ids under the policy's tokenizer."""
        return self.grid.token_ids(self.t.tokenizer)

    def _readout_model(self) -> tuple[Any, torch.dtype | None]:
        if self.t.sampler is not None:
            return self.t.sampler.model, None  # refreshed from the policy for this step's rollouts
        return self.t.policy, self.t.autocast_dtype

    def _grid_probs(self, model: Any, dtype: torch.dtype | None, rollout: Rollout, rows: torch.Tensor,
                    ends: torch.Tensor, grad: bool, normalise: bool = True) -> torch.Tensor:
        """``[M, V]``: the probability of writing each grid value after each context, renormalised
        over the grid (``normalise``) or as the model gives it (rows sum to at most 1)."""
        with torch.set_grad_enabled(grad), autocast(module_device(model), dtype):
            lp = grid_logprobs_tree(model, rollout, rows, ends, self.candidates, self.t.tokenizer.pad_token_id)
            return grid_distribution(lp) if normalise else torch.exp(lp.float())

    def prepare(self, rollout: Rollout, parsed: Sequence[ParsedCompletion], rewards: RewardBatch,
                examples: Sequence[Example]) -> CalibrationBatch:
        """Contexts, targets and the grid readout of the step's rollout (no gradient)."""
        rows, ends = confidence_contexts(self.t.tokenizer, rollout, parsed, self.t.prompts.fmt)
        correct = np.asarray(rewards.correct, dtype=bool)
        target = np.zeros(len(rows))
        score = None
        model, dtype = self._readout_model()
        probs = None
        if len(rows) and self.readout_in_prepare:
            probs = self._grid_probs(model, dtype, rollout, rows, ends, grad=False).float().cpu()
        exp_conf = np.full(len(rollout), np.nan)
        if probs is not None:
            exp_conf[rows.numpy()] = expected_confidence(probs, self.grid.values).double().numpy()
        if self.replaces_reward:
            answer_prob = None
            if TARGETS.get(self.t.objective.target).needs_answer_prob:
                with torch.no_grad(), autocast(module_device(model), dtype):
                    logp = completion_logprobs(model, rollout).float().cpu()
                answer_prob = _answer_probs(self.t.tokenizer, rollout, parsed, logp)
            full = calibration_target(self.t.objective.target, self.t.objective.gamma, correct,
                                      rollout.group_index.numpy(), [p.answer for p in parsed], answer_prob)
            target = full[rows.numpy()]
            score = np.full(len(rollout), self.worst)  # the worst where no context
            if probs is not None:  # the expected score before the update (of the renormalised grid)
                score[rows.numpy()] = expected_score(probs.double(), self.grid.values, torch.as_tensor(target),
                                                     self.rules).numpy()
        return CalibrationBatch(rows, ends, target, expected_confidence=exp_conf, score=score, rollout=rollout)

    def loss_on_forward(self, batch: CalibrationBatch, rows: torch.Tensor, n_contexts: float,
                        fwd: CompletionForward) -> torch.Tensor | None:
        """The calibration loss of the main-rollout ``rows`` (LongTensor ``[n]``, the micro-batch's
        rows in order) computed on the policy forward ``fwd`` of that micro-batch (its KV cache,
        which this narrows and appends to: ``fwd`` is used up), under the caller's grad and
        autocast mode.

        Returns:
            A float32 scalar on the model's device to add to the micro-batch's policy loss before
            its one backward (score units divided by the step's context count M); ``None`` when
            none of the rows has a context, except under a collective engine, where it is a
            zero-weighted tree so every rank makes the same model calls.

        Raises:
            NotImplementedError: the path does not :attr:`fuses_forward`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no loss on the policy forward")

    def backward(self, batch: CalibrationBatch, rows: torch.Tensor, n_contexts: float) -> float:
        """Backward of the calibration loss of the main-rollout ``rows`` of one micro-batch, in
        chunks of :data:`CONTEXTS_PER_CHUNK` contexts (each chunk's graph is freed before the
        next, so memory stays bounded whatever the micro-batch); returns the loss (0.0: none; NaN:
        a chunk's loss was not finite, and nothing after it was run)."""
        return 0.0

    def _chunks(self, batch: CalibrationBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        pos = torch.nonzero(torch.isin(batch.rows, rows)).flatten()  # the contexts of these rows
        return [c for c in pos.split(CONTEXTS_PER_CHUNK) if c.numel()]  # (an empty pos splits into one empty chunk)

    def _backward_chunks(self, batch: CalibrationBatch, rows: torch.Tensor, chunk_loss) -> float:
        total = 0.0
        for pos in self._chunks(batch, rows):
            loss = chunk_loss(pos)
            if not torch.isfinite(loss):
                return float("nan")
            self.t.engine.backward(loss)
            total += float(loss.detach())
        return total


CALIBRATION_PATHS: Registry[type[CalibrationPath]] = Registry("calibration path")


@CALIBRATION_PATHS.register("reward")
class RewardPath(CalibrationPath):
    """``reward``: the scoring rules stay in the GRPO reward (module docstring)."""


@CALIBRATION_PATHS.register("expected")
class ExpectedPath(CalibrationPath):
    """``expected``: the exact expected score over the grid (module docstring)."""

    replaces_reward = True
    readout_in_prepare = False
    fuses_forward = True

    def _loss(self, batch: CalibrationBatch, pos: torch.Tensor, probs: torch.Tensor, n_contexts: float) -> torch.Tensor:
        """``-(1/M) sum E_m`` over the contexts ``pos`` (indices into ``batch.rows``) from their grid
        probabilities as the model gives them, ``probs`` [len(pos), V] (the mass off the grid
        scores the worst); the first call per context also fills its pre-update readout."""
        # bf16 rounding can put a row a hair above 1 when (nearly) all its mass is on the grid
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1.0)
        target = torch.as_tensor(batch.target[pos.numpy()], dtype=torch.float32, device=probs.device)
        e = expected_score(probs, self.grid.values.float(), target, self.rules)
        idx = batch.rows[pos].numpy()
        if np.isnan(batch.expected_confidence[idx]).any():  # the first epoch: the pre-update readout
            renorm = (probs / probs.sum(dim=1, keepdim=True)).detach().cpu()
            batch.expected_confidence[idx] = expected_confidence(renorm, self.grid.values).numpy()
            batch.score[idx] = e.detach().double().cpu().numpy()
        return -e.sum() / n_contexts

    def loss_on_forward(self, batch, rows, n_contexts, fwd):
        local = torch.nonzero(torch.isin(rows, batch.rows)).flatten()  # micro-batch rows with a context
        if local.numel() == 0:
            if not self.t.engine.collective:
                return None
            # Under DeepSpeed every rank makes the same model calls (ZeRO-3 gathers the parameters
            # of each module it runs): a tree after the first row's first token, weighted 0.
            one = torch.ones(1, dtype=torch.long)
            lp = grid_logprobs_on_cache(self.t.policy, fwd, one - 1, one, self.candidates)
            return torch.nan_to_num(lp, 0.0, 0.0, 0.0).sum() * 0.0  # 0 even where a log-prob is -inf
        where = {int(r): j for j, r in enumerate(batch.rows.tolist())}
        pos = torch.tensor([where[int(r)] for r in rows[local].tolist()], dtype=torch.long)
        lp = grid_logprobs_on_cache(self.t.policy, fwd, local, batch.ends[pos], self.candidates)
        probs = torch.exp(lp.float())
        with autocast(probs.device, None):  # the score in float32, as :meth:`backward` takes it
            return self._loss(batch, pos, probs, n_contexts)

    def backward(self, batch, rows, n_contexts):
        def chunk_loss(pos: torch.Tensor) -> torch.Tensor:
            probs = self._grid_probs(self.t.policy, self.t.autocast_dtype, batch.rollout, batch.rows[pos],
                                     batch.ends[pos], grad=True, normalise=False)  # off-grid mass scores the worst
            return self._loss(batch, pos, probs, n_contexts)

        return self._backward_chunks(batch, rows, chunk_loss)


@CALIBRATION_PATHS.register("branch")
class BranchPath(CalibrationPath):
    """``branch``: K sampled confidences per rollout, leave-one-out baseline (module docstring)."""

    replaces_reward = True

    def prepare(self, rollout, parsed, rewards, examples):
        batch = super().prepare(rollout, parsed, rewards, examples)
        k, m = self.t.objective.branches, len(batch.rows)
        if m == 0:
            return batch
        ids, mask = context_ids(rollout, batch.rows, batch.ends, self.t.tokenizer.pad_token_id)
        model, dtype = self._readout_model()
        with torch.no_grad():
            branch = sample_from_ids(
                model, self.t.tokenizer, ids, mask, k, max_new_tokens=self.t.objective.branch_max_new_tokens,
                temperature=self.t.algo.temperature, top_p=self.t.algo.top_p, do_sample=True,
                stop_string=self.grid.close_tag, autocast_dtype=dtype)
        scores = np.full(m * k, self.worst)
        target = np.repeat(batch.target, k)
        q = np.full(m * k, np.nan)
        for j, text in enumerate(branch.texts):
            body = text.split(self.grid.close_tag)[0] if self.grid.close_tag in text else None
            if body is None:
                continue  # never closed: unparseable, the worst score
            value, _ = parse_confidence(body)
            if value is None:
                continue
            q[j] = value
            scores[j] = sum(w * (target[j] * SCORING_RULES.get(r).fn(np.array([value]), np.ones(1))[0]
                                 + (1 - target[j]) * SCORING_RULES.get(r).fn(np.array([value]), np.zeros(1))[0])
                            for r, w in self.rules.items())
        adv = loo_advantages(torch.as_tensor(scores, dtype=torch.float32).view(m, k)).flatten()
        batch.branch, batch.branch_adv, batch.branch_q = branch, adv, q
        batch.score[batch.rows.numpy()] = scores.reshape(m, k).mean(axis=1)
        (batch.branch_tokens,) = all_reduce_sum([float(branch.completion_mask.sum())])
        return batch

    def backward(self, batch, rows, n_contexts):
        if batch.branch is None:
            return 0.0
        k, a = self.t.objective.branches, self.t.algo

        def chunk_loss(pos: torch.Tensor) -> torch.Tensor:
            sel = (pos[:, None] * k + torch.arange(k)[None]).flatten()
            sub = batch.branch.select(sel)
            logp = self.t._logprobs(self.t.policy, sub, grad=True)
            mask = sub.completion_mask.to(logp.device)
            adv = batch.branch_adv[sel].to(logp.device)[:, None].expand_as(logp)
            return clipped_policy_loss(logp, logp.detach(), adv, mask, clip_low=a.clip_low, clip_high=a.clip_high,
                                       n_tokens=batch.branch_tokens, n_seqs=float(len(batch.rows)), agg="token_mean",
                                       max_len=self.t.objective.branch_max_new_tokens, beta=0.0).loss

        return self._backward_chunks(batch, rows, chunk_loss)
