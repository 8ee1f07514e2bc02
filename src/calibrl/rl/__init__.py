"""The GRPO-style RL loop: rollouts, group advantages, clipped policy loss, SFT warm-up."""
