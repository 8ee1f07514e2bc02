"""calibrl: calibration-aware reinforcement learning for language models.

Packages follow the data path, lowest first; a package imports only the ones above it in this
list (``tests/test_layout.py`` checks it)::

    calibrl.data        examples (reasoning-gym or `datasets` sources), the completion format, prompts
    calibrl.rewards     completion parser, verifier guard, reward components and scoring rules,
                        token <-> character spans
    calibrl.metrics     calibration / selective-prediction metrics, bootstrap CIs, voting (numpy only)
    calibrl.objectives  objectives (accuracy, calibration, ...), group advantages, combiners
    calibrl.rl          rollouts (decode loop) -> clipped policy loss -> update engines; GRPO, SFT
    calibrl.eval        the held-out evaluator (training and ``calibrl-eval``), confidence signals,
                        reliability diagrams, the ``calibrl-eval`` job
    calibrl.report      ``calibrl-compare``: runs -> arms -> tables, figures, HTML
    calibrl.run         the main job: build the parts, run the stages, checkpoints and resume

Leaves every package may use: ``calibrl.config`` (the typed config schema), ``calibrl.cli``
(entry-point helpers), ``calibrl.registry``, ``calibrl.device``, ``calibrl.distributed``,
``calibrl.models`` (loading the policy), ``calibrl.lora`` (LoRA adapters through peft),
``calibrl.tracking`` (W&B and JSONL sinks, numbers only).
Entry points: ``calibrl.train`` (``calibrl-train``), ``calibrl.eval`` (``calibrl-eval``),
``calibrl.report`` (``calibrl-compare``; ``python -m calibrl.compare`` is an alias).
"""

__version__ = "0.1.0"
