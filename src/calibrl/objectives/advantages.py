"""Group-relative advantages (GRPO, Shao et al., "DeepSeekMath", arXiv:2402.03300).

For a group of G completions of one prompt with rewards ``r_1..r_G``::

    A_i = r_i - mean(r)                              (scale_by_std=False, RLCR's setting)
    A_i = (r_i - mean(r)) / max(std(r), std_floor)   (scale_by_std=True)

``std`` is the unbiased (Bessel-corrected) sample standard deviation, as in TRL and verl. A group
whose rewards are all identical gets advantages of exactly 0 in both modes (no floating-point
residue from ``r - mean(r)``). Std scaling turns small Brier differences into full-size updates
(cf. arXiv:2508.11800), which is why it is off by default.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages"]


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool, std_floor: float = 1e-4
) -> torch.Tensor:
    """Advantages of ``B`` groups of ``G`` completions laid out group by group.

    Args:
        rewards: float tensor ``[B*G]``; completions ``g*G .. g*G+G-1`` share prompt ``g``.
        group_size: G >= 2.
        scale_by_std: divide by the group's std (floored at ``std_floor``).
        std_floor: lower bound of the divisor, > 0.

    Returns:
        float tensor ``[B*G]`` (same dtype as ``rewards``); zero-sum within each group.

    Raises:
        ValueError: not 1-D, length not a multiple of G, G < 2, non-finite rewards, or
            ``std_floor <= 0``.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group_size={group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards hold a non-finite value")
    if std_floor <= 0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}")
    r = rewards.view(-1, group_size)  # [B, G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / r.std(dim=1, keepdim=True).clamp_min(std_floor)
    constant = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)  # [B, 1]
    adv = adv.masked_fill(constant, 0.0)
    return adv.reshape(-1)
