"""calibrl: calibration-aware reinforcement learning for language models.

The data path, one module per step::

    calibrl.data      prompts (reasoning-gym or `datasets` sources)
    calibrl.rl        rollouts -> advantages -> clipped policy loss -> optimizer step
    calibrl.rewards   completion parser, reward components, objective combination
    calibrl.metrics   accuracy / ECE / Brier / AUROC on the same parsed completions
    calibrl.tracking  W&B and JSONL sinks (receive numbers only)
"""

__version__ = "0.1.0"
