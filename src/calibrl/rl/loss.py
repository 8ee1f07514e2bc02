"""Clipped policy loss (PPO, Schulman et al., arXiv:1707.06347) with an optional KL penalty.

Per completion token t of completion i, with ratio ``rho = exp(logp - old_logp)`` and advantage
``A_it`` (the same for every token of a completion unless the objective combiner assigns credit
by segment, :mod:`calibrl.objectives`)::

    l_it = -min(rho * A_it, clip(rho, 1 - eps_low, 1 + eps_high) * A_it) + beta * KL_it
    KL_it = exp(ref_logp - logp) - (ref_logp - logp) - 1      (the "k3" estimator, always >= 0;
                                                              Schulman, "Approximating KL", 2020)

Aggregation over tokens (``algo.loss_agg``, registry :data:`LOSS_AGG`):

- ``token_mean``: sum of ``l_it`` over all completion tokens of the batch / their count
  (DAPO, arXiv:2503.14476; no length bias between completions).
- ``seq_mean_token_mean``: mean over tokens within each completion, then mean over completions
  (the original GRPO, arXiv:2402.03300; a short completion's tokens weigh more).
- ``constant``: sum of ``l_it`` over all completion tokens / (completions x ``max_len``), a
  constant normaliser (Dr. GRPO, arXiv:2503.20783: no length normalisation bias; ``max_len`` is
  the generation cap ``algo.max_new_tokens``).

Prompt and padding tokens are masked out by ``mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from calibrl.registry import Registry

__all__ = ["LOSS_AGG", "PolicyLossOutput", "clipped_policy_loss"]

# agg(per_token_loss [N, L], mask [N, L], n_tokens_total, n_seqs_total, max_len) -> scalar
LossAgg = Callable[[torch.Tensor, torch.Tensor, float, float, float], torch.Tensor]
LOSS_AGG: Registry[LossAgg] = Registry("loss aggregation")


@LOSS_AGG.register("token_mean")
def _token_mean(loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_len: float) -> torch.Tensor:
    return (loss * mask).sum() / n_tokens


@LOSS_AGG.register("seq_mean_token_mean")
def _seq_mean_token_mean(
    loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_len: float
) -> torch.Tensor:
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_seq.sum() / n_seqs


@LOSS_AGG.register("constant")
def _constant(loss: torch.Tensor, mask: torch.Tensor, n_tokens: float, n_seqs: float, max_len: float) -> torch.Tensor:
    return (loss * mask).sum() / (n_seqs * max_len)


@dataclass
class PolicyLossOutput:
    """Loss of one micro-batch and its diagnostics.

    Attributes:
        loss: scalar to backpropagate (already divided by the batch-level normaliser, so
            micro-batch losses add up to the batch loss).
        clipped_tokens: number of completion tokens whose ratio was clipped (float tensor).
        kl_sum: sum over completion tokens of the k3 KL estimate (0 when no reference).
    """

    loss: torch.Tensor
    clipped_tokens: torch.Tensor
    kl_sum: torch.Tensor


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    n_tokens: float,
    n_seqs: float,
    agg: str = "token_mean",
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    max_len: int | None = None,
) -> PolicyLossOutput:
    """Clipped surrogate loss of one micro-batch.

    Args:
        logp: log-probs of the sampled tokens under the current policy, ``[N, L]`` (nats).
        old_logp: the same under the policy that sampled them, ``[N, L]``.
        advantages: ``[N]``, one per completion, broadcast over its tokens, or ``[N, L]``, one
            per token (objective combiners that assign credit by segment).
        mask: ``[N, L]`` bool/0-1, 1 on completion tokens.
        clip_low, clip_high: eps_low / eps_high, each >= 0.
        n_tokens: completion tokens in the whole batch (normaliser for ``token_mean``).
        n_seqs: completions in the whole batch (normaliser for ``seq_mean_token_mean`` and
            ``constant``).
        agg: name in :data:`LOSS_AGG`.
        beta: KL coefficient; needs ``ref_logp`` when > 0.
        ref_logp: log-probs under the frozen reference model, ``[N, L]``.
        max_len: the constant per-completion length of ``constant`` (tokens, >= 1).

    Raises:
        ValueError: shape mismatch, negative clip, ``beta > 0`` without ``ref_logp``, or
            ``constant`` without a positive ``max_len``.
        KeyError: unknown ``agg``.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"shapes: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, mask "
            f"{tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError("clip ranges must be >= 0")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    aggregate = LOSS_AGG.get(agg)
    if agg == "constant" and (max_len is None or max_len < 1):
        raise ValueError(f"loss aggregation 'constant' needs max_len >= 1, got {max_len}")
    m = mask.to(logp.dtype)
    keep = m > 0
    # Zero the differences at masked positions before exp: their log-probs are arbitrary and an
    # overflow there would turn the masked-out product into inf * 0 = NaN.
    ratio = torch.exp(torch.where(keep, logp - old_logp, 0.0))
    a = (advantages.unsqueeze(1) if advantages.ndim == 1 else advantages).to(logp.dtype)  # [N, 1] or [N, L]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl_sum = logp.new_zeros(())
    if beta > 0:
        delta = torch.where(keep, ref_logp - logp, 0.0)
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
        kl_sum = (kl.detach() * m).sum()
    is_clipped = ((clipped < unclipped) & (m > 0)).sum().to(logp.dtype)
    return PolicyLossOutput(aggregate(per_token, m, n_tokens, n_seqs, float(max_len or 0)), is_clipped.detach(), kl_sum)
