"""calibrl: calibration-aware reinforcement learning for language models.

The data path, one module per step::

    calibrl.data      prompts (reasoning-gym or `datasets` sources)
    calibrl.rl        rollouts -> advantages -> clipped policy loss -> optimizer step
    calibrl.rewards   completion parser, reward components, objective combination
    calibrl.metrics   calibration / selective-prediction metrics, bootstrap CIs, voting
                      (pure numpy, on the same parsed completions)
    calibrl.tracking  W&B and JSONL sinks (receive numbers only)

Evaluation: ``calibrl.evaluation`` (one evaluator for training and ``calibrl-eval``),
``calibrl.confidence_signals`` (stated vs model-intrinsic confidence), ``calibrl.plots``
(reliability diagrams), ``calibrl.eval_job`` (the ``calibrl-eval`` job).
"""

__version__ = "0.1.0"
